"""Captioned single-object crops: the image-text pairs the tiny CLIP teacher is trained on.

Each pair is a crop around one shape (jittered box, 1x to 1.6x context, clutter and other
shapes around it) resized to the teacher's input size, with a caption naming the shape,
often its colour, size or background. Captions reuse the ViLD prompt templates so the text
tower reads category names inside the very sentences the detector's vocabulary uses.
"""
from __future__ import annotations

import re

import cv2
import numpy as np

from vild.synthetic.shapes import (CATEGORIES, CATEGORY_NAMES, COLORS, jitter_color, paint,
                                   random_angle, random_background, shape_mask)
from vild.teacher.templates import VILD_TEMPLATES, fill_template

_COLOR_NAMES = list(COLORS)
_DESCRIPTIVE = [
    "a {color} {name}.", "a {size} {color} {name}.", "a photo of a {color} {name}.",
    "a {name} on a {bg} background.", "a {color} {name} on a {bg} background.",
    "a {size} {name}.", "{color} {name}", "{name}", "a picture of a {size} {color} {name}.",
    "a drawing of a {color} {name}.", "a {color} {name} near a {other}.",
    "a {name} and a {other}.", "a {name} in the scene.", "the {color} {name}.",
]
_ARTICLE = re.compile(r"(^|\s)a ([aeiou])")
_SYNONYMS = {c.name: c.synonyms for c in CATEGORIES}


def _caption(rng: np.random.Generator, name: str, color: str, size: float, bg: str,
             other: str | None, template_share: float = 0.5) -> str:
    syn = _SYNONYMS[name]
    word = syn[int(rng.integers(len(syn)))] if rng.random() < 0.2 else name
    if rng.random() < template_share:
        return fill_template(VILD_TEMPLATES[int(rng.integers(len(VILD_TEMPLATES)))], word)
    choices = [t for t in _DESCRIPTIVE if other is not None or "{other}" not in t]
    t = choices[int(rng.integers(len(choices)))]
    size_word = "small" if size < 22 else ("large" if size > 36 else "medium")
    text = t.format(color=color, size=size_word, name=word, bg=bg, other=other or "")
    return _ARTICLE.sub(r"\1an \2", text)


def render_crop(rng: np.random.Generator, crop_size: int = 32, canvas: int = 80,
                size_range: tuple[float, float] = (12, 48),
                max_others: int = 1, template_share: float = 0.5) -> tuple[np.ndarray, str, int]:
    """One (RGB uint8 crop, caption, category index) sample."""
    img = random_background(rng, canvas, canvas)
    bg_mean = img.mean((0, 1))
    stripes = img[:, :, 0].std() > 9
    label = int(rng.integers(len(CATEGORY_NAMES)))
    name = CATEGORY_NAMES[label]
    size = float(rng.uniform(*size_range))
    center = canvas / 2 + rng.uniform(-3, 3, 2)
    others = []
    for _ in range(int(rng.integers(0, max_others + 1))):  # context at the crop's edges
        o = CATEGORY_NAMES[int(rng.integers(len(CATEGORY_NAMES)))]
        o_size = float(rng.uniform(*size_range))
        a = rng.uniform(0, 2 * np.pi)
        off = rng.uniform(0.8, 1.3) * (size + o_size) / 2 * np.array([np.cos(a), np.sin(a)])
        m = shape_mask(o, (canvas, canvas), tuple(center + off), o_size, random_angle(o, rng), rng)
        paint(img, m, jitter_color(COLORS[_COLOR_NAMES[int(rng.integers(12))]], rng), rng)
        others.append(o)
    mask = shape_mask(name, (canvas, canvas), tuple(center), size, random_angle(name, rng), rng)
    for _ in range(8):
        color = _COLOR_NAMES[int(rng.integers(len(_COLOR_NAMES)))]
        if np.linalg.norm(np.asarray(COLORS[color], np.float32) - bg_mean) > 90:
            break
    paint(img, mask, jitter_color(COLORS[color], rng), rng)
    ys, xs = np.nonzero(mask)
    box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)
    wh = box[2:] - box[:2]
    scale = rng.uniform(1.0, 1.6)  # the teacher sees 1x and 1.5x crops of detector boxes
    c = (box[:2] + box[2:]) / 2 + rng.normal(0, 0.08, 2) * wh
    half = wh * scale / 2 * rng.uniform(0.9, 1.1, 2)
    x0, y0 = np.clip(np.floor(c - half), 0, canvas - 2).astype(int)
    x1, y1 = np.clip(np.ceil(c + half), [x0 + 2, y0 + 2], canvas).astype(int)
    crop = np.clip(np.rint(img[y0:y1, x0:x1]), 0, 255).astype(np.uint8)
    shrink = crop.shape[0] * crop.shape[1] > crop_size * crop_size  # like roi_align averaging
    crop = cv2.resize(crop, (crop_size, crop_size),
                      interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    bright = "dark" if bg_mean.mean() < 100 else "light"
    bg = ("striped" if stripes else ["noisy", "plain", bright][int(rng.integers(3))])
    other = others[-1] if others else None
    return crop, _caption(rng, name, color, size, bg, other, template_share), label


def scene_crops(rng: np.random.Generator, crop_size: int = 32, image_size: int = 128,
                template_share: float = 0.5) -> list[tuple[np.ndarray, str, int]]:
    """Captioned crops of every object of one freshly drawn scene: occlusion, neighbours and
    1x to 1.6x context as the detector's proposals show them (scenes are not the world's images)."""
    from vild.synthetic.world import render_scene  # world imports this module's neighbours
    img, instances = render_scene(rng, image_size)
    out = []
    for inst in instances:
        ys, xs = np.nonzero(inst.mask)
        box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)
        wh = np.maximum(box[2:] - box[:2], 2)
        c = (box[:2] + box[2:]) / 2 + rng.normal(0, 0.08, 2) * wh
        half = wh * rng.uniform(1.0, 1.6) / 2 * rng.uniform(0.9, 1.1, 2)
        x0, y0 = np.clip(np.floor(c - half), 0, image_size - 2).astype(int)
        x1, y1 = np.clip(np.ceil(c + half), [x0 + 2, y0 + 2], image_size).astype(int)
        crop = img[y0:y1, x0:x1]
        shrink = crop.shape[0] * crop.shape[1] > crop_size * crop_size
        crop = cv2.resize(crop, (crop_size, crop_size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        size = float(np.sqrt(inst.mask.sum()) * 1.3)
        bg = "noisy"
        out.append((crop, _caption(rng, inst.name, inst.color, size, bg, None, template_share),
                    CATEGORY_NAMES.index(inst.name)))
    return out


def make_caption_dataset(num: int, seed: int = 0, crop_size: int = 32, scene_share: float = 0.0,
                         template_share: float = 0.5, **kwargs) -> tuple[np.ndarray, list[str], np.ndarray]:
    """`num` captioned crops as (uint8 [N, S, S, 3] RGB, captions, labels int64 [N]).

    A ``scene_share`` of them are objects cropped from cluttered scenes, the rest single rendered shapes
    (``kwargs`` go to ``render_crop``); a ``template_share`` of all captions are prompt templates.
    """
    rng = np.random.default_rng([seed, 2024])
    images = np.empty((num, crop_size, crop_size, 3), np.uint8)
    captions, labels = [], np.empty(num, np.int64)
    k, pool = 0, []
    while k < num:
        if rng.random() < scene_share:
            if not pool:
                pool = scene_crops(rng, crop_size, template_share=template_share)
            if not pool:
                continue
            sample = pool.pop()
        else:
            sample = render_crop(rng, crop_size, template_share=template_share, **kwargs)
        images[k], cap, labels[k] = sample
        captions.append(cap)
        k += 1
    return images, captions, labels
