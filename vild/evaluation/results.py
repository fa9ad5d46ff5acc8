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
    counts = [_window_counts(m[i], h, w, *(int(v) for v in bounds[i])) for i in range(n)]
    rles = mask_utils.frPyObjects([{"size": [h, w], "counts": c} for c in counts], h, w)
    return [{"size": [h, w], "counts": r["counts"].decode("ascii")} for r in rles]  # JSON needs text


def _window_counts(mask: np.ndarray, h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Uncompressed COCO RLE counts of a bool [h, w] mask that is zero outside rows y0:y1 and columns x0:x1.

    COCO runs go down the columns, alternating zeros and ones and starting with zeros. The window is read
    column by column with one zero row added above and below it: every column then starts and ends inside a
    run of zeros, and each added row stands for the image's y0 rows above the window (h - y1 below it).
    """
    if y1 <= y0 or x1 <= x0:
        return np.array([h * w], dtype=np.int64)
    rows = y1 - y0 + 2
    padded = np.zeros((x1 - x0, rows), dtype=np.uint8)
    padded[:, 1:-1] = mask[y0:y1, x0:x1].T
    seq = padded.ravel()
    edges = np.concatenate(([0], np.flatnonzero(seq[1:] != seq[:-1]) + 1, [seq.size]))
    runs = np.diff(edges)  # zeros first (seq starts with an added row), zeros last
    start, end = edges[:-1:2], edges[1::2]  # the runs of zeros
    top = (end - 1) // rows - (start - 1) // rows  # added rows above a column inside this run
    bottom = (end - rows) // rows - (start - rows) // rows  # ... and below one (at offset rows - 1)
    zeros = runs[0::2] + top * (y0 - 1) + bottom * (h - y1 - 1)
    zeros[0] += x0 * h
    zeros[-1] += (w - x1) * h
    ones = runs[1::2]
    # a window touching the top and bottom rows can leave an empty run of zeros between columns: join the ones
    # on both sides, as a whole-image count would
    keep = zeros[1:-1] > 0
    if not keep.all():
        ones = np.bincount(np.concatenate(([0], np.cumsum(keep))), weights=ones).astype(np.int64)
        zeros = np.concatenate((zeros[:1], zeros[1:-1][keep], zeros[-1:]))
    out = np.empty(len(zeros) + len(ones), dtype=np.int64)
    out[0::2], out[1::2] = zeros, ones
    return out if out[-1] else out[:-1]  # no trailing empty run of zeros


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
            iou_types = ["bbox"] + (["segm"] if any(g[2] for g in gathered) else [])
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
