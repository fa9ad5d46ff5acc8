"""A picture of what the demo is about: a model trained on base shapes finds novel ones by name."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..api import Detector
from ..io import read_image
from ..visualize import draw_detections


def novel_val_images(world: dict, count: int) -> list[Path]:
    """Held-out images holding the most novel objects (ties by id, so the choice is deterministic)."""
    data = json.loads(Path(world["lvis_val"]).read_text())
    novel = {c["id"] for c in data["categories"] if c["frequency"] == "r"}
    per_image: dict[int, int] = {}
    for a in data["annotations"]:
        per_image[a["image_id"]] = per_image.get(a["image_id"], 0) + (a["category_id"] in novel)
    best = sorted((-n, i) for i, n in per_image.items() if n > 0)[:count]
    files = {im["id"]: im["file_name"] for im in data["images"]}
    return [Path(world["images_val"]) / Path(files[i]).name for _, i in best]


def save_novel_picture(weights: str | Path, world: dict, out: str | Path, count: int = 8, scale: int = 3,
                       columns: int = 4) -> Path:
    """Detect only the novel category names on held-out images and tile the annotated images into one PNG."""
    det = Detector.from_checkpoint(weights, device="cpu")
    det.set_vocabulary(world["novel_names"])
    det.score_thresh = det.display_score_thresh
    tiles = []
    for path in novel_val_images(world, count):
        r = det(str(path))
        img = read_image(path)
        big = F.interpolate(img[None].float(), scale_factor=scale, mode="nearest")[0].to(torch.uint8)
        masks = F.interpolate(r.masks[None].float(), scale_factor=scale, mode="nearest")[0].bool() \
            if len(r.masks) else r.masks
        tiles.append(draw_detections(big, r.boxes * scale, r.labels, r.scores, r.names, masks))
    while len(tiles) % columns:
        tiles.append(np.full_like(tiles[0], 255))
    rows = [np.concatenate(tiles[i:i + columns], axis=1) for i in range(0, len(tiles), columns)]
    grid = np.concatenate(rows, axis=0)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    return out
