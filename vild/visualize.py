"""Drawing detections: mask overlays, boxes, and "name score" labels that stay readable on any colour."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

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
    if isinstance(image, torch.Tensor):
        return image.detach().cpu().permute(1, 2, 0).numpy().astype(np.uint8)
    return np.asarray(image, dtype=np.uint8)


def draw_detections(image: object, boxes: torch.Tensor, labels: torch.Tensor, scores: Optional[torch.Tensor] = None,
                    names: Optional[Sequence[str]] = None, masks: Optional[torch.Tensor] = None,
                    mask_alpha: float = 0.45) -> np.ndarray:
    """Return an RGB uint8 H×W×3 copy of ``image`` ([3,H,W] tensor or H×W×3 array) with detections drawn."""
    canvas = _to_hwc(image).copy()
    h, w = canvas.shape[:2]
    order = torch.argsort(scores).tolist() if scores is not None and len(scores) else list(range(len(boxes)))
    if masks is not None and len(masks):
        m = masks.detach().cpu().bool()
        # each mask is blended inside the rows and columns it covers: a detection covers a small part of a
        # photo, and a boolean pass over the whole image per detection was most of the drawing time
        # (amax over the bytes, as torch's any over bools ran ~90x slower here)
        u = m.view(torch.uint8)
        rows, cols = u.amax(dim=2).numpy(), u.amax(dim=1).numpy()
        m = m.numpy()
        for i in order:  # lowest score first, so the best detections end up on top
            ys, xs = np.flatnonzero(rows[i]), np.flatnonzero(cols[i])
            if not len(ys):
                continue
            win = (slice(ys[0], ys[-1] + 1), slice(xs[0], xs[-1] + 1))
            sub, mi = canvas[win], m[i][win]
            c = np.array(color_for(labels[i]), dtype=np.float32)
            sub[mi] = (sub[mi] * (1 - mask_alpha) + c * mask_alpha).astype(np.uint8)
    pil = Image.fromarray(canvas)
    draw = ImageDraw.Draw(pil)
    width = max(1, round(max(h, w) / 400))
    font = ImageFont.load_default(size=max(10, round(max(h, w) / 60)))
    for i in order:
        x0, y0, x1, y1 = [float(v) for v in boxes[i]]
        color = color_for(labels[i])
        draw.rectangle([x0, y0, x1, y1], outline=color, width=width)
        text = names[i] if names is not None else str(int(labels[i]))
        if scores is not None:
            text = f"{text} {float(scores[i]):.2f}"
        l, t, r, b = draw.textbbox((0, 0), text, font=font)
        tw, th = r - l + 4, b - t + 4
        # above the box when there is room, else just inside it; never off the image
        ty = y0 - th if y0 - th >= 0 else min(y0, h - th)
        tx = min(max(x0, 0), max(w - tw, 0))
        draw.rectangle([tx, ty, tx + tw, ty + th], fill=color)
        draw.text((tx + 2 - l, ty + 2 - t), text, fill=text_color(color), font=font)
    return np.asarray(pil)
