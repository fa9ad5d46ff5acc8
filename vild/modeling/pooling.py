"""Which FPN level pools each RoI and at what scale, and RoIAlign over several levels in a traceable form.

The rules are those of torchvision's ``MultiScaleRoIAlign`` (FPN paper, eq. 1: level
``floor(4 + log2(sqrt(area) / 224))``, clamped to the levels there are; each map's scale is the power of two
nearest to its height over the largest image's), kept here because torchvision's own helpers for them are
private; tests/test_torchvision_parts.py compares the two.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_area


class LevelMapper:
    """The FPN level of each box, counted from the finest map (0), by the box's size."""

    def __init__(self, k_min: int, k_max: int, canonical_scale: int = 224, canonical_level: int = 4,
                 eps: float = 1e-6):
        self.k_min, self.k_max = k_min, k_max
        self.canonical_scale, self.canonical_level, self.eps = canonical_scale, canonical_level, eps

    def __call__(self, boxes: list[Tensor]) -> Tensor:
        """int64 [N]: the level index of every box of ``boxes`` (xyxy, concatenated in order)."""
        side = torch.sqrt(torch.cat([box_area(b) for b in boxes]))
        level = torch.floor(self.canonical_level + torch.log2(side / self.canonical_scale)
                            + torch.tensor(self.eps, dtype=side.dtype))
        return (torch.clamp(level, min=self.k_min, max=self.k_max).to(torch.int64) - self.k_min).to(torch.int64)


def level_scales(features: list[Tensor], image_sizes: list[tuple[int, int]], canonical_scale: int = 224,
                 canonical_level: int = 4) -> tuple[list[float], LevelMapper]:
    """Each feature map's scale against the batch's largest image (h, w), and the level mapper for those maps."""
    if not image_sizes:
        raise ValueError("no image sizes: pooling needs the batch's images")
    largest_h = max(h for h, _ in image_sizes)
    scales = []
    for f in features:
        # the scale is a power of two: the map's height over the image's, rounded in log2
        ratio = float(f.shape[-2]) / float(largest_h)
        scales.append(2 ** float(torch.tensor(ratio).log2().round()))
    finest = -torch.log2(torch.tensor(scales[0], dtype=torch.float32)).item()
    coarsest = -torch.log2(torch.tensor(scales[-1], dtype=torch.float32)).item()
    return scales, LevelMapper(int(finest), int(coarsest), canonical_scale, canonical_level)


def merge_levels(levels: Tensor, pooled: list[Tensor]) -> Tensor:
    """RoIs pooled level by level (``pooled[k]``: those with ``levels == k``, in order) back into RoI order, by
    scatter: a form an ONNX trace keeps dynamic."""
    first = pooled[0]
    out = torch.zeros((levels.size(0), first.size(1), first.size(2), first.size(3)), dtype=first.dtype,
                      device=first.device)
    for k, part in enumerate(pooled):
        rows = torch.where(levels == k)[0].view(-1, 1, 1, 1)
        out = out.scatter(0, rows.expand(rows.size(0), part.size(1), part.size(2), part.size(3)), part)
    return out
