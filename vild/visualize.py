"""Drawing detections: mask overlays, boxes, and "name score" labels that stay readable on any colour."""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import cv2
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .utils.mask_bounds import mask_bounds

# Tableau-20-like palette: distinct hues, none too pale for a white label background
PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
    (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (219, 219, 141),
    (158, 218, 229), (57, 59, 121),
]


def color_for(label: int) -> tuple[int, int, int]:
    """A stable colour per category index."""
    return PALETTE[int(label) % len(PALETTE)]


def text_color(bg: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever contrasts more with ``bg`` (WCAG relative luminance)."""
    def lin(c: int) -> float:
        c = c / 255.0
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4
    lum = 0.2126 * lin(bg[0]) + 0.7152 * lin(bg[1]) + 0.0722 * lin(bg[2])
    # contrast with black is (L+0.05)/0.05, with white 1.05/(L+0.05); equal where L ≈ 0.179
    return (0, 0, 0) if lum > 0.179 else (255, 255, 255)


def _to_hwc(image: object) -> np.ndarray:
    """A writable H×W×3 uint8 copy of a [3,H,W] tensor or an H×W×3 array."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        hwc = image.permute(1, 2, 0).numpy()
        if image.dtype == torch.uint8 and not hwc.flags.c_contiguous:
            # planes → interleaved pixels: OpenCV's merge is ~30x faster than numpy's strided copy
            return cv2.merge([plane.numpy() for plane in image])
        return hwc.astype(np.uint8)  # astype copies
    return np.array(image, dtype=np.uint8)


def _as_list(values: object) -> list:
    """Tensor and array values as Python numbers in one call (iterating a tensor makes a tensor per value)."""
    return values.tolist() if isinstance(values, (torch.Tensor, np.ndarray)) else list(values)


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


@functools.lru_cache(maxsize=4096)
def _label_mask(text: str, size: int) -> Image.Image:
    """The label's text as an "L" coverage image, 2 px of margin around it: rendered once per text and size."""
    font = _font(size)
    left, top, right, bottom = font.getbbox(text)
    mask = Image.new("L", (right - left + 4, bottom - top + 4), 0)
    ImageDraw.Draw(mask).text((2 - left, 2 - top), text, fill=255, font=font)
    return mask


def _overlay_masks(canvas: np.ndarray, masks: torch.Tensor, labels: list[int], order: list[int],
                   bounds: np.ndarray, alpha: float) -> None:
    """Blend each mask's colour into ``canvas`` in place; where masks overlap, the last in ``order`` shows."""
    covered = bounds[bounds[:, 1] > bounds[:, 0]]
    if not len(covered):
        return
    # one window around all masks; inside it, which colour (palette index + 1) shows at each pixel
    y0, y1, x0, x1 = (int(covered[:, 0].min()), int(covered[:, 1].max()), int(covered[:, 2].min()),
                      int(covered[:, 3].max()))
    win = canvas[y0:y1, x0:x1]
    top = np.zeros(win.shape[:2], dtype=np.uint8)
    fill = np.empty_like(top)
    m = masks.detach().cpu().bool().numpy().view(np.uint8)
    for i in order:
        a, b, c, d = (int(v) for v in bounds[i])
        if b <= a:
            continue
        box = (slice(a - y0, b - y0), slice(c - x0, d - x0))
        fill[box] = labels[i] % len(PALETTE) + 1
        cv2.copyTo(fill[box], m[i, a:b, c:d], top[box])  # later masks overwrite earlier ones
    lut = np.zeros((256, 1, 3), dtype=np.uint8)
    lut[1:len(PALETTE) + 1, 0] = PALETTE
    colours = cv2.LUT(cv2.merge([top, top, top]), lut)
    blended = cv2.addWeighted(win, 1 - alpha, colours, alpha, 0)
    cv2.copyTo(blended, top, win)


def render_detections(image: object, boxes: torch.Tensor, labels: torch.Tensor, scores: Optional[torch.Tensor] = None,
                      names: Optional[Sequence[str]] = None, masks: Optional[torch.Tensor] = None,
                      mask_alpha: float = 0.45, bounds: Optional[np.ndarray] = None) -> Image.Image:
    """A PIL copy of ``image`` ([3,H,W] tensor or H×W×3 array) with masks, boxes and "name score" labels drawn.

    Detections are drawn from the lowest score up, so the best end up on top; each masked pixel is blended once,
    with the colour of the best detection covering it. ``bounds``: the masks' ``mask_bounds``, if known.
    """
    canvas = _to_hwc(image)
    h, w = canvas.shape[:2]
    label_list = [int(v) for v in _as_list(labels)]
    score_list = [float(v) for v in _as_list(scores)] if scores is not None else None
    order = (sorted(range(len(score_list)), key=score_list.__getitem__) if score_list
             else list(range(len(boxes))))
    if masks is not None and len(masks):
        _overlay_masks(canvas, masks, label_list, order, mask_bounds(masks) if bounds is None else bounds,
                       mask_alpha)
    pil = Image.fromarray(canvas)
    draw = ImageDraw.Draw(pil)
    width = max(1, round(max(h, w) / 400))
    size = max(10, round(max(h, w) / 60))
    box_list = [[float(v) for v in b] for b in _as_list(boxes)]
    for i in order:
        x0, y0, x1, y1 = box_list[i]
        color = color_for(label_list[i])
        draw.rectangle([x0, y0, x1, y1], outline=color, width=width)
        text = names[i] if names is not None else str(label_list[i])
        if score_list is not None:
            text = f"{text} {score_list[i]:.2f}"
        label = _label_mask(text, size)
        tw, th = label.size
        # above the box when there is room, else just inside it; never off the image
        ty = round(y0 - th if y0 - th >= 0 else min(y0, h - th))
        tx = round(min(max(x0, 0), max(w - tw, 0)))
        draw.rectangle([tx, ty, tx + tw - 1, ty + th - 1], fill=color)
        pil.paste(text_color(color), (tx, ty), label)
    return pil


def draw_detections(image: object, boxes: torch.Tensor, labels: torch.Tensor, scores: Optional[torch.Tensor] = None,
                    names: Optional[Sequence[str]] = None, masks: Optional[torch.Tensor] = None,
                    mask_alpha: float = 0.45) -> np.ndarray:
    """Return an RGB uint8 H×W×3 copy of ``image`` ([3,H,W] tensor or H×W×3 array) with detections drawn."""
    return np.asarray(render_detections(image, boxes, labels, scores, names, masks, mask_alpha))
