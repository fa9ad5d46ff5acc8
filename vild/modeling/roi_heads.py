"""ViLD RoI heads: sample RoIs, embed them, classify against text, distill toward CLIP, predict masks."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.roi_heads import maskrcnn_loss
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import boxes as box_ops

from .box_head import ViLDBoxHead
from .classifier import TextClassifier, ensemble_scores
from .conv_stack import run_conv_stack
from .losses import box_regression_loss, classification_loss, distillation_loss
from .postprocess import select_detections

VARIANTS = ("text", "vild", "ensemble")


class ViLDRoIHeads(nn.Module):
    """Second stage of the detector; ``variant`` picks ViLD-text, ViLD (shared head) or ViLD-ensemble."""

    def __init__(self, box_pooler: MultiScaleRoIAlign, text_head: ViLDBoxHead, image_head: ViLDBoxHead | None,
                 classifier: TextClassifier, mask_pooler: MultiScaleRoIAlign | None, mask_head: nn.Module | None,
                 mask_predictor: nn.Module | None, *, variant: str = "vild", fg_iou_thresh: float = 0.5,
                 bg_iou_thresh: float = 0.5, batch_size_per_image: int = 512, positive_fraction: float = 0.25,
                 bbox_reg_weights: tuple = (10.0, 10.0, 5.0, 5.0), distill_weight: float = 0.5,
                 num_distill_proposals: int = 300, ensemble_lambda: float = 2 / 3, score_thresh: float = 0.0,
                 nms_thresh: float = 0.5, detections_per_img: int = 300, topk_candidates: int = 1000):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown MODEL.VILD.VARIANT {variant!r}: use one of {VARIANTS}")
        if (variant == "ensemble") != (image_head is not None):
            raise ValueError("ViLD-ensemble needs an image head; the other variants share one head")
        self.variant = variant
        self.box_pooler, self.text_head, self.image_head = box_pooler, text_head, image_head
        self.classifier = classifier
        self.mask_pooler, self.mask_head, self.mask_predictor = mask_pooler, mask_head, mask_predictor
        self.matcher = det_utils.Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=False)
        self.sampler = det_utils.BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.box_coder = det_utils.BoxCoder(tuple(bbox_reg_weights))
        self.distill_weight = distill_weight
        self.num_distill_proposals = num_distill_proposals
        self.ensemble_lambda = ensemble_lambda
        self.score_thresh, self.nms_thresh = score_thresh, nms_thresh
        self.detections_per_img, self.topk_candidates = detections_per_img, topk_candidates

    @property
    def mask_on(self) -> bool:
        """Whether the head predicts masks."""
        return self.mask_head is not None

    # ---- training -------------------------------------------------------------------------
    def sample_rois(self, proposals: list[torch.Tensor], targets: list[dict]):
        """Mix in ground truth, match to it, sample fg/bg; labels are 0 = background, k + 1 = class k."""
        rois, labels, matched, reg_targets = [], [], [], []
        for props, t in zip(proposals, targets):
            gt = t["boxes"].to(props.dtype)
            props = torch.cat([props, gt])
            if gt.numel() == 0:
                idx = torch.zeros(len(props), dtype=torch.long, device=props.device)
                lab = torch.zeros(len(props), dtype=torch.long, device=props.device)
            else:
                m = self.matcher(box_ops.box_iou(gt, props))
                idx = m.clamp(min=0)
                lab = t["labels"][idx] + 1
                lab[m < 0] = 0  # both below-threshold and between-threshold proposals become background
            pos, neg = self.sampler([lab])
            keep = (pos[0] | neg[0]).nonzero().squeeze(1)
            props, idx, lab = props[keep], idx[keep], lab[keep]
            ref = gt[idx] if gt.numel() else torch.zeros_like(props)
            rois.append(props)
            labels.append(lab)
            matched.append(idx)
            reg_targets.append(self.box_coder.encode_single(ref, props))
        return rois, labels, matched, reg_targets

    def _distill_inputs(self, targets: list[dict], device) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        boxes, embeds, valid = [], [], []
        for t in targets:
            b = t.get("proposal_boxes")
            if b is None or b.numel() == 0:
                boxes.append(torch.zeros((0, 4), device=device))
                continue
            n = self.num_distill_proposals
            b, e = b[:n].to(device).float(), t["proposal_embeds"][:n].to(device).float()
            v = t.get("proposal_valid")
            v = v[:n].to(device) if v is not None else torch.ones(len(b), dtype=torch.bool, device=device)
            v = v & ((b[:, 2] - b[:, 0]) > 1) & ((b[:, 3] - b[:, 1]) > 1)
            boxes.append(b)
            embeds.append(e)
            valid.append(v)
        dim = self.classifier.embed_dim
        cat = lambda xs, shape, dt: torch.cat(xs) if xs else torch.zeros(shape, device=device, dtype=dt)  # noqa: E731
        return boxes, cat(embeds, (0, dim), torch.float32), cat(valid, (0,), torch.bool)

    def forward_train(self, features: dict, proposals: list[torch.Tensor], image_sizes: list, targets: list[dict]) -> dict:
        """Return the box, classification, distillation and mask losses."""
        rois, labels, matched, reg_targets = self.sample_rois(proposals, targets)
        distill = self.variant != "text"
        if not distill:
            emb, deltas = self.text_head(self.box_pooler(features, rois, image_sizes))
        else:
            d_boxes, clip_embeds, valid = self._distill_inputs(targets, rois[0].device)
            # one RoIAlign over both kinds of boxes (rows per image: sampled, then distillation)
            sizes = [n for r, d in zip(rois, d_boxes) for n in (len(r), len(d))]
            both = self.box_pooler(features, [torch.cat([r, d]) for r, d in zip(rois, d_boxes)], image_sizes)
            if self.variant == "vild":
                # one pass through the shared head keeps BatchNorm statistics over both kinds of boxes
                emb_both, deltas_both = self.text_head(both)
                emb, d_emb = _unzip(emb_both, sizes)
                deltas, _ = _unzip(deltas_both, sizes)
            else:
                pooled, d_pooled = _unzip(both, sizes)
                emb, deltas = self.text_head(pooled)
                d_emb, _ = self.image_head(d_pooled)
        labels_cat = torch.cat(labels)
        losses = {
            "loss_cls": classification_loss(self.classifier(emb), labels_cat),
            "loss_box_reg": box_regression_loss(deltas, torch.cat(reg_targets), labels_cat),
        }
        if distill:
            losses["loss_distill"] = self.distill_weight * distillation_loss(d_emb, clip_embeds, valid)
        if self.mask_on:
            losses["loss_mask"] = self._mask_loss(features, rois, labels, matched, image_sizes, targets)
        return losses

    def _mask_loss(self, features, rois, labels, matched, image_sizes, targets) -> torch.Tensor:
        pos = [lab > 0 for lab in labels]
        pos_rois = [r[p] for r, p in zip(rois, pos)]
        # without a positive RoI (a crop with no object, common under large-scale jitter) the head still
        # runs, on zero rows: DDP expects a gradient for every parameter, and SyncBN's collectives must
        # meet the other ranks'; maskrcnn_loss gives 0 for no targets
        logits = self.mask_predictor(run_conv_stack(self.mask_head, self.mask_pooler(features, pos_rois, image_sizes)))
        gt_masks = [t["masks"] for t in targets]
        agnostic = [torch.zeros(len(t["labels"]), dtype=torch.long, device=logits.device) for t in targets]
        return maskrcnn_loss(logits, pos_rois, gt_masks, agnostic, [m[p] for m, p in zip(matched, pos)])

    # ---- inference ------------------------------------------------------------------------
    def class_scores(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return per-class probabilities [R, K] (background dropped) and box deltas [R, 4]."""
        emb, deltas = self.text_head(pooled)
        p_text = F.softmax(self.classifier(emb).float(), dim=-1)[:, 1:]
        if self.image_head is None:
            return p_text, deltas
        img_emb, _ = self.image_head(pooled)
        p_image = F.softmax(self.classifier(img_emb, with_background=False).float(), dim=-1)
        return ensemble_scores(p_text, p_image, self.classifier.base_mask, self.ensemble_lambda), deltas

    def _predict_masks(self, features: dict, image_sizes: list, results: list[dict], rows: list[torch.Tensor]) -> None:
        """Class-agnostic masks, computed once per distinct box: detections of several classes from one
        proposal share their box (class-agnostic regression), and so their mask."""
        inverse, boxes = [], []
        for r, row in zip(results, rows):
            u, inv = torch.unique(row, return_inverse=True)
            first = torch.full((len(u),), len(row), dtype=torch.long, device=row.device)
            first.scatter_reduce_(0, inv, torch.arange(len(row), device=row.device), reduce="amin")
            inverse.append(inv)
            boxes.append(r["boxes"][first])
        m = self.mask_pooler.output_size[0] * 2
        if sum(len(b) for b in boxes):
            pooled = self.mask_pooler(features, boxes, image_sizes)
            probs = self.mask_predictor(run_conv_stack(self.mask_head, pooled)).sigmoid()
        else:
            probs = features[next(iter(features))].new_zeros((0, 1, m, m))
        for r, p, inv in zip(results, probs.split([len(b) for b in boxes]), inverse):
            r["mask_probs"] = p[:, 0][inv]

    def forward_test(self, features: dict, proposals: list[torch.Tensor], image_sizes: list) -> list[dict]:
        """Detections per image in the frame of the (resized) network input; masks as [n, M, M] probabilities."""
        pooled = self.box_pooler(features, proposals, image_sizes)
        scores, deltas = self.class_scores(pooled)
        boxes = self.box_coder.decode(deltas.float(), proposals).squeeze(1)
        counts = [len(p) for p in proposals]
        results, rows = [], []
        for b, s, size in zip(boxes.split(counts), scores.split(counts), image_sizes):
            b = box_ops.clip_boxes_to_image(b, size)
            db, ds, dl, row = select_detections(b, s, self.score_thresh, self.nms_thresh, self.detections_per_img,
                                                self.topk_candidates)
            results.append({"boxes": db, "scores": ds, "labels": dl})
            rows.append(row)
        if self.mask_on:
            self._predict_masks(features, image_sizes, results, rows)
        return results


def _unzip(rows: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows laid out per image as [a_0, b_0, a_1, b_1, ...] (``sizes`` alternating) → (all a, all b)."""
    parts = rows.split(sizes)
    return torch.cat(parts[0::2]), torch.cat(parts[1::2])
