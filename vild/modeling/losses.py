"""Losses of the ViLD RoI head: classification against text, class-agnostic boxes, CLIP distillation."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy over background (label 0) + training vocabulary (labels 1..K)."""
    return F.cross_entropy(logits.float(), labels)


def box_regression_loss(deltas: torch.Tensor, target_deltas: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 on foreground RoIs, normalised by the number of sampled RoIs (torchvision's convention)."""
    # a mask instead of boolean indexing, which needs the foreground count on the host (a GPU sync);
    # background targets can be infinite (encoded against an empty image's zero boxes), so they are
    # replaced, not multiplied by zero
    fg = (labels > 0).unsqueeze(1)
    target = torch.where(fg, target_deltas.float(), 0.0)
    per_coord = F.smooth_l1_loss(deltas.float(), target, beta=1 / 9, reduction="none")
    return torch.where(fg, per_coord, 0.0).sum() / max(labels.numel(), 1)


def distillation_loss(region: torch.Tensor, clip: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """L1 between normalised region and CLIP embeddings: summed over dims, averaged over valid boxes."""
    if region.numel() == 0:
        return region.sum() * 0.0
    # no early exit on "no valid box": asking would wait for the GPU; the masked mean is 0 then anyway
    region = F.normalize(region.float(), dim=-1)
    clip = F.normalize(clip.float(), dim=-1)
    per_box = (region - clip).abs().sum(dim=-1)
    return (per_box * valid).sum() / valid.sum().clamp_min(1)
