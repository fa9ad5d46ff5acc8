"""What goes into the exported ONNX files: ViLD and the teacher's text tower as traceable modules.

The detector graph is the model's own inference path (backbone, ``BatchedRPN.propose_padded``,
``ViLDRoIHeads.forward_test_padded``: the same heads, ``class_scores``, box coder and selection rules) with
the vocabulary made from graph inputs for each call (``ViLD.make_vocabulary``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..modeling.postprocess import DetectionSettings
from ..modeling.vild import ViLD

# graph input and output names, in order (base_mask only for ViLD-ensemble and calibrated confidences, mask_probs
# only with a mask head)
DETECTOR_INPUTS = ("images", "image_sizes", "text_embeddings", "reference_embeddings", "score_thresh", "max_dets",
                   "base_mask")
DETECTOR_OUTPUTS = ("boxes", "scores", "labels", "batch_index", "mask_probs")


class DetectorGraph(nn.Module):
    """ViLD inference on a padded batch of raw pixels, with the vocabulary an input.

    Inputs: ``images`` float32 [B, 3, H, W] RGB on 0..255 (each image resized by the model's rule, placed
    top-left; the padding's values are ignored), ``image_sizes`` int64 [B, 2] (h, w of each image in the
    batch), ``text_embeddings`` float32 [K, D], ``reference_embeddings`` float32 [Kr, D] (hidden categories
    that compete in the softmax, Kr may be 0), ``score_thresh`` float32 [], ``max_dets`` int64 [] and, for
    ViLD-ensemble or calibrated confidences, ``base_mask`` bool [K] (True: seen in training). Outputs
    (``DETECTOR_OUTPUTS``): flat detections grouped by image.
    """

    def __init__(self, model: ViLD, settings: Optional[DetectionSettings] = None):
        super().__init__()
        self.model = model
        self.settings = settings or model.roi_heads.test_settings  # scoring and NMS, fixed in the graph

    def normalize(self, images: Tensor, image_sizes: Tensor) -> Tensor:
        """The preprocessor's normalisation, with the padding set to zero as the preprocessor pads."""
        pre = self.model.preprocessor
        x = (images - pre.pixel_mean) / pre.pixel_std
        rows = torch.arange(images.shape[2], device=images.device)[None, :, None] < image_sizes[:, 0, None, None]
        cols = torch.arange(images.shape[3], device=images.device)[None, None, :] < image_sizes[:, 1, None, None]
        return torch.where((rows & cols)[:, None], x, torch.zeros_like(x))

    def forward(self, images: Tensor, image_sizes: Tensor, text_embeddings: Tensor, reference_embeddings: Tensor,
                score_thresh: Tensor, max_dets: Tensor, base_mask: Optional[Tensor] = None) -> tuple[Tensor, ...]:
        """Detections: boxes (pixels of ``images``), scores, labels (rows of ``text_embeddings``), batch index,
        mask probabilities."""
        x = self.normalize(images, image_sizes)
        vocabulary = self.model.make_vocabulary(text_embeddings, base_mask, reference_embeddings)
        out = self.model.forward_padded(x, image_sizes, score_thresh, max_dets, self.settings, vocabulary)
        return tuple(out[k] for k in DETECTOR_OUTPUTS if k in out)


class TextTowerGraph(nn.Module):
    """The teacher's text tower: tokens int64 [N, context length] → unit prompt embeddings [N, D].

    Rows run whole: the tracer keeps the attention's sequence length fixed, so the PyTorch teacher's cut after
    the last end token (same values for a causal tower, less work) is not part of the graph.
    """

    def __init__(self, clip_model: nn.Module):
        super().__init__()
        self.model = clip_model

    def forward(self, tokens: Tensor) -> Tensor:
        """Unit embeddings of each prompt."""
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)
