"""One batch of requests through a ``Detector``: their shared vocabulary, one forward pass, each request's cut."""
from __future__ import annotations

import dataclasses

import torch

from ..api import DetectionResult, Detector
from .parsing import DetectRequest


class DetectorRunner:
    """``run_batch`` for a ``DynamicBatcher``: requests grouped by vocabulary, run with the loosest settings.

    The forward pass uses the lowest score threshold and the largest ``max_detections`` of the batch, then
    each request keeps its own: NMS keeps a detection or not by the better-scoring ones alone, so the
    detections over a higher threshold are the same as a pass with that threshold would give.
    """

    def __init__(self, detector: Detector):
        self.detector = detector
        self._vocabulary: str | None = None

    def __call__(self, vocabulary: str, requests: list[DetectRequest]) -> list[DetectionResult]:
        """Detect in every request's image with ``vocabulary``; one result per request."""
        if vocabulary != self._vocabulary:
            self._vocabulary = None  # unknown if set_vocabulary fails half-way
            self.detector.set_vocabulary(vocabulary)
            self._vocabulary = vocabulary
        results = self.detector.predict([r.image for r in requests],
                                        score_thresh=min(r.score_threshold for r in requests),
                                        max_dets=max(r.max_detections for r in requests))
        return [keep_best(res, r.score_threshold, r.max_detections) for res, r in zip(results, requests)]


def keep_best(result: DetectionResult, score_thresh: float, max_dets: int) -> DetectionResult:
    """The detections scoring at least ``score_thresh``, best first, at most ``max_dets`` of them."""
    order = torch.argsort(result.scores, descending=True, stable=True)
    keep = order[result.scores[order] >= score_thresh][:max_dets]
    if len(keep) == len(result) and bool((keep == torch.arange(len(keep))).all()):
        return result
    return dataclasses.replace(result, boxes=result.boxes[keep], scores=result.scores[keep],
                               labels=result.labels[keep], names=[result.names[int(i)] for i in keep],
                               masks=None if result.masks is None else result.masks[keep])
