"""Model outputs → COCO-style result dicts, and the shared gather/write logic of the evaluators."""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from pycocotools import mask as mask_utils

from ..utils import comm
from ..utils.atomic import atomic_write_json

logger = logging.getLogger(__name__)


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def encode_masks(masks: Any) -> list[dict]:
    """Binary masks [n, H, W] (tensor or array; [n, 1, H, W] too) → COCO RLEs with text counts, one pycocotools call."""
    m = _np(masks)
    m = m.reshape(-1, *m.shape[-2:])
    # pycocotools takes a Fortran-ordered [H, W, n] uint8 array, which is the memory of a C-ordered [n, W, H]
    # one: a single transposing copy (that also casts) instead of a cast, a copy and a reorder
    f = np.ascontiguousarray(np.swapaxes(m, 1, 2), dtype=np.uint8).transpose(2, 1, 0)
    return [{"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")}  # JSON needs text
            for r in mask_utils.encode(f)]


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
