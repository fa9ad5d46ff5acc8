"""Bringing images into the network (normalise, resize at test time, pad into a batch) and results back out."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.image_list import ImageList

from .postprocess import paste_masks


class ImagePreprocessor(nn.Module):
    """Normalise 0..255 RGB images, resize the longest side to ``test_size`` in eval mode, pad and batch.

    Training images arrive already augmented to their final size (see ``vild.data.transforms``),
    so nothing is resized then.
    """

    def __init__(self, pixel_mean: list[float], pixel_std: list[float], test_size: int, size_divisibility: int = 32):
        super().__init__()
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(3, 1, 1), persistent=False)
        self.test_size = test_size
        self.size_divisibility = size_divisibility

    def forward(self, images: list[torch.Tensor]) -> tuple[ImageList, list[tuple[int, int]]]:
        """Return the padded batch and each image's original (H, W)."""
        original_sizes, out = [], []
        for img in images:
            if img.dim() != 3 or img.shape[0] != 3:
                raise ValueError(f"images must be [3, H, W] RGB tensors; got shape {tuple(img.shape)}")
            original_sizes.append((int(img.shape[-2]), int(img.shape[-1])))
            x = (img.to(self.pixel_mean.device, torch.float32) - self.pixel_mean) / self.pixel_std
            if not self.training and self.test_size > 0:
                scale = self.test_size / max(x.shape[-2:])
                if scale != 1.0:
                    size = (max(1, round(x.shape[-2] * scale)), max(1, round(x.shape[-1] * scale)))
                    # shrinking filters like training's resizes (antialias=True): plain bilinear reads 2x2 pixels
                    # per output pixel, so a photo's pixel-level detail and noise would alias into the input
                    x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False,
                                      antialias=scale < 1)[0]
            out.append(x)
        sizes = [(int(x.shape[-2]), int(x.shape[-1])) for x in out]
        d = self.size_divisibility
        h = int(math.ceil(max(s[0] for s in sizes) / d) * d)
        w = int(math.ceil(max(s[1] for s in sizes) / d) * d)
        batch = out[0].new_zeros((len(out), 3, h, w))
        for b, x in zip(batch, out):
            b[:, : x.shape[-2], : x.shape[-1]].copy_(x)
        return ImageList(batch, sizes), original_sizes

    @staticmethod
    def postprocess(results: list[dict], image_sizes: list, original_sizes: list, mask_threshold: float = 0.5,
                    paste: bool = True) -> list[dict]:
        """Rescale boxes to the original images and paste masks there (bool [n, H, W])."""
        for r, (h, w), (oh, ow) in zip(results, image_sizes, original_sizes):
            # scalar multiplies: no small host-to-device copy per image
            b = r["boxes"].clone()
            b[:, 0::2] *= ow / w
            b[:, 1::2] *= oh / h
            r["boxes"] = b
            if "mask_probs" in r and paste:
                r["masks"] = paste_masks(r.pop("mask_probs"), r["boxes"], oh, ow, mask_threshold)
        return results
