"""COCO (and COCO OVD) evaluation with pycocotools: AP, AP50 on novel / base / all categories."""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from .results import ResultsEvaluator, pct

logger = logging.getLogger(__name__)
_STATS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]


def load_coco_results(gt: COCO, results: list[dict]) -> COCO:
    """``gt.loadRes(results)``, also for an empty list (which loadRes cannot take)."""
    if results:
        with contextlib.redirect_stdout(io.StringIO()):
            return gt.loadRes([dict(r) for r in results])  # loadRes sets top-level keys in place
    dt = COCO()
    dt.dataset = {"images": list(gt.dataset["images"]), "categories": copy.deepcopy(gt.dataset["categories"]),
                  "annotations": []}
    with contextlib.redirect_stdout(io.StringIO()):
        dt.createIndex()
    return dt


def _subset_ap(E: COCOeval, cat_ids: set[int], iou: float | None) -> float:
    """COCOeval.summarize's AP (area all, largest maxDets) restricted to ``cat_ids``: same numbers as
    re-running COCOeval with ``params.catIds`` set to them, since per-category results are independent."""
    k = [i for i, c in enumerate(E.params.catIds) if c in cat_ids]
    p = E.eval["precision"]  # [T, R, K, A, M]
    if iou is not None:
        p = p[np.isclose(E.params.iouThrs, iou)]
    p = p[:, :, k, 0, -1]
    p = p[p > -1]
    return pct(float(p.mean())) if p.size else float("nan")


class COCOEvaluator(ResultsEvaluator):
    """pycocotools COCOeval over the dataset's kept categories, plus AP50 (and AP) on novel and base."""

    def __init__(self, dataset: Any, output_dir: str | os.PathLike | None = None, per_category: bool = False):
        """``per_category`` adds ``per_category: {name: {AP, AP50}}`` to each iou type's metrics."""
        self.per_category = per_category
        super().__init__(dataset, output_dir)

    def _evaluate(self, iou_type: str, image_ids: list[int], results: list[dict]) -> dict:
        gt: COCO = self.dataset.api
        E = COCOeval(gt, load_coco_results(gt, results), iou_type)
        E.params.imgIds = image_ids
        E.params.catIds = list(self.dataset.category_ids)
        with contextlib.redirect_stdout(io.StringIO()) as log:
            E.evaluate()
            E.accumulate()
            E.summarize()
        logger.debug("COCO %s evaluation:\n%s", iou_type, log.getvalue())
        m = {name: pct(v) for name, v in zip(_STATS, E.stats)}
        groups = {"all": self.dataset.category_ids}
        groups["base"] = [c for c, b in zip(self.dataset.category_ids, self.dataset.base_mask) if b]
        groups["novel"] = [c for c, b in zip(self.dataset.category_ids, self.dataset.base_mask) if not b]
        for g, ids in groups.items():
            m[f"AP50_{g}"] = _subset_ap(E, set(ids), 0.5)
            m[f"AP_{g}"] = _subset_ap(E, set(ids), None)
        if self.per_category:
            names = {c: n[0] for c, n in zip(self.dataset.category_ids, self.dataset.category_names)}
            m["per_category"] = {names[c]: {"AP": _subset_ap(E, {c}, None), "AP50": _subset_ap(E, {c}, 0.5)}
                                 for c in self.dataset.category_ids}
            logger.info("per-category %s AP50:\n%s", iou_type, "\n".join(
                f"  {n:<24s} {v['AP50']:6.1f}" for n, v in m["per_category"].items()))
        return m
