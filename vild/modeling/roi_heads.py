"""ViLD RoI heads: sample RoIs, embed them, classify against text, distill toward CLIP, predict masks.

Shapes: B images; R RoIs (all images, concatenated); K categories of the vocabulary and Kr hidden reference
ones; D embedding size (the CLIP teacher's); M mask side (28). Classification labels: 0 = background,
k + 1 = category k; scores and detection labels drop the background (label k = category k). Boxes are xyxy
in the (resized) network input's pixels until ``ViLD.forward`` maps them back to each image.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.roi_heads import maskrcnn_loss
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops import boxes as box_ops

from .box_coder import BoxCoder
from .box_head import ViLDBoxHead
from .classifier import ClassifierVocabulary, TextClassifier, ensemble_scores, with_hidden_shown
from .conv_stack import run_conv_stack
from .losses import box_regression_loss, classification_loss, distillation_loss
from .pooling import level_scales, merge_levels
from .postprocess import (DetectionSettings, clip_boxes_per_image, select_detections, select_detections_batched,
                          to_confidence)
from .sampling import batched_box_iou, box_valid, pad_boxes, sample_balanced, sampled_rows

VARIANTS = ("text", "vild", "ensemble", "fvlm")  # fvlm trains as text (see fvlm.py)
NO_IMAGE_NULL = -10.0  # an image-head null similarity that takes no probability (similarities lie in [-2, 2])


class SampledRoIs(NamedTuple):
    """The RoIs a training step sees: per image its boxes (positives first), matched gt indices and positive
    count; over all images, labels (0 = background, k + 1 = class k) and regression targets."""

    rois: list[torch.Tensor]
    labels: torch.Tensor
    matched: list[torch.Tensor]
    reg_targets: torch.Tensor
    num_pos: list[int]


class ViLDRoIHeads(nn.Module):
    """Second stage of the detector; ``variant`` picks ViLD-text, ViLD (shared head) or ViLD-ensemble."""

    def __init__(self, box_pooler: MultiScaleRoIAlign, text_head: ViLDBoxHead, image_head: ViLDBoxHead | None,
                 classifier: TextClassifier, mask_pooler: MultiScaleRoIAlign | None, mask_head: nn.Module | None,
                 mask_predictor: nn.Module | None, *, variant: str = "vild", fg_iou_thresh: float = 0.5,
                 bg_iou_thresh: float = 0.5, batch_size_per_image: int = 512, positive_fraction: float = 0.25,
                 bbox_reg_weights: tuple = (10.0, 10.0, 5.0, 5.0), distill_weight: float = 0.5,
                 num_distill_proposals: int = 300, ensemble_lambda: float = 2 / 3,
                 test_settings: DetectionSettings = DetectionSettings()):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown MODEL.VILD.VARIANT {variant!r}: use one of {VARIANTS}")
        if (variant == "ensemble") != (image_head is not None):
            raise ValueError("ViLD-ensemble needs an image head; the other variants share one head")
        self.variant = variant
        self.box_pooler, self.text_head, self.image_head = box_pooler, text_head, image_head
        self.classifier = classifier
        self.mask_pooler, self.mask_head, self.mask_predictor = mask_pooler, mask_head, mask_predictor
        self.fg_iou_thresh, self.bg_iou_thresh = fg_iou_thresh, bg_iou_thresh
        self.batch_size_per_image, self.positive_fraction = batch_size_per_image, positive_fraction
        self.box_coder = BoxCoder(tuple(bbox_reg_weights))
        self.distill_weight = distill_weight
        self.num_distill_proposals = num_distill_proposals
        self.ensemble_lambda = ensemble_lambda
        self.test_settings = test_settings
        # mean embedding of typical proposals per head (vild.engine.calibration); zeros until measured.
        # Not persistent: measured after training, it travels in a checkpoint's "calibration" entry
        self.register_buffer("region_mean", torch.zeros(2, classifier.embed_dim), persistent=False)
        # (a, b) of the display score's confidence map σ(a · log s + b) for names seen in training (row 0) and the
        # others (row 1), fitted by the same calibration
        self.register_buffer("confidence_fit", torch.zeros(2, 2), persistent=False)
        # ViLD-ensemble: the similarity under which the image head abstains (``class_scores``), fitted by the same
        # calibration; NO_IMAGE_NULL until then, far under any similarity, so that the null takes no probability
        self.register_buffer("image_null", torch.tensor(NO_IMAGE_NULL), persistent=False)

    @property
    def mask_on(self) -> bool:
        """Whether the head predicts masks."""
        return self.mask_head is not None

    # ---- training -------------------------------------------------------------------------
    def sample_rois(self, proposals: list[torch.Tensor], targets: list[dict]) -> SampledRoIs:
        """Mix in ground truth, match to it, sample fg/bg, all images at once; labels 0 = background, k + 1 = class k.

        Candidates with IoU in [bg_iou_thresh, fg_iou_thresh) are left out (the default single 0.5 makes none).
        """
        gts = [t["boxes"].to(p.dtype) for p, t in zip(proposals, targets)]
        gt_boxes = pad_boxes(gts)
        cands = torch.cat([pad_boxes(proposals), gt_boxes], dim=1)  # [B, N, 4], -1 rows are padding
        valid = box_valid(cands)
        g = gt_boxes.shape[1]
        if g:
            gt_labels = torch.nn.utils.rnn.pad_sequence([t["labels"] for t in targets], batch_first=True,
                                                        padding_value=-1)
            best_iou, match = batched_box_iou(gt_boxes, cands).max(dim=1)
        else:
            gt_labels = torch.zeros((len(cands), 1), dtype=torch.long, device=cands.device)
            gt_boxes = torch.zeros((len(cands), 1, 4), dtype=cands.dtype, device=cands.device)
            best_iou = torch.zeros(valid.shape, dtype=cands.dtype, device=cands.device)
            match = torch.zeros(valid.shape, dtype=torch.long, device=cands.device)
        positive = valid & (best_iou >= self.fg_iou_thresh)
        negative = valid & (best_iou < self.bg_iou_thresh)
        pos_idx, neg_idx, num_pos, num_neg = sample_balanced(positive, negative, self.batch_size_per_image,
                                                             self.positive_fraction)
        # the one host synchronisation of the sampling: how many rows each image keeps
        counts = torch.stack([num_pos, num_pos + num_neg]).tolist()
        n_pos, n_rows = counts[0], counts[1]
        width = max(n_rows)
        rows = sampled_rows(pos_idx, neg_idx, num_pos, width)  # [B, width]: positives first
        fg = torch.arange(width, device=rows.device)[None] < num_pos[:, None]
        rois = cands.gather(1, rows[..., None].expand(-1, -1, 4))
        matched = match.gather(1, rows)
        labels = torch.where(fg, gt_labels.gather(1, matched) + 1, 0)
        # background rows regress toward themselves (zero targets): their matched box may be padding
        ref = torch.where(fg[..., None], gt_boxes.gather(1, matched[..., None].expand(-1, -1, 4)), rois)
        reg_targets = self.box_coder.encode_single(ref.reshape(-1, 4), rois.reshape(-1, 4)).view(*rois.shape)
        if all(n == width for n in n_rows):
            return SampledRoIs(list(rois.unbind(0)), labels.reshape(-1), list(matched.unbind(0)),
                               reg_targets.reshape(-1, 4), n_pos)
        cut = lambda x: [x[i, :n] for i, n in enumerate(n_rows)]  # noqa: E731
        return SampledRoIs(cut(rois), torch.cat(cut(labels)), cut(matched), torch.cat(cut(reg_targets)), n_pos)

    def _distill_inputs(self, targets: list[dict], device) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        n = self.num_distill_proposals
        boxes, embeds, valid = [], [], []
        for t in targets:
            b = t.get("proposal_boxes")
            if b is None or b.numel() == 0:
                boxes.append(torch.zeros((0, 4), device=device))
                continue
            v = t.get("proposal_valid")
            boxes.append(b[:n])
            embeds.append(t["proposal_embeds"][:n])
            valid.append(torch.ones(len(boxes[-1]), dtype=torch.bool, device=device) if v is None else v[:n])
        dim = self.classifier.embed_dim
        if not embeds:
            return boxes, torch.zeros((0, dim), device=device), torch.zeros((0,), dtype=torch.bool, device=device)
        # validity of all images' boxes in one pass: a box under 1 px has no CLIP embedding worth matching
        flat = torch.cat(boxes).to(device).float()
        valid = torch.cat(valid).to(device) & ((flat[:, 2] - flat[:, 0]) > 1) & ((flat[:, 3] - flat[:, 1]) > 1)
        boxes = list(flat.split([len(b) for b in boxes]))
        return boxes, torch.cat(embeds).to(device).float(), valid

    def forward_train(self, features: dict, proposals: list[torch.Tensor], image_sizes: list, targets: list[dict]) -> dict:
        """Return the box, classification, distillation and mask losses."""
        sampled = self.sample_rois(proposals, targets)
        rois = sampled.rois
        distill = self.variant in ("vild", "ensemble")
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
        losses = {
            "loss_cls": classification_loss(self.classifier(emb), sampled.labels),
            "loss_box_reg": box_regression_loss(deltas, sampled.reg_targets, sampled.labels),
        }
        if distill:
            losses["loss_distill"] = self.distill_weight * distillation_loss(d_emb, clip_embeds, valid)
        if self.mask_on:
            losses["loss_mask"] = self._mask_loss(features, sampled, image_sizes, targets)
        return losses

    def _mask_loss(self, features, sampled: SampledRoIs, image_sizes, targets) -> torch.Tensor:
        # each image's positives are its first rows
        pos_rois = [r[:n] for r, n in zip(sampled.rois, sampled.num_pos)]
        pos_matched = [m[:n] for m, n in zip(sampled.matched, sampled.num_pos)]
        if any("mask_valid" in t for t in targets):
            # positives on ground truth without a segmentation (box-only annotations) train no mask
            keep = [t["mask_valid"][m] if "mask_valid" in t else torch.ones_like(m, dtype=torch.bool)
                    for t, m in zip(targets, pos_matched)]
            pos_rois = [r[k] for r, k in zip(pos_rois, keep)]
            pos_matched = [m[k] for m, k in zip(pos_matched, keep)]
        # without a positive RoI (a crop with no object, common under large-scale jitter) the head still
        # runs, on zero rows: DDP expects a gradient for every parameter, and SyncBN's collectives must
        # meet the other ranks'; maskrcnn_loss gives 0 for no targets
        logits = self.mask_predictor(run_conv_stack(self.mask_head, self.mask_pooler(features, pos_rois, image_sizes)))
        gt_masks = [t["masks"] for t in targets]
        agnostic = [torch.zeros(len(t["labels"]), dtype=torch.long, device=logits.device) for t in targets]
        return maskrcnn_loss(logits, pos_rois, gt_masks, agnostic, pos_matched)

    # ---- inference ------------------------------------------------------------------------
    def class_scores(self, pooled: torch.Tensor, objectness: torch.Tensor | None = None,
                     settings: DetectionSettings | None = None, vocabulary: ClassifierVocabulary | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return per-class scores [R, K] over ``vocabulary`` (default: the installed one) and box deltas [R, 4].

        A score is the class probability (background and the classifier's hidden reference categories
        compete in the softmax, then are dropped), times the proposal's RPN objectness [R] to the power
        ``settings.objectness_weight`` (w): p^(1-w) · o^w, a geometric mean. The objectness is
        class-agnostic and learned from every annotated box, so it stays meaningful for names never
        trained on, while the softmax over a few names is forced to pick one of them for any region.

        ViLD-ensemble's image head has no background: its softmax over the names hands a region that shows
        none of them (a part of an object, clutter) to the nearest name, and the ensemble weighs that head
        most for the names never trained on. With ``settings.abstain`` a null of similarity ``image_null``
        (calibrated on held-out images) competes too and is dropped: a name then keeps about
        σ((s − image_null) / τ) of a region whose similarity s it dominates, an absolute score, as
        OWL-ViT's sigmoid scores are, that does not grow as the vocabulary shrinks.
        """
        st = settings or self.test_settings
        vocab = self.classifier.vocabulary_for(vocabulary)
        shift = st.centering * self.region_mean if st.centering else (None, None)
        k = vocab.text_embeddings.shape[0]  # not len(): a traced graph keeps K an input
        emb, deltas = self.text_head(pooled)
        scores = F.softmax(self.classifier(emb, shift=shift[0], vocabulary=vocab).float(), dim=-1)[:, 1:k + 1]
        if self.image_head is not None:
            img_emb, _ = self.image_head(pooled)
            logits = self.classifier(img_emb, with_background=False, shift=shift[1], vocabulary=vocab).float()
            if st.abstain:
                null = (self.image_null.float() / self.classifier.temperature).expand(logits.shape[0], 1)
                p_image = F.softmax(torch.cat([null, logits], dim=1), dim=-1)[:, 1:k + 1]
            else:
                p_image = F.softmax(logits, dim=-1)[:, :k]
            scores = ensemble_scores(scores, p_image, vocab.base_mask, self.ensemble_lambda)
        w = st.objectness_weight
        if w > 0 and objectness is not None:
            scores = scores.clamp_min(1e-12) ** (1.0 - w) * objectness.float().clamp_min(1e-12)[:, None] ** w
        return scores, deltas

    def _scoring_vocabulary(self, vocabulary: ClassifierVocabulary | None, settings: DetectionSettings
                            ) -> tuple[ClassifierVocabulary, torch.Tensor | int]:
        """The vocabulary to score regions over, and K (labels from K on are hidden categories, never shown).

        With one label per box, the hidden reference categories compete for the label too: a region that is
        best called by one of them (a base shape when only novel names were asked for) takes that label into
        NMS, where it suppresses the overlapping boxes of the named categories, and is then dropped (before the
        ``max_dets`` best are kept: ``select_detections``' ``num_shown``). What is
        shown for a subset of the names is then what the names and the hidden ones together show, restricted
        to the subset. Per-class NMS has no one label to decide, so the hidden categories only compete in the
        softmax there.
        """
        vocab = self.classifier.vocabulary_for(vocabulary)
        k = vocab.text_embeddings.shape[0]  # not len(): a traced graph keeps K an input
        return (with_hidden_shown(vocab) if settings.class_agnostic else vocab), k

    def confidence(self, scores: torch.Tensor, settings: DetectionSettings, base_mask: torch.Tensor) -> torch.Tensor:
        """With ``settings.confidence``, scores [R, K] as calibrated confidences σ(a · log s + b), with the
        ``confidence_fit`` row of names seen in training where ``base_mask`` [K] is set and of the others elsewhere
        (see ``vild.engine.calibration``): monotone per group, so no ranking within a group changes."""
        if not settings.confidence:
            return scores
        fit = torch.where(base_mask[:, None], self.confidence_fit[0], self.confidence_fit[1])  # [K, 2]
        return to_confidence(scores, fit[:, 0], fit[:, 1])

    def rescore(self, scores: torch.Tensor, boxes: torch.Tensor, counts: list[int], features: dict,
                image_sizes: list, vocabulary: ClassifierVocabulary) -> torch.Tensor:
        """Hook for variants that combine the class probabilities [R, K] over ``vocabulary`` with another scorer of
        the decoded boxes [R, 4] (``counts`` per image): F-VLM's frozen CLIP. The probabilities as they are here."""
        return scores

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

    def forward_test(self, features: dict, proposals: list[torch.Tensor], image_sizes: list,
                     objectness: list[torch.Tensor] | None = None, settings: DetectionSettings | None = None,
                     vocabulary: ClassifierVocabulary | None = None) -> list[dict]:
        """Detections per image in the frame of the (resized) network input; masks as [n, M, M] probabilities.

        ``objectness``: the RPN's probability of each proposal; ``settings``: what to keep (default: the
        config's ``test_settings``); ``vocabulary``: the categories (default: the installed ones).
        """
        st = settings or self.test_settings
        vocab, k = self._scoring_vocabulary(vocabulary, st)
        pooled = self.box_pooler(features, proposals, image_sizes)
        scores, deltas = self.class_scores(pooled, torch.cat(objectness) if objectness is not None else None, st,
                                           vocab)
        boxes = self.box_coder.decode(deltas.float(), proposals).squeeze(1)
        counts = [len(p) for p in proposals]
        scores = self.confidence(self.rescore(scores, boxes, counts, features, image_sizes, vocab), st,
                                 vocab.base_mask)
        results, rows = [], []
        for b, s, size in zip(boxes.split(counts), scores.split(counts), image_sizes):
            b = box_ops.clip_boxes_to_image(b, size)
            db, ds, dl, row = select_detections(b, s, st.score_thresh, st.nms_thresh, st.max_dets,
                                                st.topk_candidates, st.class_agnostic, num_shown=k)
            results.append({"boxes": db, "scores": ds, "labels": dl})
            rows.append(row)
        if self.mask_on and st.masks:
            self._predict_masks(features, image_sizes, results, rows)
        return results

    def forward_test_padded(self, features: dict, proposals: torch.Tensor, image_sizes: torch.Tensor,
                            score_thresh: torch.Tensor | float, max_dets: torch.Tensor | int,
                            objectness: torch.Tensor | None = None, settings: DetectionSettings | None = None,
                            vocabulary: ClassifierVocabulary | None = None) -> dict[str, torch.Tensor]:
        """``forward_test`` for padded proposals [B, P, 4] (zero rows: none) with no per-image loop, so that it traces.

        ``image_sizes`` int [B, 2]; ``score_thresh`` and ``max_dets`` may be 0-d tensors. Returns flat
        ``boxes``, ``scores``, ``labels``, ``batch_index`` (grouped by image, best first) and, with a mask head,
        ``mask_probs`` [n, M, M]; selection as ``select_detections_batched``. ``objectness`` [B, P],
        ``settings`` (scoring, NMS; its threshold and count are the arguments) and ``vocabulary`` as in
        ``forward_test``.
        """
        st = settings or self.test_settings
        vocabulary, k = self._scoring_vocabulary(vocabulary, st)
        n_img, width = proposals.shape[:2]
        flat = proposals.reshape(-1, 4)
        image_index = torch.arange(n_img, device=flat.device)[:, None].expand(n_img, width).reshape(-1)
        rois = torch.cat([image_index[:, None].to(flat.dtype), flat], dim=1)
        scores, deltas = self.class_scores(pool_rois(self.box_pooler, features, rois, image_sizes),
                                           None if objectness is None else objectness.reshape(-1), st, vocabulary)
        scores = self.confidence(scores, st, vocabulary.base_mask)
        boxes = self.box_coder.decode(deltas.float(), [flat]).view(n_img, width, 4)
        boxes = clip_boxes_per_image(boxes, image_sizes)
        db, ds, dl, di, _ = select_detections_batched(boxes, scores.view(n_img, width, -1), score_thresh,
                                                      st.nms_thresh, max_dets, st.topk_candidates,
                                                      st.class_agnostic, num_shown=k)
        out = {"boxes": db, "scores": ds, "labels": dl, "batch_index": di}
        if self.mask_on:
            rois = torch.cat([di[:, None].to(db.dtype), db], dim=1)
            pooled = pool_rois(self.mask_pooler, features, rois, image_sizes)
            out["mask_probs"] = self.mask_predictor(run_conv_stack(self.mask_head, pooled)).sigmoid()[:, 0]
        return out


def pool_rois(pooler: MultiScaleRoIAlign, features: dict, rois: torch.Tensor, image_sizes: torch.Tensor
              ) -> torch.Tensor:
    """``pooler(features, boxes_per_image, sizes)`` for rois [N, 5] (image index, x0, y0, x1, y1), a layout whose
    number of images can stay dynamic in a traced graph; same levels, scales and RoIAlign as the pooler's."""
    x = [v for k, v in features.items() if k in pooler.featmap_names]
    if pooler.scales is None or pooler.map_levels is None:
        # kept on the pooler, where its own forward keeps them: both ways of pooling use the same levels
        shapes = [tuple(int(v) for v in s) for s in image_sizes]
        pooler.scales, pooler.map_levels = level_scales(x, shapes, pooler.canonical_scale, pooler.canonical_level)
    if len(x) == 1:
        return roi_align(x[0], rois, pooler.output_size, pooler.scales[0], pooler.sampling_ratio)
    levels = pooler.map_levels([rois[:, 1:]])
    per_level = [roi_align(f, rois[torch.where(levels == lv)[0]], pooler.output_size, scale, pooler.sampling_ratio)
                 for lv, (f, scale) in enumerate(zip(x, pooler.scales))]
    return merge_levels(levels, per_level)


def _unzip(rows: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows laid out per image as [a_0, b_0, a_1, b_1, ...] (``sizes`` alternating) → (all a, all b)."""
    parts = rows.split(sizes)
    return torch.cat(parts[0::2]), torch.cat(parts[1::2])
