"""Matching boxes to ground truth and sampling foreground / background for a whole batch at once.

torchvision's Matcher and BalancedPositiveNegativeSampler run once per image and size their outputs by the
data (``nonzero``), which on a GPU makes the host wait for the device a few times per image. Here images are
padded to one [B, N] layout and sampled by random keys and ``topk``: the same distribution (a uniform subset
of min(#fg, fraction x batch) positives, the rest negatives), with no host synchronisation.

Shapes: B images, G ground-truth boxes and N candidate boxes per image after padding to the batch's largest
count; padding boxes are all -1 (``pad_boxes``) and never match or get sampled (``box_valid``).
"""
from __future__ import annotations

import torch
from torch import Tensor


def pad_boxes(boxes: list[Tensor]) -> Tensor:
    """[B, N, 4] boxes, rows past each image's own filled with -1 (a box no real one can be: see ``box_valid``)."""
    n = max(len(b) for b in boxes)
    if all(len(b) == n for b in boxes):
        return torch.stack(boxes)
    out = boxes[0].new_full((len(boxes), n, 4), -1.0)
    for i, b in enumerate(boxes):
        out[i, :len(b)] = b
    return out


def box_valid(padded: Tensor) -> Tensor:
    """[B, N] which rows of ``pad_boxes`` hold a box (boxes are clipped to the image, so x0 >= 0)."""
    return padded[..., 0] > -0.5


def batched_box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of [B, G, 4] and [B, N, 4] xyxy boxes: [B, G, N] (0 where a box has no area).

    Three [B, G, N] temporaries at most (no [B, G, N, 2] corner tensors): these matrices reach tens of
    millions of entries against an RPN's anchors.
    """
    area_a = (a[..., 2] - a[..., 0]).clamp(min=0) * (a[..., 3] - a[..., 1]).clamp(min=0)
    area_b = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    a, b = a[:, :, None], b[:, None]
    inter = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp_(min=0)
    inter *= (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp_(min=0)
    union = (area_a[:, :, None] + area_b[:, None, :]).sub_(inter).clamp_(min=torch.finfo(inter.dtype).tiny)
    return inter.div_(union)


def sample_balanced(positive: Tensor, negative: Tensor, batch_size: int, positive_fraction: float
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per image, a uniform random subset of min(#pos, batch x fraction) positives and of min(#neg, batch - that)
    negatives: (pos_idx [B, Kp], neg_idx [B, Kn], num_pos [B], num_neg [B]); row i's first num_pos[i]
    entries of pos_idx (and num_neg[i] of neg_idx) are the sample, the rest is filler.
    """
    n = positive.shape[1]
    max_pos = int(batch_size * positive_fraction)
    num_pos = positive.sum(1).clamp(max=max_pos)
    num_neg = torch.minimum(negative.sum(1), batch_size - num_pos)
    keys = torch.rand(positive.shape, device=positive.device)
    # the k largest of i.i.d. uniform keys are a uniform random k-subset; non-members get key -1 and sort last
    pos_idx = torch.where(positive, keys, -1.0).topk(min(max_pos, n), dim=1).indices
    neg_idx = torch.where(negative, keys, -1.0).topk(min(batch_size, n), dim=1).indices
    return pos_idx, neg_idx, num_pos, num_neg


def sampled_rows(pos_idx: Tensor, neg_idx: Tensor, num_pos: Tensor, width: int) -> Tensor:
    """[B, width] indices: each image's sampled positives, then its negatives (rows past the sample: filler)."""
    j = torch.arange(width, device=pos_idx.device)
    from_pos = j[None] < num_pos[:, None]
    pos = pos_idx.gather(1, j.clamp(max=pos_idx.shape[1] - 1).expand(len(pos_idx), -1))
    neg = neg_idx.gather(1, (j[None] - num_pos[:, None]).clamp(min=0, max=neg_idx.shape[1] - 1))
    return torch.where(from_pos, pos, neg)


def sampled_mask(pos_idx: Tensor, neg_idx: Tensor, num_pos: Tensor, num_neg: Tensor, n: int) -> Tensor:
    """[B, n] bool: which of n rows per image the sample took."""
    take_pos = torch.arange(pos_idx.shape[1], device=pos_idx.device)[None] < num_pos[:, None]
    take_neg = torch.arange(neg_idx.shape[1], device=neg_idx.device)[None] < num_neg[:, None]
    mask = torch.zeros((len(pos_idx), n), dtype=torch.bool, device=pos_idx.device)
    mask.scatter_(1, pos_idx, take_pos)
    # scatter of False must not undo a True written by the other set: the sets are disjoint, but filler
    # indices of one can point at members of the other, so the negatives go in with a logical or
    return mask | torch.zeros_like(mask).scatter_(1, neg_idx, take_neg)
