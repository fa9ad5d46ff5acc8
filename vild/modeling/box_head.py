"""The ViLD box head: conv/fc stack → projection to the CLIP space (L2-normalised) and class-agnostic box deltas."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead


def conv_input(x: torch.Tensor) -> torch.Tensor:
    """Pooled RoI features in the layout the conv stacks run fastest in: channels-last on the CPU.

    Measured on one core: the 4-conv heads ran ~25 % faster (1000 RoIs at 7x7: 1.07 s vs 1.38 s;
    300 at 14x14: 1.34 s vs 1.80 s). Values are unchanged; GPUs keep the default layout (not measured).
    """
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" and x.dim() == 4 else x


class ViLDBoxHead(nn.Module):
    """Pooled RoI features → (region embedding [R, D] with unit norm, box deltas [R, 4] or None)."""

    def __init__(self, in_channels: int, resolution: int, num_conv: int, conv_dim: int, num_fc: int, fc_dim: int,
                 embed_dim: int, norm_layer: type[nn.Module] | None, with_box_regression: bool = True):
        super().__init__()
        self.stack = FastRCNNConvFCHead((in_channels, resolution, resolution), [conv_dim] * num_conv,
                                        [fc_dim] * num_fc, norm_layer=norm_layer)
        self.has_conv = num_conv > 0
        self.projection = nn.Linear(fc_dim, embed_dim)
        self.bbox_pred = nn.Linear(fc_dim, 4) if with_box_regression else None
        if self.bbox_pred is not None:
            nn.init.normal_(self.bbox_pred.weight, std=0.001)
            nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embed pooled RoI features."""
        x = self.stack(conv_input(pooled) if self.has_conv else pooled)
        emb = F.normalize(self.projection(x), dim=-1)
        deltas = self.bbox_pred(x) if self.bbox_pred is not None else None
        return emb, deltas
