"""COCO (OVD) and LVIS evaluators around the official pycocotools / lvis tools."""
from __future__ import annotations

import os
from typing import Any

from .coco_evaluator import COCOEvaluator
from .lvis_evaluator import LVISEvaluator
from .results import ResultsEvaluator, instances_to_results


def build_evaluator(dataset: Any, output_dir: str | os.PathLike | None = None,
                    per_category: bool = False) -> ResultsEvaluator:
    """The evaluator matching ``dataset.evaluator_type`` (coco | lvis)."""
    if dataset.evaluator_type == "lvis":
        return LVISEvaluator(dataset, output_dir)
    if dataset.evaluator_type == "coco":
        return COCOEvaluator(dataset, output_dir, per_category=per_category)
    raise ValueError(f"no evaluator for evaluator_type {dataset.evaluator_type!r}")


__all__ = ["build_evaluator", "COCOEvaluator", "LVISEvaluator", "ResultsEvaluator", "instances_to_results"]
