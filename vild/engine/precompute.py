"""Filling the CLIP proposal store: M class-agnostic proposals per training image, embedded by the teacher."""
from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from ..config import CfgNode
from ..data import ProposalStoreWriter, build_dataset
from ..data.loader import trivial_collate
from ..modeling import ViLD
from ..utils import comm

if TYPE_CHECKING:
    from ..teacher import CLIPTeacher

logger = logging.getLogger("vild")


def load_proposals_json(path: str | Path, max_proposals: int) -> dict[int, torch.Tensor]:
    """Read COCO-results-style proposals (``image_id``, ``bbox`` xywh, ``score``): the best M per image, xyxy."""
    with open(path) as f:
        entries = json.load(f)
    per_image = defaultdict(list)
    for e in entries:
        x, y, w, h = e["bbox"]
        per_image[int(e["image_id"])].append((float(e.get("score", 1.0)), [x, y, x + w, y + h]))
    out = {}
    for image_id, items in per_image.items():
        items.sort(key=lambda t: -t[0])
        out[image_id] = torch.tensor([b for _, b in items[:max_proposals]], dtype=torch.float32).reshape(-1, 4)
    return out


def _valid_boxes(boxes: torch.Tensor, min_size: float = 2.0) -> torch.Tensor:
    return boxes[((boxes[:, 2] - boxes[:, 0]) >= min_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_size)]


@torch.no_grad()
def embed_into_store(batches: Iterable[tuple[list, list[torch.Tensor]]], teacher: CLIPTeacher,
                     writer: ProposalStoreWriter,
                     boxes_fn: Callable[[list, list[torch.Tensor]], list[torch.Tensor]],
                     progress: tqdm | None = None, stats: dict | None = None) -> int:
    """Embed each batch's boxes (``boxes_fn(ids, images)``) with the teacher and commit them to ``writer``.

    Writing (and its fsyncs) runs on a background thread while the next batch is decoded and embedded,
    so the disk does not stall the GPU; at most one batch waits to be written. ``stats`` (if given)
    receives the seconds spent waiting for input, embedding and waiting for writes.
    """
    times = {"input_wait_s": 0.0, "embed_s": 0.0, "write_wait_s": 0.0}
    written = 0
    pending: Future | None = None
    it = iter(batches)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer") as pool:
        while True:
            t0 = time.perf_counter()
            batch = next(it, None)
            t1 = time.perf_counter()
            times["input_wait_s"] += t1 - t0
            if batch is None:
                break
            ids, images = batch
            boxes = boxes_fn(ids, images)
            embeds = teacher.embed_regions(images, boxes)  # returns host tensors: synchronises with the device
            records = [(i, b.numpy(), e.to(torch.float16).numpy()) for i, b, e in zip(ids, boxes, embeds)]
            t2 = time.perf_counter()
            times["embed_s"] += t2 - t1
            if pending is not None:
                pending.result()  # re-raises a failed write here, before more work is queued
            times["write_wait_s"] += time.perf_counter() - t2
            pending = pool.submit(writer.put_many, records)
            written += len(records)
            if progress is not None:
                progress.update(len(records))
        t3 = time.perf_counter()
        if pending is not None:
            pending.result()
        times["write_wait_s"] += time.perf_counter() - t3
    if stats is not None:
        for k, v in times.items():
            stats[k] = stats.get(k, 0.0) + v
    return written


def image_loader(dataset: Any, batch_size: int, num_workers: int, pin_memory: bool,
                 persistent_workers: bool = False) -> DataLoader:
    """A loader of single dataset items, one decode per worker task, that keeps two batches' worth in flight.

    A batching loader hands each worker a whole batch, so the first batch waits for ``batch_size`` decodes in
    one worker while the others idle (16 JPEGs at 1024 px: 0.25 s on an H200 machine, 9 % of a 64-image
    run). One item per task fills the pipeline ``num_workers`` times faster; ``batches_of`` regroups them.
    """
    extra = {}
    if num_workers > 0:
        extra = {"prefetch_factor": max(2, -(-2 * batch_size // num_workers)), "persistent_workers": persistent_workers}
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, collate_fn=_as_is, pin_memory=pin_memory,
                      **extra)


def batches_of(items: Iterable, n: int, collate: Callable[[list], Any]) -> Iterator:
    """``collate`` of each run of ``n`` consecutive items (the last run may be shorter)."""
    run: list = []
    for item in items:
        run.append(item)
        if len(run) == n:
            yield collate(run)
            run = []
    if run:
        yield collate(run)


def _as_is(item: Any) -> Any:
    return item  # a module-level function: loader workers pickle it


@torch.no_grad()
def precompute_clip_proposals(cfg: CfgNode, teacher: CLIPTeacher, out_dir: str | Path, model: ViLD | None = None,
                              proposals: dict[int, torch.Tensor] | None = None, max_proposals: int | None = None,
                              shard_index: int | None = None, num_shards: int | None = None,
                              batch_size: int = 8, num_workers: int | None = None) -> dict:
    """Write this process's shard of the store for DATASETS.TRAIN[0]; resumes where an earlier run stopped.

    Proposals come from ``model``'s RPN (trained on base categories) or from a precomputed ``proposals`` dict.
    """
    if (model is None) == (proposals is None):
        raise ValueError("pass exactly one proposal source: a trained model (its RPN) or a proposals JSON")
    m = max_proposals or cfg.MODEL.VILD.NUM_DISTILL_PROPOSALS
    shard_index = comm.get_rank() if shard_index is None else shard_index
    num_shards = comm.get_world_size() if num_shards is None else num_shards
    # the raw images, untransformed: boxes are stored in original pixels and augmented at training time
    # an unreadable image is left out (and stays pending): a stand-in could belong to another shard
    dataset = build_dataset(cfg, cfg.DATASETS.TRAIN[0], train=False, filter_empty=False, unreadable="skip",
                            masks=False, keep_api=False)
    writer = ProposalStoreWriter(out_dir, shard_index, num_shards, dataset.image_ids, m, teacher.embed_dim,
                                 teacher=teacher.identity, crop_scales=list(teacher.crop_scales))
    pending = set(writer.pending())
    todo = [i for i, image_id in enumerate(dataset.image_ids) if image_id in pending]
    logger.info("proposal store %s: shard %d/%d, %d of %d images to do", out_dir, shard_index, num_shards,
                len(todo), len(writer.image_ids))
    workers = cfg.DATALOADER.NUM_WORKERS if num_workers is None else num_workers
    device = next(model.parameters()).device if model is not None else torch.device(teacher.device)
    loader = image_loader(Subset(dataset, todo), batch_size, workers, pin_memory=device.type == "cuda")

    def boxes_fn(ids: list, images: list[torch.Tensor]) -> list[torch.Tensor]:
        if model is not None:
            return [_valid_boxes(b.float().cpu())[:m] for b, _ in model.propose([im.to(device) for im in images])]
        return [_valid_boxes(proposals.get(i, torch.zeros(0, 4)))[:m] for i in ids]

    batches = (([t["image_id"] for t in targets], images)
               for images, targets in batches_of(loader, batch_size, collate_readable) if images)
    bar = tqdm(total=len(todo), desc=f"CLIP proposals (shard {shard_index})", unit="img",
               disable=not comm.is_main_process())
    try:
        written = embed_into_store(batches, teacher, writer, boxes_fn, progress=bar)
    finally:
        bar.close()
        writer.close()
    unread = len(todo) - written  # counted here: workers' own dataset copies count theirs apart
    if unread:
        logger.warning("shard %d: %d image(s) could not be read and stay pending; repair them and run again "
                       "(images without an entry train without distillation)", shard_index, unread)
    return {"written": written, "pending_before": len(todo), "shard": shard_index, "unreadable": unread}


def collate_readable(batch: list) -> tuple[list, list]:
    """``trivial_collate`` without the images the dataset could not read (``None``)."""
    return trivial_collate([b for b in batch if b is not None])


def load_proposal_model(weights: str, device: torch.device) -> ViLD:
    """A trained ViLD (any variant) whose RPN supplies class-agnostic proposals."""
    from .checkpoint import ModelCheckpoint
    return ModelCheckpoint(weights).build_model(device=device)

