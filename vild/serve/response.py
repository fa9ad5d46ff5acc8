"""Detections as JSON: each ``{score, label, box: {xmin, ymin, xmax, ymax}}`` like transformers'
zero-shot-object-detection pipeline, plus the mask as COCO RLE when asked for."""
from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, Field

from ..api import DetectionResult
from ..evaluation.results import encode_masks


class Box(BaseModel):
    """Corners in pixels of the image as sent (EXIF orientation applied)."""

    xmin: float
    ymin: float
    xmax: float
    ymax: float


class Mask(BaseModel):
    """COCO run-length encoding (pycocotools' compressed text counts; column-major)."""

    size: list[int] = Field(description="[height, width]")
    counts: str


class Detection(BaseModel):
    """One detected object."""

    score: float
    label: str = Field(description="the display name (first synonym) of its category")
    box: Box
    mask: Optional[Mask] = Field(None, description="only with masks=true")


class DetectResponse(BaseModel):
    """The detections of one image, best first."""

    detections: list[Detection]
    width: int
    height: int
    vocabulary: list[str] = Field(description="display names of the categories searched for")
    score_threshold: float
    max_detections: int


def detections_json(result: DetectionResult, score_threshold: float, max_detections: int, masks: bool) -> dict:
    """A ``DetectResponse`` as plain JSON-ready data."""
    rles = encode_masks(result.masks) if masks and result.masks is not None and len(result) else None
    dets = []
    for i, ((x0, y0, x1, y1), score) in enumerate(zip(result.boxes.tolist(), result.scores.tolist())):
        d = {"score": round(score, 4), "label": result.names[i],
             "box": {"xmin": round(x0, 2), "ymin": round(y0, 2), "xmax": round(x1, 2), "ymax": round(y1, 2)}}
        if rles is not None:
            d["mask"] = rles[i]
        dets.append(d)
    height, width = result.image.shape[-2:]
    return {"detections": dets, "width": int(width), "height": int(height), "vocabulary": list(result.vocabulary),
            "score_threshold": score_threshold, "max_detections": max_detections}
