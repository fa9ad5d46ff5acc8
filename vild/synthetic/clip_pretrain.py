"""Contrastive pretraining of the tiny CLIP teacher on captioned crops, and its zero-shot accuracy.

    from vild.synthetic.clip_pretrain import pretrain_teacher
    metrics = pretrain_teacher("output/teacher/vild-tiny-clip.pt", seed=0)
    open_clip.create_model("vild-tiny-clip", pretrained="output/teacher/vild-tiny-clip.pt")
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from vild.synthetic.captions import make_caption_dataset
from vild.synthetic.shapes import CATEGORIES, NOVEL_NAMES
from vild.utils.atomic import atomic_save

MODEL_NAME = "vild-tiny-clip"
MODEL_CONFIG_DIR = Path(__file__).resolve().parents[1] / "teacher" / "model_configs"
logger = logging.getLogger(__name__)


def register_model_configs() -> None:
    """Make open_clip see vild's model JSONs (idempotent; vild.teacher also does it on import)."""
    if MODEL_NAME not in open_clip.list_models():
        open_clip.add_model_config(MODEL_CONFIG_DIR)


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over normalised image/text features (standard CLIP loss)."""
    logits = logit_scale * img @ txt.t()
    target = torch.arange(len(img), device=img.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def _normalizer(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
    mean = cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)
    std = cfg.get("std", open_clip.OPENAI_DATASET_STD)
    return torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        # CLIP practice: no decay on gains, biases, embeddings and the temperature
        (no_decay if p.ndim < 2 or "embedding" in n or "logit_scale" in n else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def pretrain_teacher(out_path: str, seed: int = 0, steps: int = 600, batch_size: int = 128,
                     lr: float = 3e-3, weight_decay: float = 0.05, warmup: int = 40,
                     num_pairs: int = 16000, threads: int | None = 2,
                     model_name: str = MODEL_NAME, eval_samples: int = 1400,
                     log_every: int = 50, max_logit_scale: float = 100.0,
                     template_share: float = 0.8, scene_share: float = 0.5, crop_size: int = 32) -> dict:
    """Train the tiny teacher contrastively, save its state_dict to out_path; return metrics.

    ``crop_size``: side of the captioned crops, the model's input size (vild-tiny-clip: 32; -64: 64).
    """
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    register_model_configs()
    t0 = time.time()
    images, captions, _ = make_caption_dataset(num_pairs, seed=seed, crop_size=crop_size,
                                               template_share=template_share, scene_share=scene_share)
    gen_s = time.time() - t0
    model = open_clip.create_model(model_name, pretrained=None)
    tokenizer = open_clip.get_tokenizer(model_name)
    tokens = tokenizer(captions)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    mean, std = _normalizer(model)
    opt = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98),
                            eps=1e-6)
    g = torch.Generator().manual_seed(seed)
    model.train()
    losses, t1 = [], time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup)
        idx = torch.randint(len(pixels), (batch_size,), generator=g)
        x = pixels[idx].float() / 255.0
        flip = torch.rand(batch_size, generator=g) < 0.5  # mirror images keep their caption
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        img_f, txt_f, scale = model((x - mean) / std, tokens[idx])[:3]
        loss = clip_loss(img_f, txt_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(max_logit_scale))
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            el = time.time() - t1
            logger.info("teacher step %d/%d loss %.3f lr %.2e %.3fs/step eta %.0fs", step + 1,
                        steps, np.mean(losses[-log_every:]), opt.param_groups[0]["lr"],
                        el / (step + 1), el / (step + 1) * (steps - step - 1))
    train_s = time.time() - t1
    model.eval()
    # fp16 on disk halves the file (it ships as a test asset); every later use, training included, loads
    # this rounded copy into fp32, so the teacher identity (weights sha256) is the same everywhere
    atomic_save({k: v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu()
                 for k, v in model.state_dict().items()}, out_path)
    metrics = {"loss_first": float(np.mean(losses[:10])), "loss_last": float(np.mean(losses[-10:])),
               "steps": steps, "batch_size": batch_size, "gen_s": gen_s, "train_s": train_s,
               "step_s": train_s / max(1, steps), "path": str(out_path)}
    if eval_samples:
        crops, _, labels = make_caption_dataset(eval_samples, seed=seed + 1000, crop_size=crop_size)
        metrics.update({f"crop_acc_{k}": v for k, v in zero_shot_accuracy(
            model, (crops, labels), model_name=model_name).items()})
    logger.info("teacher done: %s", metrics)
    return metrics


@torch.no_grad()
def _text_embeddings(model: torch.nn.Module, tokenizer, names: Sequence[Sequence[str]]):
    from vild.teacher.templates import VILD_TEMPLATES, fill_template

    out = []
    for syns in names:
        prompts = [fill_template(t, s) for s in syns for t in VILD_TEMPLATES]
        e = F.normalize(model.encode_text(tokenizer(prompts)), dim=-1).mean(0)
        out.append(F.normalize(e, dim=-1))
    return torch.stack(out)


def _world_json(world: dict | str, split: str) -> tuple[str, dict]:
    """Path and contents of a world split's LVIS JSON, given a world dict, that JSON or world_info.json."""
    import json

    path = world if isinstance(world, str) else world[f"lvis_{split}"]
    with open(path) as f:
        data = json.load(f)
    if "annotations" not in data:  # world_info.json: paths in it are relative to its folder
        path = os.path.join(os.path.dirname(os.path.abspath(path)), data[f"lvis_{split}"])
        with open(path) as f:
            data = json.load(f)
    return path, data


def _load_world_boxes(world: dict | str, split: str, names: list[str], max_images: int | None):
    """Images (uint8 3xHxW), xyxy boxes and label indices of a world split's LVIS JSON."""
    import cv2

    path, data = _world_json(world, split)
    cat_name = {c["id"]: c["name"] for c in data["categories"]}
    by_image: dict[int, list] = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    root = os.path.dirname(os.path.abspath(path))
    images, boxes, labels = [], [], []
    for im in data["images"][:max_images]:
        anns = [a for a in by_image.get(im["id"], []) if cat_name[a["category_id"]] in names]
        if not anns:
            continue
        bgr = cv2.imread(os.path.join(root, im["coco_url"]), cv2.IMREAD_COLOR)
        images.append(torch.from_numpy(np.ascontiguousarray(bgr[:, :, ::-1])).permute(2, 0, 1))
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32)
        boxes.append(torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1))
        labels += [names.index(cat_name[a["category_id"]]) for a in anns]
    return images, boxes, torch.tensor(labels)


@torch.no_grad()
def zero_shot_accuracy(teacher: Any, world_or_crops: Any, names: Sequence | None = None,
                       novel_names: Sequence[str] = NOVEL_NAMES, split: str = "val",
                       max_images: int | None = None, model_name: str = MODEL_NAME) -> dict:
    """Top-1 accuracy (base/novel/all) classifying held-out objects against category names.

    `teacher`: a `vild.teacher.CLIPTeacher` or a bare open_clip model. `world_or_crops`: a
    world dict / LVIS JSON path (boxes of that split through `embed_regions`, 1x and 1.5x
    crops: exactly the detector's distillation targets; CLIPTeacher only), or crops as
    (uint8 [N, S, S, 3] RGB, labels [N]). `names`: synonym lists, default all categories.
    """
    names = [list(c.synonyms) for c in CATEGORIES] if names is None else \
        [[n] if isinstance(n, str) else list(n) for n in names]
    display = [n[0] for n in names]
    is_teacher = hasattr(teacher, "embed_regions")
    if is_teacher:
        text = teacher.encode_text(names)
    else:
        text = _text_embeddings(teacher.eval(), open_clip.get_tokenizer(model_name), names)
    if isinstance(world_or_crops, (dict, str)):
        if not is_teacher:
            raise TypeError("world boxes need a vild.teacher.CLIPTeacher (embed_regions)")
        images, boxes, labels = _load_world_boxes(world_or_crops, split, display, max_images)
        img = torch.cat(teacher.embed_regions(images, boxes))
    else:
        crops, labels = world_or_crops
        x = torch.from_numpy(np.asarray(crops)).permute(0, 3, 1, 2).float() / 255.0
        labels = torch.as_tensor(np.asarray(labels))
        if is_teacher:
            img = teacher.embed_crops(x)
        else:
            mean, std = _normalizer(teacher)
            img = F.normalize(teacher.encode_image((x - mean) / std), dim=-1)
    pred = (img @ text.t()).argmax(1)
    novel = torch.tensor([display[int(i)] in novel_names for i in labels], dtype=torch.bool)
    ok = (pred == labels).float()
    return {"all": float(ok.mean()), "base": float(ok[~novel].mean()) if (~novel).any() else 0.0,
            "novel": float(ok[novel].mean()) if novel.any() else 0.0, "n": int(len(ok))}


def region_zero_shot_accuracy(weights: str, world: dict | str, model_name: str = MODEL_NAME,
                              split: str = "val", cache_dir: str | None = None,
                              novel_names: Sequence[str] | None = None) -> dict:
    """Zero-shot accuracy of saved teacher weights on a world split's boxes via CLIPTeacher.

    The categories are the JSON's (name and synonyms); ``novel_names`` is the novel group, by default the
    categories whose LVIS ``frequency`` is ``r``; the result names it (``novel_names``).
    """
    from vild.teacher import CLIPTeacher

    _, data = _world_json(world, split)
    cats = sorted(data["categories"], key=lambda c: c["id"])
    names = [[c["name"], *[s for s in c.get("synonyms", []) if s != c["name"]]] for c in cats]
    if novel_names is None:
        novel_names = [c["name"] for c in cats if c.get("frequency") == "r"]
    unknown = sorted(set(novel_names) - {c["name"] for c in cats})
    if unknown:
        raise ValueError(f"novel names {unknown} are not categories of the {split} JSON; its categories: "
                         f"{', '.join(c['name'] for c in cats)}")
    register_model_configs()
    teacher = CLIPTeacher(model_name, weights, device="cpu", templates="vild", cache_dir=cache_dir)
    acc = zero_shot_accuracy(teacher, world, names=names, novel_names=list(novel_names), split=split)
    return {**acc, "novel_names": list(novel_names)}
