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
from .classifier import TextClassifier
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

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None,
                paste_masks: bool = True, settings: DetectionSettings | None = None
                ) -> dict[str, torch.Tensor] | list[dict]:
        """Training: dict of losses. Inference: per-image dicts of boxes, scores, labels, masks (original frame).

        ``settings`` (inference): threshold, NMS and detection count for this call; default: the config's.
        """
        if self.training and targets is None:
            raise ValueError("training mode needs targets; call model.eval() for inference")
        batch, original_sizes = self.preprocessor(images)
        features = self.backbone(batch.tensors)
        if self.training:
            targets = [{k: (v.to(batch.tensors.device) if torch.is_tensor(v) else v) for k, v in t.items()}
                       for t in targets]
            proposals, _, rpn_losses = self.rpn(batch, features, targets)
            losses = self.roi_heads.forward_train(features, proposals, batch.image_sizes, targets)
            return {**rpn_losses, **losses}
        proposals, objectness, _ = self.rpn(batch, features)
        results = self.roi_heads.forward_test(features, proposals, batch.image_sizes, objectness, settings)
        return self.preprocessor.postprocess(results, batch.image_sizes, original_sizes, self.mask_threshold,
                                             paste=paste_masks)

    def forward_padded(self, images: torch.Tensor, image_sizes: torch.Tensor, score_thresh: torch.Tensor | float,
                       max_dets: torch.Tensor | int, settings: DetectionSettings | None = None
                       ) -> dict[str, torch.Tensor]:
        """Inference on a normalised, padded batch [B, 3, H, W] with each image's (h, w) in ``image_sizes`` [B, 2],
        without per-image loops (it traces, for ONNX): flat detections in the batch's frame, grouped by image
        (see ``ViLDRoIHeads.forward_test_padded``)."""
        features = self.backbone(images)
        proposals, objectness = self.rpn.propose_padded(images, image_sizes, features)
        return self.roi_heads.forward_test_padded(features, proposals, image_sizes, score_thresh, max_dets,
                                                  objectness, settings)

    @torch.no_grad()
    def propose(self, images: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Class-agnostic RPN proposals (boxes in the input images' frame, objectness probabilities)."""
        was_training = self.training
        self.eval()
        try:
            batch, original_sizes = self.preprocessor(images)
            boxes, scores, *_ = self.rpn.propose(batch, self.backbone(batch.tensors))
        finally:
            self.train(was_training)
        out = []
        for b, s, (h, w), (oh, ow) in zip(boxes, scores, batch.image_sizes, original_sizes):
            out.append((b * torch.tensor([ow / w, oh / h, ow / w, oh / h], device=b.device), s))
        return out


def build_model(cfg: CfgNode, load_pretrained: bool = True) -> ViLD:
    """Build ViLD from a config (see ``vild/config.py``); ``load_pretrained=False``: weights come from a checkpoint."""
    model_cfg = cfg.MODEL
    backbone = build_backbone(cfg, load_pretrained)
    channels = backbone.out_channels
    anchors = AnchorGenerator(tuple(tuple(s) for s in model_cfg.ANCHOR.SIZES),
                              (tuple(model_cfg.ANCHOR.ASPECT_RATIOS),) * len(model_cfg.ANCHOR.SIZES))
    rpn_cfg = model_cfg.RPN
    rpn = BatchedRPN(
        anchors, RPNHead(channels, anchors.num_anchors_per_location()[0], conv_depth=rpn_cfg.CONV_DEPTH),
        rpn_cfg.FG_IOU_THRESH, rpn_cfg.BG_IOU_THRESH, rpn_cfg.BATCH_SIZE_PER_IMAGE, rpn_cfg.POSITIVE_FRACTION,
        dict(training=rpn_cfg.PRE_NMS_TOPK_TRAIN, testing=rpn_cfg.PRE_NMS_TOPK_TEST),
        dict(training=rpn_cfg.POST_NMS_TOPK_TRAIN, testing=rpn_cfg.POST_NMS_TOPK_TEST), rpn_cfg.NMS_THRESH)
    levels = [str(i) for i in range(len(model_cfg.BACKBONE.RETURNED_LAYERS))]
    box_cfg = model_cfg.ROI_BOX_HEAD
    box_pooler = MultiScaleRoIAlign(levels, box_cfg.POOLER_RESOLUTION, box_cfg.POOLER_SAMPLING_RATIO)
    head_norm = norm_layer_for(box_cfg.NORM) if box_cfg.NORM else None
    vild_cfg = model_cfg.VILD

    def box_head(with_regression: bool) -> ViLDBoxHead:
        return ViLDBoxHead(channels, box_cfg.POOLER_RESOLUTION, box_cfg.NUM_CONV, box_cfg.CONV_DIM, box_cfg.NUM_FC,
                           box_cfg.FC_DIM, vild_cfg.EMBED_DIM, head_norm, with_regression)

    mask_pooler = mask_head = mask_predictor = None
    if model_cfg.MASK_ON:
        mask_cfg = model_cfg.ROI_MASK_HEAD
        mask_pooler = MultiScaleRoIAlign(levels, mask_cfg.POOLER_RESOLUTION, mask_cfg.POOLER_SAMPLING_RATIO)
        mask_head = MaskRCNNHeads(channels, [mask_cfg.CONV_DIM] * mask_cfg.NUM_CONV, 1, norm_layer=head_norm)
        mask_predictor = MaskRCNNPredictor(mask_cfg.CONV_DIM, mask_cfg.CONV_DIM, 1)  # class-agnostic: one mask channel
    heads_cfg = model_cfg.ROI_HEADS
    roi_heads = ViLDRoIHeads(
        box_pooler, box_head(True), box_head(False) if vild_cfg.VARIANT == "ensemble" else None,
        TextClassifier(vild_cfg.EMBED_DIM, vild_cfg.TEMPERATURE), mask_pooler, mask_head, mask_predictor,
        variant=vild_cfg.VARIANT, fg_iou_thresh=heads_cfg.FG_IOU_THRESH, bg_iou_thresh=heads_cfg.BG_IOU_THRESH,
        batch_size_per_image=heads_cfg.BATCH_SIZE_PER_IMAGE, positive_fraction=heads_cfg.POSITIVE_FRACTION,
        bbox_reg_weights=tuple(box_cfg.BBOX_REG_WEIGHTS), distill_weight=vild_cfg.DISTILL_WEIGHT,
        num_distill_proposals=vild_cfg.NUM_DISTILL_PROPOSALS, ensemble_lambda=vild_cfg.ENSEMBLE_LAMBDA,
        test_settings=DetectionSettings(heads_cfg.SCORE_THRESH_TEST, heads_cfg.NMS_THRESH_TEST,
                                        heads_cfg.DETECTIONS_PER_IMAGE, heads_cfg.TOPK_CANDIDATES_TEST,
                                        heads_cfg.CLASS_AGNOSTIC_NMS_TEST, heads_cfg.OBJECTNESS_WEIGHT_TEST,
                                        heads_cfg.CENTERING_TEST))
    pre = ImagePreprocessor(model_cfg.PIXEL_MEAN, model_cfg.PIXEL_STD, cfg.INPUT.TEST_SIZE,
                            cfg.INPUT.SIZE_DIVISIBILITY)
    return ViLD(pre, backbone, rpn, roi_heads, model_cfg.ROI_MASK_HEAD.MASK_THRESHOLD)
