"""Turning class scores into detections, and low-resolution masks into image masks, without per-item loops."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.ops import batched_nms, nms


@dataclass(frozen=True)
class DetectionSettings:
    """What inference keeps of the scored boxes; a model holds its config's, a call may pass others.

    ``score_thresh`` drops detections scoring at or below it; ``nms_thresh`` is the IoU over which NMS
    suppresses; ``max_dets`` detections per image at most; ``topk_candidates`` (box, class) pairs enter
    NMS first (a speed lever, see ``select_detections``); ``class_agnostic``: one label per box.
    Scoring: ``objectness_weight`` w makes a score p^(1-w) · o^w with the RPN's objectness o;
    ``centering`` subtracts that share of the mean region embedding before the text dot products
    (``TextClassifier.forward``). ``confidence``: show scores as the calibrated confidences of the model's
    ``confidence_fit`` (``ViLDRoIHeads.confidence``); the threshold is then a confidence too.
    ``abstain``: ViLD-ensemble's image head scores a region over the names and a null of the model's
    calibrated ``image_null`` similarity (``ViLDRoIHeads.class_scores``).
    ``masks``: predict masks (for models that have a mask head).
    """

    score_thresh: float = 0.0
    nms_thresh: float = 0.5
    max_dets: int = 300
    topk_candidates: int = 1000
    class_agnostic: bool = False
    objectness_weight: float = 0.0
    centering: float = 0.0
    confidence: bool = False
    abstain: bool = False
    masks: bool = True

    def __post_init__(self):
        if not 0.0 <= self.objectness_weight <= 1.0:
            raise ValueError(f"objectness weight {self.objectness_weight}: use a weight in [0, 1]")


def to_confidence(scores: torch.Tensor, a: torch.Tensor | float, b: torch.Tensor | float) -> torch.Tensor:
    """Display scores → calibrated confidences σ(a · log s + b) (Platt scaling, see ``vild.engine.calibration``)."""
    return torch.sigmoid(a * scores.clamp_min(1e-12).log() + b)


def select_detections(boxes: torch.Tensor, scores: torch.Tensor, score_thresh: float, nms_thresh: float,
                      max_dets: int, topk_candidates: int, class_agnostic: bool = False,
                      num_shown: int | torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """NMS over [R, 4] class-agnostic boxes and [R, K] scores; returns boxes, scores, labels, box rows.

    ``class_agnostic``: one label per box: each box keeps its best class, and NMS runs across classes
    (ultralytics' ``agnostic_nms``). All classes of a row share its box, so this equals NMS over every
    (box, class) pair with the class ignored. Otherwise NMS runs per class, as the COCO/LVIS protocol
    expects (a box may then carry several labels). ``num_shown`` (class-agnostic only): classes from this
    index on are hidden: they win boxes and suppress others in NMS, then their boxes are dropped before the
    ``max_dets`` best are kept.

    The result equals per-class NMS over every (box, class) pair over the threshold, keeping the best
    ``max_dets``; but with 1203 classes and score threshold 0 that is over a million candidates, so
    only the ``topk_candidates`` best pairs enter NMS first (0 = all at once). That is exact as soon as
    ``max_dets`` of them survive: whether a pair survives depends only on the better pairs of its class,
    all of which are in, and any pair left out scores below every survivor. When fewer survive (peaky
    scores: many candidates are near-copies of one class's box), the top-k grows 4× and NMS runs again.

    On the top-k path the score threshold is applied after NMS, on the (sorted) survivors: a candidate
    under the threshold scores lower than every candidate over it, so it can only suppress candidates
    that are under the threshold too, and the result equals thresholding first. That leaves one
    data-dependent size (NMS's own) and so one device-to-host sync per image and round.
    """
    # boxes left without area by clipping carry no detection (torchvision drops them too)
    empty = (boxes[:, 2] - boxes[:, 0] <= 1e-2) | (boxes[:, 3] - boxes[:, 1] <= 1e-2)
    if class_agnostic:
        best, labels = scores.masked_fill(empty[:, None], float("-inf")).max(dim=1)
        rows = (best > score_thresh).nonzero().squeeze(1)
        rows = rows[nms(boxes[rows].float(), best[rows].float(), nms_thresh)]
        if num_shown is not None:
            rows = rows[labels[rows] < num_shown]
        rows = rows[:max_dets]
        return boxes[rows], best[rows], labels[rows], rows
    num_classes = scores.shape[1]
    flat = scores.masked_fill(empty[:, None], float("-inf")).reshape(-1)
    k = topk_candidates if topk_candidates > 0 else flat.numel()
    while True:
        partial = k < flat.numel()
        if partial:
            cand_scores, idx = flat.topk(k)  # sorted, one kernel, no sync
        else:
            idx = (flat > score_thresh).nonzero().squeeze(1)
            cand_scores = flat[idx]
        box_idx = torch.div(idx, num_classes, rounding_mode="floor")
        labels = idx % num_classes
        cand_boxes = boxes[box_idx]
        keep = batched_nms(cand_boxes.float(), cand_scores.float(), labels, nms_thresh)[:max_dets]
        if partial:
            # NMS returns survivors by decreasing score, so the ones over the threshold are a prefix
            keep = keep[cand_scores[keep] > score_thresh]
        if not partial or len(keep) >= max_dets or not bool(cand_scores[-1] > score_thresh):
            return cand_boxes[keep], cand_scores[keep], labels[keep], box_idx[keep]
        k *= 4


def _paste_weights_t(lo: torch.Tensor, hi: torch.Tensor, size: int, length: int) -> torch.Tensor:
    """Bilinear weights [n, size, length] (mask cell × pixel) mapping a mask axis onto pixels [0, length).

    Pixels are the last (contiguous, long) axis and the arithmetic is in place: on CPUs the
    [n, length, size] layout with its 28-wide inner axis made these few ops cost more than the matmuls.
    """
    # pixel centres in mask-cell units, align_corners=False; cells outside the mask read as zero
    centers = torch.arange(length, device=lo.device, dtype=torch.float32) + 0.5
    scale = (hi - lo).clamp_min(1e-6) / size
    u = (centers[None, :] - lo[:, None]) / scale[:, None] - 0.5  # [n, length]
    cells = torch.arange(size, device=lo.device, dtype=torch.float32)
    d = u[:, None, :] - cells[None, :, None]  # [n, size, length]
    return d.abs_().neg_().add_(1.0).clamp_min_(0.0)


# the float images of one chunk: 64 images of 1024x1024 take 256 MiB; a 24-megapixel photo takes 2 per chunk
# (a fixed 64 took 6 GB there)
CHUNK_BYTES = 256 * 2 ** 20


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, height: int, width: int, threshold: float = 0.5,
                chunk: int = 64, chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """Paste [n, m, m] mask probabilities into boxes of an image at once: bool [n, height, width].

    Bilinear resampling is separable, so each pasted mask is Wy · M · Wxᵀ: two batched matmuls
    instead of one interpolation per detection; chunks (at most ``chunk`` masks and ``chunk_bytes`` of
    float images) bound the memory beyond the output. The
    weights and Wy · M are computed for all detections at once (they are small: [n, H or W, m]);
    each chunk's float image goes into one buffer reused across chunks and the comparison writes
    straight into the output (no fresh chunk-sized allocations: on CPUs those are page faults).
    """
    n, m = masks.shape[0], masks.shape[-1]
    out = torch.empty((n, height, width), dtype=torch.bool, device=masks.device)  # every row is written
    if n == 0:
        return out
    with torch.autocast(masks.device.type, enabled=False):  # fp32 resampling, whatever the caller autocasts
        chunk = max(1, min(chunk, chunk_bytes // (4 * height * width)))
        return _paste(masks.reshape(n, m, m).float(), boxes.float(), out, height, width, threshold, chunk)


def _paste(masks: torch.Tensor, boxes: torch.Tensor, out: torch.Tensor, height: int, width: int,
           threshold: float, chunk: int) -> torch.Tensor:
    n, m = masks.shape[0], masks.shape[-1]
    # the (small) weights of all detections at once: a few large ops instead of a few per chunk
    wy = _paste_weights_t(boxes[:, 1], boxes[:, 3], m, height).transpose(1, 2)  # [n, H, m]
    wx_t = _paste_weights_t(boxes[:, 0], boxes[:, 2], m, width)  # [n, m, W]
    rows = torch.bmm(wy, masks)  # [n, H, m]
    c = min(chunk, n)
    buf = torch.empty((c, height, width), dtype=torch.float32, device=masks.device)
    for s in range(0, n, c):
        e = min(s + c, n)
        dst = buf[: e - s]
        torch.bmm(rows[s:e], wx_t[s:e], out=dst)
        torch.ge(dst, threshold, out=out[s:e])
    return out


def select_detections_batched(boxes: torch.Tensor, scores: torch.Tensor, score_thresh: torch.Tensor | float,
                              nms_thresh: float, max_dets: torch.Tensor | int, topk_candidates: int,
                              class_agnostic: bool = False, num_shown: int | torch.Tensor | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``select_detections`` for a padded batch, with no data-dependent loop, so that it traces (ONNX export).

    ``boxes`` [B, R, 4] (class-agnostic) and ``scores`` [B, R, K]; padding rows carry empty boxes. Returns
    flat boxes, scores, labels, image index and box row (within the image), grouped by image and by
    decreasing score within an image. ``score_thresh`` and ``max_dets`` may be 0-d tensors (graph inputs).

    Per image it is ``select_detections``'s first round: the ``topk_candidates`` best (box, class) pairs
    (0 = all) over the threshold enter per-class NMS (``grouped_nms``: all images in one call). It equals
    ``select_detections`` whenever that returns after one round, i.e. unless fewer than ``max_dets`` pairs
    survive NMS while pairs over the threshold were left out of the top-k; there ``select_detections``
    widens the top-k and this keeps the survivors it has.
    """
    b, r, k = scores.shape
    if class_agnostic:  # one label per box (``select_detections``'s class-agnostic rule): one NMS group per image
        best, labels = scores.masked_fill(without_area(boxes)[..., None], float("-inf")).max(dim=2)
        live = torch.where(best > score_thresh, best, torch.full_like(best, float("-inf")))
        img, row = grouped_nms(boxes, live[:, None, :], nms_thresh)
        if num_shown is not None:
            shown = labels[img, row] < num_shown
            img, row = img[shown], row[shown]
        img, row = best_per_group(img, row, best[img, row], b, max_dets)
        return boxes[img, row], best[img, row], labels[img, row], img, row
    flat = scores.masked_fill(without_area(boxes)[..., None], float("-inf")).reshape(b, r * k)
    k_cand = topk_size(flat, topk_candidates, 1) if topk_candidates > 0 else flat.shape[1]
    cand_scores, idx = flat.topk(k_cand, dim=1)  # [B, C] per image
    rows, labels = torch.div(idx, k, rounding_mode="floor"), idx % k
    cand_boxes = boxes.gather(1, rows[..., None].expand(-1, -1, 4))
    live = torch.where(cand_scores > score_thresh, cand_scores, torch.full_like(cand_scores, float("-inf")))
    by_class = torch.full((b, k, cand_scores.shape[1]), float("-inf"), dtype=live.dtype, device=live.device)
    by_class = by_class.scatter(1, labels[:, None, :], live[:, None, :])
    img, cand = grouped_nms(cand_boxes, by_class, nms_thresh)
    img, cand = best_per_group(img, cand, cand_scores[img, cand], b, max_dets)
    return cand_boxes[img, cand], cand_scores[img, cand], labels[img, cand], img, rows[img, cand]


def best_per_group(img: torch.Tensor, col: torch.Tensor, score: torch.Tensor, num_images: int | torch.Tensor,
                   per_image: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best ``per_image`` (by ``score``) of each image's (image, column) pairs, grouped by image, best first."""
    order = score.argsort(descending=True)
    img, col = img[order], col[order]
    keep = rank_within_group(img, num_images) < per_image
    img, col = img[keep], col[keep]
    n = img.shape[0]
    # a stable grouping by image keeps the score order within each image
    order = (img * n + torch.arange(n, device=img.device)).argsort()
    return img[order], col[order]


class _GroupedNMS(torch.autograd.Function):
    """NMS per (image, group); exports to ONNX NonMaxSuppression over its batch and class axes."""

    @staticmethod
    def forward(ctx, boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
        b, g, n = scores.shape
        img, grp, box = torch.isfinite(scores).nonzero(as_tuple=True)
        keep = nms_each_group(boxes[img, box], scores[img, grp, box], img * g + grp, iou_threshold)
        return torch.stack([img[keep], grp[keep], box[keep]], dim=1)

    @staticmethod
    def symbolic(g, boxes, scores, iou_threshold: float):
        max_out = g.op("Constant", value_t=torch.tensor([2 ** 62], dtype=torch.int64))
        iou = g.op("Constant", value_t=torch.tensor([iou_threshold], dtype=torch.float32))
        # -inf entries are left out: every kept score is over the lowest float
        floor = g.op("Constant", value_t=torch.tensor([torch.finfo(torch.float32).min], dtype=torch.float32))
        return g.op("NonMaxSuppression", boxes, scores, max_out, iou, floor)


def nms_each_group(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou_threshold: float
                   ) -> torch.Tensor:
    """Indices of the boxes [N, 4] that NMS keeps within each group (``groups`` [N]), by decreasing score.

    One ``nms`` call per group, as torchvision's ``batched_nms`` computes it for small inputs (its larger ones
    offset the coordinates instead, whose rounding can flip a pair whose IoU sits at the threshold).
    """
    kept = torch.zeros_like(scores, dtype=torch.bool)
    for group in torch.unique(groups):
        members = torch.where(groups == group)[0]
        kept[members[nms(boxes[members], scores[members], iou_threshold)]] = True
    survivors = torch.where(kept)[0]
    return survivors[scores[survivors].sort(descending=True)[1]]


def topk_size(x: torch.Tensor, k: int, dim: int) -> int | torch.Tensor:
    """``min(k, x.size(dim))``: the most ``topk`` may take. While tracing, a tensor computed from the size, so that
    an exported graph takes ``k`` from inputs of any size instead of the traced one's."""
    if not torch.jit.is_tracing():
        return min(k, x.size(dim))
    from torch.onnx.operators import shape_as_tensor
    size = shape_as_tensor(x)[dim].unsqueeze(0)
    return torch.min(torch.cat((torch.tensor([k], dtype=size.dtype), size), 0))


def grouped_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """NMS of boxes [B, N, 4] within each (image, group); ``scores`` [B, G, N] is -inf where a box is not in a group.

    Returns the image and box index of each survivor (any order). Each group's NMS is torchvision's on that
    group alone, also in the exported graph (ONNX's own batch and class axes): no coordinate offsets, whose
    float rounding at large offsets can flip a pair whose IoU sits at the threshold.
    """
    kept = _GroupedNMS.apply(boxes.float(), scores.float(), float(iou_threshold))
    return kept[:, 0], kept[:, 2]


def without_area(boxes: torch.Tensor) -> torch.Tensor:
    """Which xyxy boxes [..., 4] clipping left without area (``select_detections``'s rule): they carry no detection."""
    return (boxes[..., 2] - boxes[..., 0] <= 1e-2) | (boxes[..., 3] - boxes[..., 1] <= 1e-2)


def rank_within_group(group: torch.Tensor, num_groups: int | torch.Tensor) -> torch.Tensor:
    """For rows sorted by some key, each row's position among the rows of its own group (0 = first)."""
    onehot = (group[:, None] == torch.arange(num_groups, device=group.device)[None]).long()
    return (onehot.cumsum(0) * onehot).sum(1) - 1


def scatter_rows(values: torch.Tensor, group: torch.Tensor, rank: torch.Tensor, num_groups: int | torch.Tensor,
                 width: int) -> torch.Tensor:
    """Rows [N, ...] into a zero-padded [num_groups, width, ...] layout at (group, rank) (ranks below width)."""
    out = values.new_zeros((num_groups * width,) + values.shape[1:])
    out = out.index_put((group * width + rank,), values)
    return out.view((num_groups, width) + values.shape[1:])


def clip_boxes_per_image(boxes: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
    """Clip xyxy boxes [B, N, 4] to their image's (h, w) from ``image_sizes`` [B, 2] (a traceable per-image clip)."""
    size = image_sizes.to(boxes.dtype)
    x = torch.min(boxes[..., 0::2].clamp(min=0), size[:, None, 1:])
    y = torch.min(boxes[..., 1::2].clamp(min=0), size[:, None, :1])
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)
