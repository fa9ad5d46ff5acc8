"""Turning class scores into detections, and low-resolution masks into image masks, without per-item loops."""
from __future__ import annotations

import torch
from torchvision.ops import batched_nms


def select_detections(boxes: torch.Tensor, scores: torch.Tensor, score_thresh: float, nms_thresh: float,
                      max_dets: int, topk_candidates: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class NMS over [R, 4] class-agnostic boxes and [R, K] scores; returns boxes, scores, labels.

    Only the ``topk_candidates`` best (box, class) pairs enter NMS (0 = all): with 1203 classes and
    score threshold 0 there are over a million candidates, and per-class NMS over all of them is
    what makes a naive post-process slow.
    """
    num_classes = scores.shape[1]
    flat = scores.flatten()
    keep = flat > score_thresh
    if topk_candidates > 0 and flat.numel() > topk_candidates:
        # top-k first (one kernel, no sync), then the threshold on the survivors
        cand_scores, idx = flat.topk(topk_candidates)
        keep = cand_scores > score_thresh
        cand_scores, idx = cand_scores[keep], idx[keep]
    else:
        idx = keep.nonzero().squeeze(1)
        cand_scores = flat[idx]
    box_idx = torch.div(idx, num_classes, rounding_mode="floor")
    labels = idx % num_classes
    cand_boxes = boxes[box_idx]
    keep = batched_nms(cand_boxes.float(), cand_scores.float(), labels, nms_thresh)[:max_dets]
    return cand_boxes[keep], cand_scores[keep], labels[keep]


def _paste_weights(lo: torch.Tensor, hi: torch.Tensor, size: int, length: int) -> torch.Tensor:
    """Bilinear weights [n, length, size] mapping a mask axis of ``size`` cells onto pixels [0, length)."""
    # pixel centres in mask-cell units, align_corners=False; cells outside the mask read as zero
    centers = torch.arange(length, device=lo.device, dtype=torch.float32) + 0.5
    scale = (hi - lo).clamp_min(1e-6) / size
    u = (centers[None, :] - lo[:, None]) / scale[:, None] - 0.5  # [n, length]
    cells = torch.arange(size, device=lo.device, dtype=torch.float32)
    return (1.0 - (u[:, :, None] - cells[None, None, :]).abs()).clamp_min(0.0)


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, height: int, width: int, threshold: float = 0.5,
                chunk: int = 64) -> torch.Tensor:
    """Paste [n, m, m] mask probabilities into boxes of an image at once: bool [n, height, width].

    Bilinear resampling is separable, so each pasted mask is Wy · M · Wxᵀ: two batched matmuls
    instead of one interpolation per detection; chunks bound the memory of the output.
    """
    n, m = masks.shape[0], masks.shape[-1]
    out = torch.zeros((n, height, width), dtype=torch.bool, device=masks.device)
    masks = masks.reshape(n, m, m).float()
    for s in range(0, n, chunk):
        b = boxes[s:s + chunk].float()
        wy = _paste_weights(b[:, 1], b[:, 3], m, height)
        wx = _paste_weights(b[:, 0], b[:, 2], m, width)
        out[s:s + chunk] = (wy @ masks[s:s + chunk] @ wx.transpose(1, 2)) >= threshold
    return out

