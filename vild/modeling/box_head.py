"""The ViLD box head: conv/fc stack → projection to the CLIP space (L2-normalised) and class-agnostic box deltas."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead

from .conv_stack import run_conv_stack


class ViLDBoxHead(nn.Module):
    """Pooled RoI features → (region embedding [R, D] with unit norm, box deltas [R, 4] or None)."""

    def __init__(self, in_channels: int, resolution: int, num_conv: int, conv_dim: int, num_fc: int, fc_dim: int,
                 embed_dim: int, norm_layer: type[nn.Module] | None, with_box_regression: bool = True):
        super().__init__()
        self.stack = FastRCNNConvFCHead((in_channels, resolution, resolution), [conv_dim] * num_conv,
                                        [fc_dim] * num_fc, norm_layer=norm_layer)
        self.projection = nn.Linear(fc_dim, embed_dim)
        self.bbox_pred = nn.Linear(fc_dim, 4) if with_box_regression else None
        if self.bbox_pred is not None:
            nn.init.normal_(self.bbox_pred.weight, std=0.001)
            nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embed pooled RoI features."""
        x = run_conv_stack(self.stack, pooled)
        emb = F.normalize(self.projection(x), dim=-1)
        deltas = self.bbox_pred(x) if self.bbox_pred is not None else None
        return emb, deltas
