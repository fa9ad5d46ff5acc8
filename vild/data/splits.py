"""Open-vocabulary category splits: COCO OVD (48 base / 17 novel) and LVIS (f+c base / r novel)."""
from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

COCO_OVD_BASE = [
    "person", "bicycle", "car", "motorcycle", "train", "truck", "boat", "bench", "bird", "horse",
    "sheep", "bear", "zebra", "giraffe", "backpack", "handbag", "suitcase", "frisbee", "skis",
    "kite", "surfboard", "bottle", "fork", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "pizza", "donut", "chair", "bed", "toilet", "tv", "laptop",
    "mouse", "remote", "microwave", "oven", "toaster", "refrigerator", "book", "clock", "vase",
    "toothbrush",
]
COCO_OVD_NOVEL = [
    "airplane", "bus", "cat", "dog", "cow", "elephant", "umbrella", "tie", "snowboard",
    "skateboard", "cup", "knife", "cake", "couch", "keyboard", "sink", "scissors",
]
SPLITS = ("lvis", "coco_ovd", "all", "none")


def apply_split(categories: list[dict], split: str) -> tuple[list[dict], list[bool]]:
    """Return the categories kept by ``split`` (sorted by id) and whether each is a base category."""
    cats = sorted(categories, key=lambda c: c["id"])
    if split in ("all", "none"):
        # no held-out classes: everything is "seen"
        return cats, [True] * len(cats)
    if split == "lvis":
        missing = [c["name"] for c in cats if c.get("frequency") not in ("f", "c", "r")]
        if missing:
            raise ValueError(
                f"split 'lvis' needs a 'frequency' field (f/c/r) on every category; missing on {missing[:5]}"
            )
        return cats, [c["frequency"] != "r" for c in cats]
    if split == "coco_ovd":
        base, novel = set(COCO_OVD_BASE), set(COCO_OVD_NOVEL)
        kept = [c for c in cats if c["name"] in base or c["name"] in novel]
        found = {c["name"] for c in kept}
        if not found:
            raise ValueError("split 'coco_ovd' matched no category names: is this a COCO-format file with COCO names?")
        missing = sorted((base | novel) - found)
        if missing:  # a subset is legitimate (a mini set); other spellings (e.g. "tvmonitor") silently lose classes
            logger.warning("split 'coco_ovd': %d of the 65 category names not in the file, so not evaluated: %s",
                           len(missing), ", ".join(missing))
        return kept, [c["name"] in base for c in kept]
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
