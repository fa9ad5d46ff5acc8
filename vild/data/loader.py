"""Datasets from the catalog, and the training (infinite, seeded, rank-sharded) and test data loaders."""
from __future__ import annotations

import gc
import itertools
import random
from typing import Any, Iterator

import cv2
import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Sampler

from ..utils import comm
from .catalog import get_dataset_meta
from .dataset import DetectionDataset
from .proposal_store import ProposalStore
from .transforms import build_transforms


def build_dataset(cfg: Any, name: str, train: bool, proposal_store: ProposalStore | str | None = None,
                  filter_empty: bool | None = None, unreadable: str | None = None,
                  masks: bool = True, keep_api: bool | None = None) -> DetectionDataset:
    """Resolve ``name`` through the catalog; ``proposal_store`` (a store or its folder) gives training items
    their CLIP proposals (the trainer decides whether a run opens one: ``Trainer.train_dataset``).

    A user's dataset (DATASETS.CUSTOM, ``register_dataset``) is validated on load; DATASETS.NOVEL names its
    held-out categories when its SPLIT is ``all``.
    """
    meta = get_dataset_meta(name, cfg)
    if isinstance(proposal_store, (str, bytes)) or hasattr(proposal_store, "__fspath__"):
        proposal_store = ProposalStore(proposal_store)
    return DetectionDataset(meta.json_file, meta.image_root, meta.evaluator_type, meta.split, train,
                            build_transforms(cfg, train), proposal_store, filter_empty=filter_empty, name=name,
                            unreadable=unreadable, masks=masks, keep_api=keep_api,
                            novel=_novel_names(cfg, meta.split), validate=meta.user)


def _novel_names(cfg: Any, split: str) -> list[str]:
    """DATASETS.NOVEL for a dataset split ``all`` (``lvis`` and ``coco_ovd`` name their own novel categories)."""
    novel = list(getattr(getattr(cfg, "DATASETS", None), "NOVEL", None) or [])
    return novel if split in ("all", "none") else []


def trivial_collate(batch: list) -> tuple[list, list]:
    """``[(image, target), ...]`` → ``(images, targets)``; images keep their own sizes."""
    return [b[0] for b in batch], [b[1] for b in batch]


class InfiniteSampler(Sampler[int]):
    """Endless seeded shuffles of the dataset; rank r takes every world_size-th index from r."""

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True, rank: int | None = None,
                 world_size: int | None = None, start: int = 0):
        """Same seed on all ranks, disjoint slices; ``start`` skips that many global positions."""
        if size <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.size, self.seed, self.shuffle, self.start = size, int(seed), shuffle, int(start)
        self.rank = comm.get_rank() if rank is None else rank
        self.world_size = comm.get_world_size() if world_size is None else world_size

    def _indices(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed)
        epoch, offset = divmod(self.start, self.size)
        for _ in range(epoch if self.shuffle else 0):  # replay the generator instead of the skipped indices
            torch.randperm(self.size, generator=g)
        while True:
            perm = torch.randperm(self.size, generator=g) if self.shuffle else torch.arange(self.size)
            yield from perm[offset:].tolist()
            offset = 0

    def __iter__(self) -> Iterator[int]:
        yield from itertools.islice(self._indices(), self.rank, None, self.world_size)


class InferenceSampler(Sampler[int]):
    """A contiguous, near-equal slice of ``range(size)`` per rank (every index exactly once overall)."""

    def __init__(self, size: int, rank: int | None = None, world_size: int | None = None):
        """Split ``size`` indices over ranks."""
        rank = comm.get_rank() if rank is None else rank
        world = comm.get_world_size() if world_size is None else world_size
        per, extra = divmod(size, world)
        start = rank * per + min(rank, extra)
        self.indices = range(start, start + per + (rank < extra))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _worker_init(worker_id: int) -> None:
    # the collector's passes write to every container object the worker inherited (the evaluators' json API,
    # the model): frozen, they stay in the pages shared with the parent instead of being copied per worker
    gc.freeze()
    seed = torch.initial_seed() % 2**32  # distinct per worker, derived from the loader's seeded generator
    np.random.seed(seed)
    random.seed(seed)
    cv2.setNumThreads(0)  # cv2's own thread pool fights the worker processes for cores


def build_train_loader(cfg: Any, dataset: DetectionDataset, start_iter: int = 0,
                       pin_memory: bool = False) -> DataLoader:
    """Infinite loader of SOLVER.IMS_PER_BATCH // world_size images per rank; ``start_iter`` resumes the order.

    ``pin_memory`` (for a CUDA model) lets ``batch_to_device`` copy the batch without waiting for the GPU.
    """
    world, rank = comm.get_world_size(), comm.get_rank()
    if cfg.SOLVER.IMS_PER_BATCH % world:
        raise ValueError(f"SOLVER.IMS_PER_BATCH={cfg.SOLVER.IMS_PER_BATCH} is not divisible by {world} processes")
    sampler = InfiniteSampler(len(dataset), seed=cfg.SEED, rank=rank, world_size=world,
                              start=start_iter * cfg.SOLVER.IMS_PER_BATCH)
    batches = BatchSampler(sampler, cfg.SOLVER.IMS_PER_BATCH // world, drop_last=True)
    return DataLoader(dataset, batch_sampler=batches, num_workers=cfg.DATALOADER.NUM_WORKERS,
                      collate_fn=trivial_collate, worker_init_fn=_worker_init,
                      generator=torch.Generator().manual_seed(int(cfg.SEED) + rank),
                      persistent_workers=cfg.DATALOADER.NUM_WORKERS > 0, pin_memory=pin_memory)


def batch_to_device(images: list[torch.Tensor], targets: list[dict],
                    device: torch.device) -> tuple[list[torch.Tensor], list[dict]]:
    """Images and every tensor of the targets on ``device``, copied without blocking.

    From pinned memory the copies queue behind the GPU's work. A blocking copy, or one from pageable memory,
    waits for that work first; the model's own ``.to`` of each target tensor used to do so once per tensor
    per image, after the backbone was queued.
    """
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
               for t in targets]
    return images, targets


def build_test_loader(cfg: Any, dataset: DetectionDataset, batch_size: int = 1) -> DataLoader:
    """Each rank sees its own contiguous share of the dataset once, in order."""
    sampler = InferenceSampler(len(dataset))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=cfg.DATALOADER.NUM_WORKERS,
                      collate_fn=trivial_collate, worker_init_fn=_worker_init)
