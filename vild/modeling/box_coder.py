"""Box regression targets: boxes as offsets from reference boxes, and back (the R-CNN parametrisation).

A box (x0, y0, x1, y1) relative to a reference of centre (cx, cy) and size (w, h) is
``(wx * (x - cx) / w, wy * (y - cy) / h, ww * log(W / w), wh * log(H / h))`` for its own centre (x, y) and size
(W, H). The arithmetic, and its order, is torchvision's ``BoxCoder`` (tests/test_torchvision_parts.py compares
them number for number), kept here because torchvision holds it in a private module.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

# exp() of a larger width or height offset would grow a box over 1000/16 = 62.5 times its reference
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


class BoxCoder:
    """Encodes boxes as offsets from reference boxes and decodes offsets back to boxes, with weights (wx, wy, ww, wh)."""

    def __init__(self, weights: tuple[float, float, float, float], scale_clamp: float = DEFAULT_SCALE_CLAMP):
        self.weights = weights
        self.scale_clamp = scale_clamp

    def encode_single(self, boxes: Tensor, references: Tensor) -> Tensor:
        """Offsets [N, 4] of ``boxes`` [N, 4] from ``references`` [N, 4] (both xyxy)."""
        w = torch.as_tensor(self.weights, dtype=boxes.dtype, device=boxes.device)
        ref_w = references[:, 2:3] - references[:, 0:1]
        ref_h = references[:, 3:4] - references[:, 1:2]
        ref_cx = references[:, 0:1] + 0.5 * ref_w
        ref_cy = references[:, 1:2] + 0.5 * ref_h
        box_w = boxes[:, 2:3] - boxes[:, 0:1]
        box_h = boxes[:, 3:4] - boxes[:, 1:2]
        box_cx = boxes[:, 0:1] + 0.5 * box_w
        box_cy = boxes[:, 1:2] + 0.5 * box_h
        return torch.cat((w[0] * (box_cx - ref_cx) / ref_w, w[1] * (box_cy - ref_cy) / ref_h,
                          w[2] * torch.log(box_w / ref_w), w[3] * torch.log(box_h / ref_h)), dim=1)

    def decode_single(self, offsets: Tensor, references: Tensor) -> Tensor:
        """Boxes [N, 4k] from ``offsets`` [N, 4k] (k boxes per reference) and ``references`` [N, 4], in the
        offsets' dtype."""
        references = references.to(offsets.dtype)
        ref_w = references[:, 2] - references[:, 0]
        ref_h = references[:, 3] - references[:, 1]
        ref_cx = references[:, 0] + 0.5 * ref_w
        ref_cy = references[:, 1] + 0.5 * ref_h
        wx, wy, ww, wh = self.weights
        dx, dy = offsets[:, 0::4] / wx, offsets[:, 1::4] / wy
        dw = torch.clamp(offsets[:, 2::4] / ww, max=self.scale_clamp)
        dh = torch.clamp(offsets[:, 3::4] / wh, max=self.scale_clamp)
        cx = dx * ref_w[:, None] + ref_cx[:, None]
        cy = dy * ref_h[:, None] + ref_cy[:, None]
        half_w = 0.5 * (torch.exp(dw) * ref_w[:, None])
        half_h = 0.5 * (torch.exp(dh) * ref_h[:, None])
        return torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=2).flatten(1)

    def decode(self, offsets: Tensor, references: list[Tensor]) -> Tensor:
        """Boxes [N, k, 4] for ``offsets`` [N, 4k] against the references of all images, concatenated (N rows)."""
        count = sum(r.size(0) for r in references)
        if count > 0:
            offsets = offsets.reshape(count, -1)
        boxes = self.decode_single(offsets, torch.cat(references, dim=0))
        return boxes.reshape(count, -1, 4) if count > 0 else boxes
