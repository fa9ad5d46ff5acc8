"""torchvision's RPN with its per-image training targets, sampling and proposal filtering done for the whole batch.

Same anchors, head, matching rule (with low-quality matches), sampling distribution, losses and proposals as
``torchvision.models.detection.rpn.RegionProposalNetwork``; what changes is how often the host waits for the
device. torchvision matches, samples and filters one image at a time, sizing tensors by the data
(``nonzero``) several times per image and level; here the only value-dependent sizes left are NMS's own
outputs (one call per image and level, as torchvision's ``batched_nms`` makes for RPN-sized inputs).

Shapes: B images in the batch, A anchors per image (all levels), G ground-truth boxes per image after padding
(padding rows are -1), P proposals kept per image. Boxes are xyxy in the padded batch's pixels; anchor labels
are 1 (foreground), 0 (background), -1 (ignored).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, concat_box_prediction_layers
from torchvision.ops import nms

from .box_coder import BoxCoder
from .postprocess import (best_per_group, clip_boxes_per_image, grouped_nms, rank_within_group, scatter_rows,
                          topk_size)
from .sampling import batched_box_iou, box_valid, pad_boxes, sample_balanced, sampled_mask

# IoU matrices bigger than this many elements are built a few images at a time (LVIS images can have
# hundreds of boxes against ~250k anchors at 1024 px); at 2^24 (64 MB a matrix) the matching's temporaries
# stay at a few hundred MB, less than torchvision's per-image box_iou takes for one image with 60 boxes
MAX_IOU_ELEMENTS = 1 << 24


def top_n_per_level(objectness: Tensor, num_anchors_per_level: list[int], n: int) -> Tensor:
    """Anchor indices [B, P]: each image's ``n`` best by objectness [B, A] in every level (all of a smaller one),
    level after level, best first within a level."""
    picked, offset = [], 0
    for level in objectness.split(num_anchors_per_level, 1):
        picked.append(level.topk(topk_size(level, n, 1), dim=1).indices + offset)
        offset += level.shape[1]
    return torch.cat(picked, dim=1)


class BatchedRPN(RegionProposalNetwork):
    """A drop-in ``RegionProposalNetwork`` (same constructor and outputs) without per-image loops in training."""

    def __init__(self, anchor_generator: AnchorGenerator, head: nn.Module, fg_iou_thresh: float,
                 bg_iou_thresh: float, batch_size_per_image: int, positive_fraction: float,
                 pre_nms_top_n: dict[str, int], post_nms_top_n: dict[str, int], nms_thresh: float,
                 score_thresh: float = 0.0):
        super().__init__(anchor_generator, head, fg_iou_thresh, bg_iou_thresh, batch_size_per_image,
                         positive_fraction, pre_nms_top_n, post_nms_top_n, nms_thresh, score_thresh)
        # matching, sampling and box coding run on this module's own code and settings: torchvision's helpers
        # for them (Matcher, the sampler, BoxCoder) live in a private module
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
        self.fg_iou_thresh, self.bg_iou_thresh = fg_iou_thresh, bg_iou_thresh
        self.batch_size_per_image, self.positive_fraction = batch_size_per_image, positive_fraction

    def assign_targets_to_anchors_batched(self, anchors: Tensor, gt_boxes: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Labels [B, A] (1 fg, 0 bg, -1 ignored) and matched gt boxes [B, A, 4] for anchors shared by the images."""
        b, a = len(gt_boxes), len(anchors)
        if max(len(g) for g in gt_boxes) == 0:
            return anchors.new_zeros((b, a)), anchors.new_zeros((b, a, 4))
        gt = pad_boxes([g.to(anchors.dtype) for g in gt_boxes])  # [B, G, 4]
        step = max(1, MAX_IOU_ELEMENTS // max(1, gt.shape[1] * a))
        labels, matched = [], []
        for lo in range(0, b, step):
            lab, idx = self._match(gt[lo:lo + step], anchors)
            labels.append(lab)
            matched.append(gt[lo:lo + step].gather(1, idx[..., None].expand(-1, -1, 4)))
        labels, matched = (torch.cat(labels), torch.cat(matched)) if len(labels) > 1 else (labels[0], matched[0])
        if not all(len(g) > 0 for g in gt_boxes):
            # an image without ground truth is all background already (padding never matches); its target
            # boxes are zeros, as torchvision gives them, not the padding
            has_gt = box_valid(gt).any(dim=1)
            matched = torch.where(has_gt[:, None, None], matched, 0.0)
        return labels, matched

    def _match(self, gt: Tensor, anchors: Tensor) -> tuple[Tensor, Tensor]:
        # torchvision's Matcher(fg, bg, allow_low_quality_matches=True), over a [b, G, A] IoU matrix
        valid_gt = box_valid(gt)  # padding rows get IoU -1: they never win a match
        iou = batched_box_iou(gt, anchors.expand(len(gt), -1, -1)).masked_fill_(~valid_gt[..., None], -1.0)
        best, idx = iou.max(dim=1)  # [b, A]
        labels = torch.where(best >= self.fg_iou_thresh, 1.0, torch.where(best < self.bg_iou_thresh, 0.0, -1.0))
        # low-quality matches: the anchors that some gt overlaps most (ties included) are foreground
        best_per_gt = iou.max(dim=2, keepdim=True).values
        top = ((iou == best_per_gt) & valid_gt[..., None]).any(dim=1)
        return torch.where(top, 1.0, labels), idx

    def filter_proposals(self, proposals: Tensor, objectness: Tensor, image_shapes: list[tuple[int, int]],
                         num_anchors_per_level: list[int]) -> tuple[list[Tensor], list[Tensor]]:
        """Top-n per level, clip, drop tiny and low-scoring boxes, NMS per level, keep the best post-NMS top-n."""
        n_img = proposals.shape[0]
        objectness = objectness.detach().reshape(n_img, -1)
        top_n_idx = top_n_per_level(objectness, num_anchors_per_level, self.pre_nms_top_n())
        scores = torch.sigmoid(objectness.gather(1, top_n_idx))
        boxes = proposals.gather(1, top_n_idx[..., None].expand(-1, -1, 4))
        xs, ys = boxes[..., 0::2], boxes[..., 1::2]  # views: clamping them in place clips the boxes
        for i, (h, w) in enumerate(image_shapes):
            xs[i].clamp_(min=0, max=w)
            ys[i].clamp_(min=0, max=h)
        wh = boxes[..., 2:] - boxes[..., :2]
        ok = (wh >= self.min_size).all(dim=-1) & (scores >= self.score_thresh)
        # a dropped box gets the lowest score: NMS visits it after every kept one, so it suppresses nothing,
        # and it is removed afterwards; the kept boxes are exactly those of NMS over the kept subset
        ranked = torch.where(ok, scores, -1.0)
        sizes = [min(self.pre_nms_top_n(), n) for n in num_anchors_per_level]
        # per level, every image's rows as views (two ops a level instead of four per image and level)
        level_boxes = [lv.unbind(0) for lv in boxes.split(sizes, dim=1)]
        level_ranked = [lv.unbind(0) for lv in ranked.split(sizes, dim=1)]
        offsets = [sum(sizes[:j]) for j in range(len(sizes))]
        kept, kept_scores = [], []
        for i in range(n_img):
            keep = torch.cat([nms(lb[i], lr[i], self.nms_thresh) + off
                              for lb, lr, off in zip(level_boxes, level_ranked, offsets)])
            s = ranked[i, keep]
            order = s.sort(descending=True).indices[:self.post_nms_top_n()]
            kept.append(keep[order])
            kept_scores.append(s[order])
        # dropped boxes sort last: each image's are cut off by a count, all counts in one host copy
        counts = torch.stack([ok[i, k].sum() for i, k in enumerate(kept)]).tolist()
        final_boxes = [boxes[i, k[:c]] for i, (k, c) in enumerate(zip(kept, counts))]
        return final_boxes, [s[:c] for s, c in zip(kept_scores, counts)]

    def compute_loss_batched(self, objectness: Tensor, deltas: Tensor, labels: Tensor,
                             regression_targets: Tensor) -> tuple[Tensor, Tensor]:
        """torchvision's RPN losses on a sample drawn for all images at once, by masks instead of indices."""
        pos_idx, neg_idx, num_pos, num_neg = sample_balanced(labels == 1, labels == 0, self.batch_size_per_image,
                                                             self.positive_fraction)
        sampled = sampled_mask(pos_idx, neg_idx, num_pos, num_neg, labels.shape[1]).reshape(-1)
        positive = sampled & (labels.reshape(-1) == 1)
        n_sampled = (num_pos + num_neg).sum().clamp(min=1)
        # targets of unsampled anchors can be infinite (matched to an empty image's zero boxes): replaced
        target = torch.where(positive[:, None], regression_targets, 0.0)
        box = F.smooth_l1_loss(deltas, target, beta=1 / 9, reduction="none")
        box_loss = torch.where(positive[:, None], box, 0.0).sum() / n_sampled
        bce = F.binary_cross_entropy_with_logits(objectness.flatten(), labels.reshape(-1).clamp(min=0),
                                                 reduction="none")
        return torch.where(sampled, bce, 0.0).sum() / n_sampled, box_loss

    def propose(self, images: ImageList, features: dict[str, Tensor]
                ) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor, list[Tensor]]:
        """Proposals and their objectness probabilities per image, with the head's raw outputs and the anchors."""
        features = list(features.values())
        objectness, pred_bbox_deltas = self.head(features)
        anchors = self.anchor_generator(images, features)
        num_anchors_per_level = [o[0].numel() for o in objectness]
        objectness, pred_bbox_deltas = concat_box_prediction_layers(objectness, pred_bbox_deltas)
        # decoded in fp32 under autocast too: bf16 has 8 significant bits, so proposals at 512-1024 px would
        # snap to a 4-px grid before RoIAlign pools them (torchvision decodes in the deltas' dtype)
        proposals = self.box_coder.decode(pred_bbox_deltas.detach().float(), anchors).view(len(anchors), -1, 4)
        boxes, scores = self.filter_proposals(proposals, objectness, images.image_sizes, num_anchors_per_level)
        return boxes, scores, objectness, pred_bbox_deltas, anchors

    def propose_padded(self, images: Tensor, image_sizes: Tensor, features: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``propose`` (inference) for a batch tensor, with no per-image loop or host copy, so that it traces.

        ``images`` [B, 3, H, W] is the padded batch and ``image_sizes`` int [B, 2] the (h, w) of each image in it.
        Returns proposals [B, P, 4] (P = post-NMS top-n) and their objectness probabilities [B, P]: per image
        ``propose``'s boxes in its order (decreasing objectness, up to ties), then zero rows. All images'
        per-level NMS runs in one call.
        """
        feats = list(features.values())
        objectness, pred_bbox_deltas = self.head(feats)
        # the images of a padded batch share one grid of anchors
        anchors = self.anchor_generator(ImageList(images, [tuple(images.shape[-2:])]), feats)[0]
        num_anchors_per_level = [s[0] * s[1] * s[2] for s in (o[0].shape for o in objectness)]
        objectness, pred_bbox_deltas = concat_box_prediction_layers(objectness, pred_bbox_deltas)
        n_img, n_anchors = images.shape[0], anchors.shape[0]
        # [B*A, 4] deltas as [A, B*4]: the box coder decodes several boxes per anchor at once
        deltas = pred_bbox_deltas.detach().float().view(n_img, n_anchors, 4).transpose(0, 1).reshape(n_anchors, -1)
        proposals = self.box_coder.decode_single(deltas, anchors).view(n_anchors, n_img, 4).transpose(0, 1)
        objectness = objectness.detach().reshape(n_img, -1)
        # filter_proposals, all images at once
        top_n_idx = top_n_per_level(objectness, num_anchors_per_level, self.pre_nms_top_n())
        scores = torch.sigmoid(objectness.gather(1, top_n_idx))
        boxes = clip_boxes_per_image(proposals.gather(1, top_n_idx[..., None].expand(-1, -1, 4)), image_sizes)
        wh = boxes[..., 2:] - boxes[..., :2]
        ok = (wh >= self.min_size).all(dim=-1) & (scores >= self.score_thresh)
        level, start = torch.zeros_like(top_n_idx), 0
        for n in num_anchors_per_level[:-1]:
            start = start + n
            level += top_n_idx >= start
        # one NMS group per (image, level); dropped boxes are in none
        live = torch.where(ok, scores, torch.full_like(scores, float("-inf")))
        by_level = torch.full((n_img, len(num_anchors_per_level), scores.shape[1]), float("-inf"), dtype=scores.dtype,
                              device=scores.device).scatter(1, level[:, None, :], live[:, None, :])
        img, col = grouped_nms(boxes, by_level, self.nms_thresh)
        img, col = best_per_group(img, col, scores[img, col], n_img, self.post_nms_top_n())
        rank = rank_within_group(img, n_img)
        return (scatter_rows(boxes[img, col], img, rank, n_img, self.post_nms_top_n()),
                scatter_rows(scores[img, col], img, rank, n_img, self.post_nms_top_n()))

    def forward(self, images: ImageList, features: dict[str, Tensor],
                targets: list[dict[str, Tensor]] | None = None
                ) -> tuple[list[Tensor], list[Tensor], dict[str, Tensor]]:
        """Proposals and their objectness probabilities per image and, in training, the objectness and box losses."""
        boxes, scores, objectness, pred_bbox_deltas, anchors = self.propose(images, features)
        losses = {}
        if self.training:
            if targets is None:
                raise ValueError("training the RPN needs targets")
            # the anchor generator gives every image of a batch the same anchors (one padded size)
            labels, matched = self.assign_targets_to_anchors_batched(anchors[0], [t["boxes"] for t in targets])
            regression_targets = self.box_coder.encode_single(matched.reshape(-1, 4),
                                                              anchors[0].repeat(len(anchors), 1))
            loss_objectness, loss_box = self.compute_loss_batched(objectness, pred_bbox_deltas, labels,
                                                                  regression_targets)
            losses = {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_box}
        return boxes, scores, losses
