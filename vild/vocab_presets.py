"""Ready-made vocabularies: COCO (80), the COCO open-vocabulary split (65), LVIS v1 (1203).

``vild/data/lvis_v1_names.txt`` holds the LVIS v1 category names, one per line, line i being
category id i (copied from the ``name`` fields of lvis_v1_val.json's categories, as listed in
detectron2's ``lvis_v1_categories.py``).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from .data.splits import COCO_OVD_BASE, COCO_OVD_NOVEL

LVIS_NAMES_FILE = Path(__file__).resolve().parent / "data" / "lvis_v1_names.txt"

# COCO 2017 category names in id order
COCO_NAMES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
]

PRESETS = ("coco", "coco_ovd", "lvis")


@lru_cache(maxsize=1)
def lvis_v1_names() -> tuple[str, ...]:
    """The 1203 LVIS v1 category names in id order."""
    names = tuple(line.strip() for line in LVIS_NAMES_FILE.read_text(encoding="utf-8").splitlines() if line.strip())
    if len(names) != 1203:
        raise RuntimeError(f"{LVIS_NAMES_FILE} holds {len(names)} names, expected 1203: the file is damaged")
    return names


def get_preset(name: str) -> list[str]:
    """Category names of a preset vocabulary (coco | coco_ovd | lvis)."""
    if name == "coco":
        return list(COCO_NAMES)
    if name == "coco_ovd":
        keep = set(COCO_OVD_BASE) | set(COCO_OVD_NOVEL)
        return [n for n in COCO_NAMES if n in keep]  # COCO id order, so category ids stay monotone
    if name == "lvis":
        return list(lvis_v1_names())
    raise ValueError(f"unknown vocabulary preset {name!r}; choose one of {', '.join(PRESETS)}")
