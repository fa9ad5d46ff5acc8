"""The rows and columns each binary mask covers: drawing and RLE-encoding work inside them, not the whole image."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch


def _span(covered: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and one-past-last nonzero index along axis 1 of a uint8 [n, L] array; (0, 0) where all zero."""
    length = covered.shape[1]
    first = covered.argmax(axis=1)
    end = length - covered[:, ::-1].argmax(axis=1)
    empty = covered.max(axis=1, initial=0) == 0
    first[empty] = 0
    end[empty] = 0
    return first, end


def mask_bounds(masks: Any) -> np.ndarray:
    """Half-open bounds [n, 4] of (y0, y1, x0, x1) of each mask's nonzero pixels; all zero for an empty mask.

    ``masks``: [n, H, W] bool or uint8, a tensor or an array.
    """
    if isinstance(masks, torch.Tensor):
        m = masks.detach().cpu()
    else:
        a = np.asarray(masks)
        m = torch.from_numpy(a if a.flags.writeable else a.copy())  # torch warns on read-only arrays
    if m.dim() != 3:
        raise ValueError(f"masks must be [n, H, W]; got shape {tuple(m.shape)}")
    # amax over bytes: torch's any over bools ran ~90x slower
    u = m.view(torch.uint8) if m.dtype == torch.bool else (m != 0).view(torch.uint8)
    out = np.zeros((m.shape[0], 4), dtype=np.int64)
    if m.numel():
        out[:, 0], out[:, 1] = _span(u.amax(dim=2).numpy())
        out[:, 2], out[:, 3] = _span(u.amax(dim=1).numpy())
    return out
