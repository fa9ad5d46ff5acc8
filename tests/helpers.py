"""Helpers the test modules share: tiny models, checkpoints, pictures, and the synthetic world's training options."""
import re
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vild.config import load_config
from vild.engine.trainer import save_training_checkpoint
from vild.modeling import build_model
from vild.teacher import CLIPTeacher
from vild.teacher.clip_teacher import sha256_file

DIM = 32


def tiny_model(variant="vild", **overrides):
    opts = ["MODEL.VILD.VARIANT", variant]
    for k, v in overrides.items():
        opts += [k, str(v)]
    torch.manual_seed(0)
    return build_model(load_config("tiny_test.yaml", opts))


def model_scene(h=96, w=160, seed=0):
    """One image with two coloured rectangles, plus its target."""
    g = torch.Generator().manual_seed(seed)
    img = (torch.rand(3, h, w, generator=g) * 60).to(torch.uint8)
    boxes = torch.tensor([[20.0, 10.0, 70.0, 50.0], [90.0, 40.0, 150.0, 90.0]])
    masks = torch.zeros(2, h, w, dtype=torch.uint8)
    for i, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
        masks[i, y0:y1, x0:x1] = 1
        img[i, y0:y1, x0:x1] = 230
    target = {"boxes": boxes, "labels": torch.tensor([0, 1]), "masks": masks}
    return img, target


def vocab(k=3, seed=1):
    return F.normalize(torch.randn(k, DIM, generator=torch.Generator().manual_seed(seed)), dim=-1)


TRAIN_VOCAB = [["circle"], ["square", "box"], ["triangle"]]


def make_checkpoint(folder: Path, name: str = "model_final.pth", relative_teacher: bool = False, seed: int = 0) -> Path:
    """A tiny random ViLD checkpoint whose micro CLIP teacher is saved beside it (stable, hashable weights)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = load_config("tiny_test.yaml", ["TEACHER.CACHE_DIR", str(folder / "cache")])
    torch.manual_seed(seed)
    CLIPTeacher.from_config(cfg).save_weights(folder / "teacher.pt")
    cfg.TEACHER.PRETRAINED = "teacher.pt" if relative_teacher else str(folder / "teacher.pt")
    identity = {"model": cfg.TEACHER.MODEL, "pretrained": str(folder / "teacher.pt"),
                "sha256": sha256_file(folder / "teacher.pt")}
    save_training_checkpoint(folder / name, cfg, build_model(cfg), None, 20, identity, TRAIN_VOCAB)
    return folder / name


def scene(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """An H×W×3 uint8 RGB picture: noise plus two solid shapes."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    a[5:25, 5:25] = (220, 30, 30)
    cv2.circle(a, (w - 18, h - 18), 12, (30, 30, 220), -1)
    return a


def write_test_images(folder: Path) -> dict:
    """Good and bad image files of every kind the reader must handle; returns name → path."""
    folder.mkdir(parents=True, exist_ok=True)
    p = {k: folder / k for k in ("color.png", "exif.jpg", "gray.png", "rgba.png", "deep.png", "truncated.jpg",
                                 "notes.jpg")}
    Image.fromarray(scene()).save(p["color.png"])
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    Image.fromarray(scene(32, 64, seed=1)).save(p["exif.jpg"], exif=exif)
    Image.fromarray(scene(seed=2)[..., 0]).save(p["gray.png"])
    rgba = np.zeros((48, 64, 4), np.uint8)
    rgba[:, :32] = (255, 0, 0, 0)  # fully transparent red: must come out white
    rgba[:, 32:] = (0, 200, 0, 255)
    Image.fromarray(rgba).save(p["rgba.png"])
    deep = np.zeros((48, 64), np.uint16)
    deep[:, :32], deep[:, 32:] = 65535, 100 * 257
    Image.fromarray(deep).save(p["deep.png"])
    Image.fromarray(scene(seed=3)).save(folder / "full.jpg")
    data = (folder / "full.jpg").read_bytes()
    p["truncated.jpg"].write_bytes(data[: len(data) // 2])
    (folder / "full.jpg").unlink()
    p["notes.jpg"].write_text("not a picture\n")
    return p


def world_opts(world, out_dir, variant="text", max_iter=4, **extra):
    """Config overrides that train the tiny model on the session's synthetic world (LVIS format)."""
    custom = {
        "synth_train": {"JSON": world["lvis_train"], "IMAGES": world["images_train"], "TYPE": "lvis", "SPLIT": "lvis"},
        "synth_val": {"JSON": world["lvis_val"], "IMAGES": world["images_val"], "TYPE": "lvis", "SPLIT": "lvis"},
    }
    opts = {
        "DATASETS.CUSTOM": custom, "DATASETS.TRAIN": ["synth_train"], "DATASETS.TEST": ["synth_val"],
        "MODEL.VILD.VARIANT": variant, "SOLVER.MAX_ITER": max_iter, "SOLVER.CHECKPOINT_PERIOD": 2,
        "SOLVER.LOG_PERIOD": 1, "OUTPUT_DIR": str(out_dir), "TEACHER.CACHE_DIR": str(out_dir.parent / "cache"),
        "TEACHER.PRETRAINED": str(out_dir.parent / "teacher.pt"),
        **extra,
    }
    flat = []
    for k, v in opts.items():
        flat += [k, repr(v) if not isinstance(v, str) else v]
    return flat


def resumed_at(out: Path) -> list[int]:
    """The iteration each resumed run of OUTPUT_DIR said it continued from (its log.txt), in order."""
    return [int(m) for m in re.findall(r"resuming from \S+ at iteration (\d+)", (out / "log.txt").read_text())]
