"""Named datasets resolved under a root folder (cfg.DATASETS.ROOT, $VILD_DATASETS or ./datasets)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .splits import SPLITS

README_HINT = "see datasets/README.md for the expected layout"


@dataclass(frozen=True)
class DatasetMeta:
    """Where a dataset lives and how it is split and evaluated."""

    name: str
    json_file: str
    image_root: str
    evaluator_type: str  # coco | lvis
    split: str  # lvis | coco_ovd | all | none
    user: bool = False  # registered by the user (DATASETS.CUSTOM, register_dataset): its json is validated on load


# relative paths under the datasets root; COCO OVD applies its split on load from the original files
_BUILTIN: dict[str, tuple[str, str, str, str]] = {
    # LVIS file names come from coco_url (".../train2017/x.jpg"), resolved under coco/
    "lvis_v1_train": ("lvis/lvis_v1_train.json", "coco", "lvis", "lvis"),
    "lvis_v1_val": ("lvis/lvis_v1_val.json", "coco", "lvis", "lvis"),
    "coco_2017_train_ovd": ("coco/annotations/instances_train2017.json", "coco/train2017", "coco", "coco_ovd"),
    "coco_2017_val_ovd": ("coco/annotations/instances_val2017.json", "coco/val2017", "coco", "coco_ovd"),
    "coco_2017_val": ("coco/annotations/instances_val2017.json", "coco/val2017", "coco", "all"),
}
_USER: dict[str, DatasetMeta] = {}


def datasets_root(cfg: Any = None) -> Path:
    """The folder builtin datasets are resolved under."""
    root = getattr(getattr(cfg, "DATASETS", None), "ROOT", "") if cfg is not None else ""
    return Path(root or os.environ.get("VILD_DATASETS") or "./datasets").expanduser()


def register_dataset(
    name: str, json_file: str | os.PathLike, image_root: str | os.PathLike,
    evaluator_type: str = "coco", split: str = "all",
) -> DatasetMeta:
    """Register a user dataset (COCO- or LVIS-format json plus an image folder) under ``name``."""
    if evaluator_type not in ("coco", "lvis"):
        raise ValueError(f"dataset {name!r}: evaluator_type must be 'coco' or 'lvis', got {evaluator_type!r}")
    if split not in SPLITS:
        raise ValueError(f"dataset {name!r}: split must be one of {SPLITS}, got {split!r}")
    meta = DatasetMeta(name, str(json_file), str(image_root), evaluator_type, split, user=True)
    _USER[name] = meta
    return meta


def list_datasets() -> list[str]:
    """Names of all builtin and registered datasets."""
    return sorted(set(_BUILTIN) | set(_USER))


def get_dataset_meta(name: str, cfg: Any = None, check: bool = True) -> DatasetMeta:
    """Resolve ``name`` (cfg.DATASETS.CUSTOM, then registered, then builtin); ``check`` verifies the files exist."""
    custom = getattr(getattr(cfg, "DATASETS", None), "CUSTOM", None) or {}
    if name in custom:
        c = custom[name]
        missing = [k for k in ("JSON", "IMAGES") if not c.get(k)]
        if missing:
            raise ValueError(f"DATASETS.CUSTOM.{name} needs {' and '.join(missing)}: e.g. "
                             f"{{JSON: data/train.json, IMAGES: data/images}}")
        meta = DatasetMeta(name, str(c["JSON"]), str(c["IMAGES"]), str(c.get("TYPE", "coco")),
                           str(c.get("SPLIT", "all")), user=True)
        if meta.evaluator_type not in ("coco", "lvis") or meta.split not in SPLITS:
            raise ValueError(f"DATASETS.CUSTOM.{name}: TYPE must be coco or lvis and SPLIT one of {SPLITS}; got "
                             f"TYPE {meta.evaluator_type!r}, SPLIT {meta.split!r}")
    elif name in _USER:
        meta = _USER[name]
    elif name in _BUILTIN:
        js, img, typ, split = _BUILTIN[name]
        root = datasets_root(cfg)
        meta = DatasetMeta(name, str(root / js), str(root / img), typ, split)
    else:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(list_datasets())} "
                       f"(add your own with register_dataset() or DATASETS.CUSTOM)")
    if check:
        if not Path(meta.json_file).is_file():
            raise FileNotFoundError(f"dataset {name!r}: annotation file {meta.json_file} not found; {README_HINT}")
        if not Path(meta.image_root).is_dir():
            raise FileNotFoundError(f"dataset {name!r}: image folder {meta.image_root} not found; {README_HINT}")
    return meta
