"""The ViLD detector: backbone → RPN → ViLD RoI heads, with a vocabulary that can change at run time."""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign

from ..config import CfgNode
from .backbone import build_backbone, norm_layer_for
from .box_head import ViLDBoxHead
from .classifier import ClassifierVocabulary, TextClassifier
from .postprocess import DetectionSettings
from .preprocess import ImagePreprocessor
from .roi_heads import ViLDRoIHeads
from .rpn import BatchedRPN


class ViLD(nn.Module):
    """Open-vocabulary Mask R-CNN; see ``docs/architecture.md`` for the input and output formats."""

    def __init__(self, preprocessor: ImagePreprocessor, backbone: nn.Module, rpn: BatchedRPN,
                 roi_heads: ViLDRoIHeads, mask_threshold: float = 0.5):
        super().__init__()
        self.preprocessor, self.backbone, self.rpn, self.roi_heads = preprocessor, backbone, rpn, roi_heads
        self.mask_threshold = mask_threshold

    @property
    def embed_dim(self) -> int:
        """Dimension of the region (and text) embeddings."""
        return self.roi_heads.classifier.embed_dim

    def set_vocabulary(self, text_embeddings: torch.Tensor, base_mask: torch.Tensor | None = None,
                       reference: torch.Tensor | None = None) -> None:
        """Swap the vocabulary: [K, D] normalised text embeddings; ``base_mask`` marks training categories;
        ``reference`` [Kr, D]: hidden categories that compete for regions but are never output."""
        self.roi_heads.classifier.set_vocabulary(text_embeddings, base_mask, reference)

    def make_vocabulary(self, text_embeddings: torch.Tensor, base_mask: torch.Tensor | None = None,
                        reference: torch.Tensor | None = None) -> ClassifierVocabulary:
        """A vocabulary for one call (``forward(..., vocabulary=...)``), leaving the installed one as it is;
        arguments as ``set_vocabulary``'s."""
        return self.roi_heads.classifier.make_vocabulary(text_embeddings, base_mask, reference)

    def extract_features(self, images: torch.Tensor) -> tuple[dict, dict]:
        """Feature maps for the RPN and for the RoI heads: the same FPN levels here (F-VLM's heads get one more)."""
        features = self.backbone(images)
        return features, features

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None,
                paste_masks: bool = True, settings: DetectionSettings | None = None,
                vocabulary: ClassifierVocabulary | None = None) -> dict[str, torch.Tensor] | list[dict]:
        """Training: dict of losses. Inference: per-image dicts of boxes, scores, labels, masks (original frame).

        ``settings`` (inference): threshold, NMS and detection count for this call; default: the config's.
        ``vocabulary`` (inference, ``make_vocabulary``): the categories of this call; default: the installed ones.
        """
        if self.training and targets is None:
            raise ValueError("training mode needs targets; call model.eval() for inference")
        batch, original_sizes = self.preprocessor(images)
        rpn_features, features = self.extract_features(batch.tensors)
        if self.training:
            targets = [{k: (v.to(batch.tensors.device) if torch.is_tensor(v) else v) for k, v in t.items()}
                       for t in targets]
            proposals, _, rpn_losses = self.rpn(batch, rpn_features, targets)
            losses = self.roi_heads.forward_train(features, proposals, batch.image_sizes, targets)
            return {**rpn_losses, **losses}
        proposals, objectness, _ = self.rpn(batch, rpn_features)
        results = self.roi_heads.forward_test(features, proposals, batch.image_sizes, objectness, settings,
                                              vocabulary)
        return self.preprocessor.postprocess(results, batch.image_sizes, original_sizes, self.mask_threshold,
                                             paste=paste_masks)

    def forward_padded(self, images: torch.Tensor, image_sizes: torch.Tensor, score_thresh: torch.Tensor | float,
                       max_dets: torch.Tensor | int, settings: DetectionSettings | None = None,
                       vocabulary: ClassifierVocabulary | None = None) -> dict[str, torch.Tensor]:
        """Inference on a normalised, padded batch [B, 3, H, W] with each image's (h, w) in ``image_sizes`` [B, 2],
        without per-image loops (it traces, for ONNX): flat detections in the batch's frame, grouped by image
        (see ``ViLDRoIHeads.forward_test_padded``); ``settings`` and ``vocabulary`` as in ``forward``."""
        rpn_features, features = self.extract_features(images)
        proposals, objectness = self.rpn.propose_padded(images, image_sizes, rpn_features)
        return self.roi_heads.forward_test_padded(features, proposals, image_sizes, score_thresh, max_dets,
                                                  objectness, settings, vocabulary)

    @torch.no_grad()
    def propose(self, images: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Class-agnostic RPN proposals (boxes in the input images' frame, objectness probabilities)."""
        was_training = self.training
        self.eval()
        try:
            batch, original_sizes = self.preprocessor(images)
            boxes, scores, *_ = self.rpn.propose(batch, self.extract_features(batch.tensors)[0])
        finally:
            self.train(was_training)
        out = []
        for b, s, (h, w), (oh, ow) in zip(boxes, scores, batch.image_sizes, original_sizes):
            out.append((b * torch.tensor([ow / w, oh / h, ow / w, oh / h], device=b.device), s))
        return out


def build_model(cfg: CfgNode, load_pretrained: bool = True, teacher: nn.Module | None = None) -> ViLD:
    """Build ViLD from a config (see ``vild/config.py``); ``load_pretrained=False``: weights come from a checkpoint.

    MODEL.VILD.VARIANT fvlm builds F-VLM (``fvlm.py``), whose frozen trunk is the teacher's in any case: that of
    ``teacher`` (a loaded ``CLIPTeacher``) if given, else read from TEACHER.MODEL / TEACHER.PRETRAINED.
    """
    if cfg.MODEL.VILD.VARIANT == "fvlm":
        from .fvlm import build_fvlm
        return build_fvlm(cfg, teacher)
    return assemble_model(cfg, build_backbone(cfg, load_pretrained))


def assemble_model(cfg: CfgNode, backbone: nn.Module, model_cls: type[ViLD] = ViLD,
                   heads_cls: type[ViLDRoIHeads] = ViLDRoIHeads, variant: str | None = None,
                   pixel_mean: list[float] | None = None, pixel_std: list[float] | None = None,
                   **head_kwargs) -> ViLD:
    """The detector around ``backbone`` (FPN levels with ``out_channels``): RPN, RoI heads and preprocessing.

    ``variant`` (default MODEL.VILD.VARIANT) goes to ``heads_cls`` with ``head_kwargs``; ``pixel_mean`` and
    ``pixel_std`` (default MODEL.PIXEL_MEAN / PIXEL_STD) normalise the 0..255 input.
    """
    m = cfg.MODEL
    variant = variant or m.VILD.VARIANT
    channels = backbone.out_channels
    anchors = AnchorGenerator(tuple(tuple(s) for s in m.ANCHOR.SIZES),
                              (tuple(m.ANCHOR.ASPECT_RATIOS),) * len(m.ANCHOR.SIZES))
    rpn = BatchedRPN(
        anchors, RPNHead(channels, anchors.num_anchors_per_location()[0], conv_depth=m.RPN.CONV_DEPTH),
        m.RPN.FG_IOU_THRESH, m.RPN.BG_IOU_THRESH, m.RPN.BATCH_SIZE_PER_IMAGE, m.RPN.POSITIVE_FRACTION,
        dict(training=m.RPN.PRE_NMS_TOPK_TRAIN, testing=m.RPN.PRE_NMS_TOPK_TEST),
        dict(training=m.RPN.POST_NMS_TOPK_TRAIN, testing=m.RPN.POST_NMS_TOPK_TEST), m.RPN.NMS_THRESH)
    levels = [str(i) for i in range(len(m.BACKBONE.RETURNED_LAYERS))]
    bh = m.ROI_BOX_HEAD
    box_pooler = MultiScaleRoIAlign(levels, bh.POOLER_RESOLUTION, bh.POOLER_SAMPLING_RATIO)
    head_norm = norm_layer_for(bh.NORM) if bh.NORM else None
    v = m.VILD

    def box_head(with_regression: bool) -> ViLDBoxHead:
        return ViLDBoxHead(channels, bh.POOLER_RESOLUTION, bh.NUM_CONV, bh.CONV_DIM, bh.NUM_FC, bh.FC_DIM,
                           v.EMBED_DIM, head_norm, with_regression)

    mask_pooler = mask_head = mask_predictor = None
    if m.MASK_ON:
        mh = m.ROI_MASK_HEAD
        mask_pooler = MultiScaleRoIAlign(levels, mh.POOLER_RESOLUTION, mh.POOLER_SAMPLING_RATIO)
        mask_head = MaskRCNNHeads(channels, [mh.CONV_DIM] * mh.NUM_CONV, 1, norm_layer=head_norm)
        mask_predictor = MaskRCNNPredictor(mh.CONV_DIM, mh.CONV_DIM, 1)  # class-agnostic: one mask channel
    rh = m.ROI_HEADS
    roi_heads = heads_cls(
        box_pooler, box_head(True), box_head(False) if variant == "ensemble" else None,
        TextClassifier(v.EMBED_DIM, v.TEMPERATURE), mask_pooler, mask_head, mask_predictor,
        variant=variant, fg_iou_thresh=rh.FG_IOU_THRESH, bg_iou_thresh=rh.BG_IOU_THRESH,
        batch_size_per_image=rh.BATCH_SIZE_PER_IMAGE, positive_fraction=rh.POSITIVE_FRACTION,
        bbox_reg_weights=tuple(bh.BBOX_REG_WEIGHTS), distill_weight=v.DISTILL_WEIGHT,
        num_distill_proposals=v.NUM_DISTILL_PROPOSALS, ensemble_lambda=v.ENSEMBLE_LAMBDA,
        test_settings=DetectionSettings(rh.SCORE_THRESH_TEST, rh.NMS_THRESH_TEST, rh.DETECTIONS_PER_IMAGE,
                                        rh.TOPK_CANDIDATES_TEST, rh.CLASS_AGNOSTIC_NMS_TEST,
                                        rh.OBJECTNESS_WEIGHT_TEST, rh.CENTERING_TEST),
        **head_kwargs)
    pre = ImagePreprocessor(pixel_mean or m.PIXEL_MEAN, pixel_std or m.PIXEL_STD, cfg.INPUT.TEST_SIZE,
                            cfg.INPUT.SIZE_DIVISIBILITY)
    return model_cls(pre, backbone, rpn, roi_heads, m.ROI_MASK_HEAD.MASK_THRESHOLD)
