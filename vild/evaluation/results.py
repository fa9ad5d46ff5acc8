"""Model outputs → COCO-style result dicts, and the shared gather/write logic of the evaluators."""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch
from pycocotools import mask as mask_utils

from ..utils import comm
from ..utils.atomic import atomic_write_json
from ..utils.mask_bounds import mask_bounds

logger = logging.getLogger(__name__)


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def encode_masks(masks: Any, bounds: Optional[np.ndarray] = None) -> list[dict]:
    """Binary masks [n, H, W] (tensor or array; [n, 1, H, W] too) → COCO RLEs with text counts.

    The RLEs are those of pycocotools' ``encode`` of the whole masks. Each mask's runs are counted only inside
    the rows and columns it covers (``bounds`` from ``vild.utils.mask_bounds``, computed when not given), and
    the zeros around them are added arithmetically: a detection covers a small part of a photo.
    """
    m = _np(masks)
    m = m.reshape(-1, *m.shape[-2:])
    n, h, w = m.shape
    if n == 0:
        return []
    m = m if m.dtype == np.bool_ else m != 0
    if bounds is None:
        bounds = mask_bounds(m)
    rles = mask_utils.frPyObjects([{"size": [h, w], "counts": c} for c in _rle_counts(m, bounds)], h, w)
    return [{"size": [h, w], "counts": r["counts"].decode("ascii")} for r in rles]  # JSON needs text


def _rle_counts(m: np.ndarray, bounds: np.ndarray) -> list[np.ndarray]:
    """Uncompressed COCO RLE counts of bool masks [n, H, W], each zero outside its bounds (y0, y1, x0, x1).

    COCO runs go down the columns, alternating zeros and ones and starting with zeros. The windows are laid out
    one after another, each read column by column with one zero row added above and below it: every column
    then starts and ends inside a run of zeros, no run crosses from one window into the next, and each added
    row stands for the image's y0 rows above the window (H - y1 below it). One pass finds every window's runs.
    """
    n, h, w = m.shape
    out = [np.array([h * w], dtype=np.int64) for _ in range(n)]  # an empty mask: one run of zeros
    b = np.asarray(bounds, dtype=np.int64)
    idx = np.flatnonzero((b[:, 1] > b[:, 0]) & (b[:, 3] > b[:, 2]))
    if not len(idx):
        return out
    y0, y1, x0, x1 = b[idx].T
    rows = y1 - y0 + 2
    offsets = np.concatenate(([0], np.cumsum((x1 - x0) * rows)))
    seq = np.zeros(offsets[-1], dtype=np.uint8)
    for k, i in enumerate(idx):
        window = seq[offsets[k]:offsets[k + 1]].reshape(x1[k] - x0[k], rows[k])
        window[:, 1:-1] = m[i, y0[k]:y1[k], x0[k]:x1[k]].T
    # run boundaries: the changes, and the windows' starts (never a change: both sides are added zeros)
    edges = np.sort(np.concatenate((np.flatnonzero(seq[1:] != seq[:-1]) + 1, offsets)))
    win = np.searchsorted(offsets, edges[:-1], side="right") - 1  # the window of each run
    first = np.concatenate(([True], win[1:] != win[:-1]))
    last = np.concatenate((win[1:] != win[:-1], [True]))
    zeros = (np.arange(len(win)) - np.flatnonzero(first)[np.cumsum(first) - 1]) % 2 == 0  # even runs: zeros
    start, end, r = edges[:-1] - offsets[win], edges[1:] - offsets[win], rows[win]
    top = (end - 1) // r - (start - 1) // r  # added rows above a column inside this run
    bottom = (end - r) // r - (start - r) // r  # ... and below one (at offset r - 1)
    length = end - start + np.where(zeros, top * (y0[win] - 1) + bottom * (h - y1[win] - 1), 0)
    length[first] += x0[win[first]] * h
    length[last] += (w - x1[win[last]]) * h
    # a window spanning the image's height can leave an empty run of zeros between two columns: it joins the
    # runs of ones on both sides, as a whole-image count would; an empty last run of zeros disappears
    empty = zeros & (length == 0) & ~first
    starts_group = ~(empty | (np.concatenate(([False], empty[:-1])) & ~zeros))
    counts = np.bincount(np.cumsum(starts_group) - 1, weights=length).astype(np.int64)
    per_window = np.bincount(win[starts_group], minlength=len(idx))
    for i, c in zip(idx, np.split(counts, np.cumsum(per_window)[:-1])):
        out[i] = c
    return out


def instances_to_results(image_id: int, output: dict, category_ids: list[int]) -> tuple[list[dict], list[dict]]:
    """One image's output (xyxy boxes, scores, labels, optional masks) → (bbox results, segm results)."""
    boxes = _np(output["boxes"]).astype(np.float64).reshape(-1, 4)
    scores = _np(output["scores"]).astype(np.float64).reshape(-1)
    labels = _np(output["labels"]).astype(np.int64).reshape(-1)
    cats = [int(category_ids[k]) for k in labels]
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
    bbox = [{"image_id": int(image_id), "category_id": c, "bbox": [float(v) for v in b], "score": float(s)}
            for c, b, s in zip(cats, xywh, scores)]
    segm: list[dict] = []
    masks = output.get("masks")
    if masks is not None and len(labels):
        for c, rle, s in zip(cats, encode_masks(masks), scores):
            # no "bbox" key: both official loaders would then take the box area as the mask area
            segm.append({"image_id": int(image_id), "category_id": c, "score": float(s), "segmentation": rle})
    return bbox, segm


def pct(x: float) -> float:
    """Official score in [0, 1] → percent; the tools' -1 ("no ground truth") → NaN."""
    return float(x) * 100.0 if x is not None and x >= 0 else float("nan")


class ResultsEvaluator:
    """Collects per-image results; subclasses implement ``_evaluate(image_ids, results) -> metrics``."""

    def __init__(self, dataset: Any, output_dir: str | os.PathLike | None = None):
        """Evaluate on ``dataset`` (labels index ``dataset.category_ids``); files go to ``output_dir``."""
        self.dataset = dataset
        self.output_dir = Path(output_dir) if output_dir else None
        self.reset()

    def reset(self) -> None:
        """Forget everything processed so far."""
        self._image_ids: list[int] = []
        self._results: dict[str, list[dict]] = {"bbox": [], "segm": []}
        self._has_masks = False

    def process(self, targets_or_image_ids: Iterable[Any], outputs: Iterable[dict]) -> None:
        """Add a batch: image ids (or targets with ``image_id``) and outputs in original-image pixels."""
        for t, out in zip(targets_or_image_ids, outputs, strict=True):
            image_id = int(t["image_id"]) if isinstance(t, dict) else int(t)
            bbox, segm = instances_to_results(image_id, out, self.dataset.category_ids)
            self._image_ids.append(image_id)
            self._results["bbox"] += bbox
            self._results["segm"] += segm
            self._has_masks |= out.get("masks") is not None

    def evaluate(self) -> dict:
        """Gather from all ranks, run the official evaluator on rank 0, write files; metrics on every rank."""
        # to rank 0 only: LVIS results (300 boxes and RLE masks per image) would be copied to every rank
        gathered = comm.gather_object((self._image_ids, self._results, self._has_masks))
        metrics: dict = {}
        if comm.is_main_process():
            image_ids = sorted({i for ids, _, _ in gathered for i in ids})
            results = {k: [r for _, res, _ in gathered for r in res[k]] for k in ("bbox", "segm")}
            # no mask AP for a model without masks, nor against a json without segmentations (box-only data)
            gt_masks = getattr(self.dataset, "has_masks", True)
            iou_types = ["bbox"] + (["segm"] if gt_masks and any(g[2] for g in gathered) else [])
            if not gt_masks and any(g[2] for g in gathered):
                logger.info("%s has no segmentations: boxes are scored, masks are not", self.dataset.json_file)
            if not image_ids:
                logger.warning("%s: no images were processed; nothing to evaluate", type(self).__name__)
            else:
                metrics = {t: self._evaluate(t, image_ids, results[t]) for t in iou_types}
            self._write(results, iou_types, metrics)
        return comm.broadcast_object(metrics)

    def _evaluate(self, iou_type: str, image_ids: list[int], results: list[dict]) -> dict:
        raise NotImplementedError

    def _write(self, results: dict, iou_types: list[str], metrics: dict) -> None:
        if self.output_dir is None:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for t in iou_types:
            atomic_write_json(self.output_dir / f"results_{t}.json", results[t])
        atomic_write_json(self.output_dir / "metrics.json", _nan_to_none(metrics))


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    return None if isinstance(x, float) and math.isnan(x) else x
