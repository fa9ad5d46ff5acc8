#!/usr/bin/env python
"""Write COCO OVD annotation files (the 65 categories of the 48 base / 17 novel split).

    python datasets/prepare_coco_ovd.py [--root datasets]

reads  coco/annotations/instances_{train,val}2017.json under the root and writes
       coco/annotations/instances_{train,val}2017_ovd.json next to them:
categories and annotations of the 15 dropped classes removed, each category marked
"split": "base" | "novel"; train: the novel categories' annotations removed too (as in the
OVR-CNN / Detic "seen" files: a tool that ignores the marker must not see a novel box);
val: images without any of the 65 classes removed.
The builtin datasets do not need these files (they apply the split on load); they are for
other tools or for a DATASETS.CUSTOM entry with SPLIT: coco_ovd.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from vild.data.splits import COCO_OVD_BASE, COCO_OVD_NOVEL, apply_split  # noqa: E402


def make_ovd(data: dict, train: bool) -> dict:
    """Return ``data`` restricted to the 65 OVD categories (train: annotated with the 48 base ones only)."""
    cats, base = apply_split(data["categories"], "coco_ovd")
    keep = {c["id"] for c, b in zip(cats, base) if b or not train}
    anns = [a for a in data["annotations"] if a["category_id"] in keep]
    images = data["images"]
    if not train:
        with_anns = {a["image_id"] for a in anns}
        images = [im for im in images if im["id"] in with_anns]
    cats = [{**c, "split": "base" if b else "novel"} for c, b in zip(cats, base)]
    return {**data, "images": images, "annotations": anns, "categories": cats}


def main() -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=os.environ.get("VILD_DATASETS", "datasets"), help="datasets root")
    args = ap.parse_args()
    ann_dir = Path(args.root) / "coco" / "annotations"
    for split in ("train", "val"):
        src = ann_dir / f"instances_{split}2017.json"
        if not src.is_file():
            sys.exit(f"{src} not found: download COCO 2017 annotations first (see datasets/README.md)")
        out = make_ovd(json.loads(src.read_text()), train=split == "train")
        dst = ann_dir / f"instances_{split}2017_ovd.json"
        tmp = dst.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(out))
        os.replace(tmp, dst)
        n_base = sum(c["split"] == "base" for c in out["categories"])
        print(f"{dst}: {len(out['images'])} images, {len(out['annotations'])} annotations, "
              f"{n_base} base + {len(out['categories']) - n_base} novel categories "
              f"(expected {len(COCO_OVD_BASE)} + {len(COCO_OVD_NOVEL)})")


if __name__ == "__main__":
    main()
