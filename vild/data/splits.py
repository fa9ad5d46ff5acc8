"""Open-vocabulary category splits: COCO OVD (48 base / 17 novel) and LVIS (f+c base / r novel)."""
from __future__ import annotations

import logging
from typing import Sequence

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


def apply_split(categories: list[dict], split: str, novel: Sequence[str] = ()) -> tuple[list[dict], list[bool]]:
    """Return the categories kept by ``split`` (sorted by id) and whether each is a base category.

    ``novel``: category names (or synonyms, any case) held out as novel under split ``all``; empty: none.
    """
    cats = sorted(categories, key=lambda c: c["id"])
    if novel and split not in ("all", "none"):
        raise ValueError(f"novel categories are chosen twice, by split {split!r} and by name {list(novel)}: "
                         f"set DATASETS.NOVEL only for datasets whose SPLIT is all")
    if split in ("all", "none"):
        if novel:
            return cats, _base_by_names(cats, novel)
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


def _base_by_names(cats: list[dict], novel: Sequence[str]) -> list[bool]:
    """Base flags: False for the categories that ``novel`` names (by name or synonym, any case)."""
    def keys(c: dict) -> set[str]:
        return {n.strip().lower() for n in [c["name"], *c.get("synonyms", [])]}
    wanted = {n.strip().lower(): n for n in novel}
    unknown = [n for k, n in wanted.items() if not any(k in keys(c) for c in cats)]
    if unknown:
        names = ", ".join(c["name"] for c in cats[:40]) + (", ..." if len(cats) > 40 else "")
        raise ValueError(f"novel categories {unknown} are not in the dataset; its categories: {names} "
                         f"(set DATASETS.NOVEL to names among them, or [] for none)")
    return [not (keys(c) & wanted.keys()) for c in cats]
