"""The synthetic open-vocabulary world: shape scenes exported as COCO and LVIS v1 datasets.

Usage::

    from vild.synthetic.world import generate_world
    world = generate_world("output/world", seed=0, num_train=600, num_val=150)
    world["lvis_train"], world["coco_val"]      # JSON paths; also "images_train", "images_val"
    world["base_names"], world["novel_names"]   # fixed split; novel have LVIS frequency "r"

Layout of `out_dir`: `images/{train,val}/NNNNNN.png` (RGB, `file_name` is relative to
`images/<split>`, `coco_url` relative to `out_dir`), `coco_{train,val}.json` (segmentation as
compressed RLE), `lvis_{train,val}.json` (segmentation as polygons that rasterise exactly to
the mask; holes via zero-width bridges), `world_info.json`. JSON files keep ALL annotations,
novel included: the training loader drops novel ones, as with LVIS rare. Everything is a pure
function of `seed` (byte-identical files). CLI: `python tools/make_world.py --out DIR`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import cv2
import numpy as np
import pycocotools.mask as mask_utils

from vild.synthetic.shapes import (CATEGORIES, CATEGORY_NAMES, COLORS, NOVEL_NAMES, jitter_color,
                                   paint, random_angle, random_background, shape_mask)
from vild.utils.atomic import atomic_write_json

GENERATOR_VERSION = "shapes-v1"
_PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 3]
_SPLIT_INDEX = {"train": 0, "val": 1}


@dataclass
class Instance:
    name: str
    color: str
    mask: np.ndarray  # uint8 {0,1}, visible part only (occlusion applied)


def _pick_color(rng: np.random.Generator, bg: np.ndarray, mask: np.ndarray) -> str:
    names = list(COLORS)
    local = bg[mask.astype(bool)].mean(0) if mask.any() else bg.mean((0, 1))
    for _ in range(8):  # keep shapes visible against their local background
        name = names[int(rng.integers(len(names)))]
        if np.linalg.norm(np.asarray(COLORS[name], np.float32) - local) > 90:
            return name
    return name


def render_scene(rng: np.random.Generator, image_size: int = 128, min_objects: int = 2,
                 max_objects: int = 6, size_range: tuple[float, float] = (14, 52),
                 min_visible: float = 0.5) -> tuple[np.ndarray, list[Instance]]:
    """Draw one scene: RGB uint8 image and its annotated (mostly visible) instances."""
    h = w = image_size
    img = random_background(rng, h, w)
    bg = img.copy()
    drawn: list[tuple[str, str, np.ndarray]] = []
    for _ in range(int(rng.integers(min_objects, max_objects + 1))):
        name = CATEGORY_NAMES[int(rng.integers(len(CATEGORY_NAMES)))]
        size = float(rng.uniform(*size_range))
        m = size * 0.35  # allow slight truncation at the border
        center = (float(rng.uniform(m, w - m)), float(rng.uniform(m, h - m)))
        mask = shape_mask(name, (h, w), center, size, random_angle(name, rng), rng)
        if mask.sum() < 20:
            continue
        color = _pick_color(rng, bg, mask)
        paint(img, mask, jitter_color(COLORS[color], rng), rng)
        drawn.append((name, color, mask))
    instances = []
    covered = np.zeros((h, w), np.uint8)
    for name, color, mask in reversed(drawn):  # later-drawn objects occlude earlier ones
        visible = mask & (1 - covered)
        if visible.sum() >= max(20, min_visible * mask.sum()):
            instances.append(Instance(name, color, visible))
        covered |= mask
    instances.reverse()
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), instances


def mask_to_polygons(mask: np.ndarray) -> list[list[float]]:
    """COCO polygons that rasterise (pycocotools) exactly to `mask`; holes bridged in."""
    up = cv2.resize(mask, None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
    contours, hier = cv2.findContours(up, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hier is None:
        return []
    hier = hier[0]
    polys = []
    for i, c in enumerate(contours):
        if hier[i][3] != -1:
            continue
        p = c.reshape(-1, 2).astype(np.float64)
        child = hier[i][2]
        while child != -1:  # even-odd rasterisation cancels the zero-width bridge
            q = contours[child].reshape(-1, 2).astype(np.float64)
            j = int(((p - q[0]) ** 2).sum(1).argmin())
            p = np.concatenate([p[: j + 1], q, q[:1], p[j:]])
            child = hier[child][0]
        if len(p) >= 3:
            polys.append([float(v) for v in (p / 2).ravel()])
    return polys


def _categories(train_counts: dict[str, tuple[int, int]]) -> list[dict]:
    base_by_images = sorted((n for n in CATEGORY_NAMES if n not in NOVEL_NAMES),
                            key=lambda n: (-train_counts[n][0], n))
    frequent = set(base_by_images[: len(base_by_images) // 2])  # so APc and APf both exist
    cats = []
    for i, c in enumerate(CATEGORIES):
        freq = "r" if c.name in NOVEL_NAMES else ("f" if c.name in frequent else "c")
        cats.append({"id": i + 1, "name": c.name, "synonyms": list(c.synonyms),
                     "def": c.definition, "synset": f"{c.name}.n.01", "frequency": freq,
                     "image_count": train_counts[c.name][0],
                     "instance_count": train_counts[c.name][1], "supercategory": "shape"})
    return cats


def _generate_split(out_dir: str, split: str, num: int, seed: int, image_size: int,
                    scene_kwargs: dict) -> tuple[list[dict], list[dict], list[dict], list[dict]]:
    img_dir = os.path.join(out_dir, "images", split)
    os.makedirs(img_dir, exist_ok=True)
    cat_id = {n: i + 1 for i, n in enumerate(CATEGORY_NAMES)}
    images, coco_anns, lvis_anns, present = [], [], [], []
    ann_id = 1
    for k in range(num):
        rng = np.random.default_rng([seed, _SPLIT_INDEX[split], k])
        img, instances = render_scene(rng, image_size, **scene_kwargs)
        image_id = k + 1
        fname = f"{image_id:06d}.png"
        cv2.imwrite(os.path.join(img_dir, fname), img[:, :, ::-1], _PNG_PARAMS)
        names_here = sorted({inst.name for inst in instances})
        absent = [cat_id[n] for n in CATEGORY_NAMES if n not in names_here]
        neg = sorted(int(v) for v in rng.choice(absent, size=min(3, len(absent)), replace=False))
        images.append({"id": image_id, "file_name": fname, "width": image_size,
                       "height": image_size, "coco_url": f"images/{split}/{fname}",
                       "not_exhaustive_category_ids": [], "neg_category_ids": neg})
        present.append(names_here)
        for inst in instances:
            rle = mask_utils.encode(np.asfortranarray(inst.mask))
            bbox = [float(v) for v in mask_utils.toBbox(rle)]
            common = {"id": ann_id, "image_id": image_id, "category_id": cat_id[inst.name],
                      "area": float(inst.mask.sum()), "bbox": bbox}
            coco_anns.append({**common, "iscrowd": 0, "segmentation": {
                "size": [image_size, image_size], "counts": rle["counts"].decode("ascii")}})
            lvis_anns.append({**common, "segmentation": mask_to_polygons(inst.mask)})
            ann_id += 1
    return images, coco_anns, lvis_anns, present


def generate_world(out_dir: str, seed: int = 0, num_train: int = 600, num_val: int = 150,
                   image_size: int = 128, min_objects: int = 2, max_objects: int = 6,
                   size_range: tuple[float, float] = (14, 52),
                   min_visible: float = 0.5) -> dict:
    """Write the world (images, COCO + LVIS JSON, world_info.json); return paths and split."""
    os.makedirs(out_dir, exist_ok=True)
    scene_kwargs = dict(min_objects=min_objects, max_objects=max_objects,
                        size_range=tuple(size_range), min_visible=min_visible)
    splits = {s: _generate_split(out_dir, s, n, seed, image_size, scene_kwargs)
              for s, n in (("train", num_train), ("val", num_val))}
    cat_id = {n: i + 1 for i, n in enumerate(CATEGORY_NAMES)}
    counts = {}
    for n in CATEGORY_NAMES:
        anns = [a for a in splits["train"][2] if a["category_id"] == cat_id[n]]
        counts[n] = (len({a["image_id"] for a in anns}), len(anns))
    lvis_cats = _categories(counts)
    coco_cats = [{"id": c["id"], "name": c["name"], "supercategory": "shape"} for c in lvis_cats]
    info = {"description": "vild synthetic shapes world", "version": GENERATOR_VERSION,
            "seed": seed}
    paths = {}
    for split, (images, coco_anns, lvis_anns, _) in splits.items():
        coco_images = [{k: im[k] for k in ("id", "file_name", "width", "height")}
                       for im in images]
        paths[f"coco_{split}"] = os.path.join(out_dir, f"coco_{split}.json")
        atomic_write_json(paths[f"coco_{split}"], {"info": info, "images": coco_images,
                                                   "annotations": coco_anns, "categories": coco_cats,
                                                   "licenses": []}, separators=(",", ":"))
        paths[f"lvis_{split}"] = os.path.join(out_dir, f"lvis_{split}.json")
        atomic_write_json(paths[f"lvis_{split}"], {"info": info, "images": images,
                                                   "annotations": lvis_anns, "categories": lvis_cats,
                                                   "licenses": []}, separators=(",", ":"))
        paths[f"images_{split}"] = os.path.join(out_dir, "images", split)
    world = {**paths, "out_dir": out_dir, "seed": seed, "generator_version": GENERATOR_VERSION,
             "image_size": image_size, "category_names": list(CATEGORY_NAMES),
             "novel_names": list(NOVEL_NAMES),
             "base_names": [n for n in CATEGORY_NAMES if n not in NOVEL_NAMES],
             "categories": lvis_cats, "num_train": num_train, "num_val": num_val}
    world["world_info"] = os.path.join(out_dir, "world_info.json")
    # paths relative to out_dir in the file, so it is byte-identical wherever it is written
    atomic_write_json(world["world_info"], {**world, "out_dir": ".", **{
        k: os.path.relpath(v, out_dir) for k, v in world.items()
        if k.startswith(("coco_", "lvis_", "images_", "world_info"))}}, separators=(",", ":"))
    return world
