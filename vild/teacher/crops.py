"""Cutting box regions out of an image at the teacher's input size: ``roi_align``, or the same map as two matmuls.

``roi_align`` (aligned, adaptive sampling grid) averages ceil(box side / output side) bilinear samples per output
pixel along each axis. Each sample's weights are a product of a y weight and an x weight, so a crop is
``Ay @ image @ Ax.T`` with per-axis weight matrices ``Ay`` [S, H] and ``Ax`` [S, W]. On a GPU those matmuls run
on the tensor cores: ~1 TFLOP for 600 crops of a 1024-px image, against ``roi_align``'s scalar gathers (5 samples
per output pixel on average for boxes up to 60 % of such an image: up to 16 ms per image on an H200, next to
CLIP's 28 ms forward). On a CPU ``roi_align`` is 10x faster (64 crops of a 1024-px image: 0.13 s
against 1.3 s on one core).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.ops import roi_align

CROP_KERNELS = ("auto", "roi_align", "matmul")
# the matmul kernel's intermediate [boxes * S, C * W] is kept under this many elements (fp16 on CUDA: 512 MiB)
MATMUL_MAX_ELEMENTS = 1 << 28


def resolve_crop_kernel(kernel: str, device: torch.device) -> str:
    """``auto`` → ``matmul`` on CUDA, ``roi_align`` elsewhere; other names are checked and returned."""
    if kernel not in CROP_KERNELS:
        raise ValueError(f"unknown crop kernel {kernel!r}: use one of {', '.join(CROP_KERNELS)} "
                         f"(TEACHER.CROP_KERNEL)")
    if kernel == "auto":
        return "matmul" if device.type == "cuda" else "roi_align"
    return kernel


def crop_boxes(image: Tensor, boxes: Tensor, size: tuple[int, int], kernel: str = "roi_align") -> Tensor:
    """[n, C, h, w] crops of xyxy ``boxes`` (pixels, clipped to the image) from one float image [C, H, W].

    Both kernels compute ``roi_align(image, boxes, size, 1.0, sampling_ratio=-1, aligned=True)``. ``matmul`` runs
    in fp16 on CUDA: on normalised pixels, fp16 rounding moves crops by 2.5e-3 at most (2e-4 on average, simulated
    on the CPU for 1024-px boxes), less than the encoder's own bf16 rounding of its input (7e-3, 6e-4).
    """
    if kernel == "roi_align":
        return roi_align(image.unsqueeze(0), [boxes], size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    if kernel != "matmul":
        raise ValueError(f"unknown crop kernel {kernel!r}: use roi_align or matmul")
    c, h, w = image.shape
    dtype = torch.float16 if image.device.type == "cuda" else image.dtype
    rows = image.to(dtype).permute(1, 0, 2).reshape(h, c * w)  # [H, C*W]: one matmul applies Ay to all channels
    step = max(1, MATMUL_MAX_ELEMENTS // (size[0] * c * w))
    out = []
    for lo in range(0, len(boxes), step):
        b = boxes[lo:lo + step]
        ay = axis_weights(b[:, 1], b[:, 3], h, size[0]).to(dtype)
        ax = axis_weights(b[:, 0], b[:, 2], w, size[1]).to(dtype)
        t = (ay.reshape(-1, h) @ rows).view(len(b), size[0] * c, w)
        out.append((t @ ax.transpose(1, 2)).view(len(b), size[0], c, size[1]).permute(0, 2, 1, 3))
    if not out:
        return image.new_zeros(0, c, *size)
    return torch.cat(out) if len(out) > 1 else out[0]


def axis_weights(lo: Tensor, hi: Tensor, length: int, out: int) -> Tensor:
    """[n, out, length] float32: ``roi_align``'s weights along one axis for boxes spanning ``lo``..``hi`` (pixels).

    Follows torchvision's kernel: aligned boxes (shifted by half a pixel), ceil(side / out) samples per bin,
    a sample beyond a pixel outside the image counts as zero, one at the last pixel is clamped to it.
    """
    lo, hi = lo.float(), hi.float()
    side = hi - lo
    step = side / out
    samples = torch.ceil(side / out).view(-1, 1, 1)  # 0 for an empty box, which roi_align makes all zeros
    grid = samples.clamp(min=1)
    # boxes inside the image never need more samples per bin than this: a bound known without reading the boxes
    most = max(1, math.ceil(length / out))
    p = torch.arange(out, device=lo.device, dtype=torch.float32).view(1, out, 1)
    s = torch.arange(most, device=lo.device, dtype=torch.float32).view(1, 1, most)
    step = step.view(-1, 1, 1)
    pos = (lo - 0.5).view(-1, 1, 1) + p * step + (s + 0.5) * step / grid
    weight = ((s < samples) & (pos >= -1) & (pos <= length)).float() / grid
    pos = pos.clamp(min=0)
    low = pos.floor()
    edge = low >= length - 1
    low = torch.where(edge, torch.full_like(low, length - 1), low)
    frac = torch.where(edge, torch.zeros_like(pos), pos - low)
    low_i = low.long()
    high_i = (low_i + 1).clamp(max=length - 1)
    w_low, w_high = weight * (1 - frac), weight * frac
    a = torch.zeros(len(lo), out, length, device=lo.device)
    # one sample column per call: no two additions in a call hit the same entry, so the sums come out in a
    # fixed order (CUDA's scatter_add_ adds colliding entries atomically, in any order)
    for j in range(most):
        a.scatter_add_(2, low_i[..., j:j + 1], w_low[..., j:j + 1])
        a.scatter_add_(2, high_i[..., j:j + 1], w_high[..., j:j + 1])
    return a
