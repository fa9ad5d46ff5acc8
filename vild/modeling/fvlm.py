"""F-VLM (Kuo et al., ICLR 2023): the CLIP teacher's frozen image trunk as the detector's backbone, and CLIP's own
score of each detected region ensembled with the detector's at test time.

Only the FPN, the RPN and ViLD-text's heads train: no distillation, no proposal store. The trunk is the teacher's
open_clip ``ModifiedResNet`` (CLIP RN50 … RN50x64, or the synthetic demo's tiny teacher), read from
TEACHER.PRETRAINED whenever the model is built and never saved with the detector's weights.
"""
from __future__ import annotations

import copy
import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import boxes as box_ops
from torchvision.ops import roi_align
from torchvision.ops.feature_pyramid_network import (
    FeaturePyramidNetwork,
    LastLevelMaxPool,
)

from ..config import CfgNode
from .backbone import freeze_batchnorm
from .classifier import ClassifierVocabulary
from .roi_heads import ViLDRoIHeads
from .vild import ViLD, assemble_model

CLIP_FEATURES = "clip"  # the trunk's last map among the RoI heads' features (the poolers read only FPN levels)
TRUNK_STRIDE = 32  # of a ModifiedResNet's last stage
TRUNK_DTYPES = {"": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def clip_trunk(visual: nn.Module, model_name: str) -> nn.Module:
    """The teacher's image tower if it is a convolutional trunk with attention pooling (open_clip's ModifiedResNet)."""
    if not all(hasattr(visual, a) for a in ("stem", "layer1", "layer2", "layer3", "layer4", "attnpool")):
        raise ValueError(
            f"MODEL.VILD.VARIANT fvlm needs a CLIP teacher whose image tower is a convolutional trunk with attention "
            f"pooling (open_clip's ModifiedResNet: TEACHER.MODEL RN50, RN101, RN50x4, RN50x16, RN50x64, or the "
            f"demo's vild-tiny-clip), but TEACHER.MODEL {model_name!r} has a {type(visual).__name__}: choose one of "
            f"those teachers, or MODEL.VILD.VARIANT vild / ensemble for this one")
    return visual


class FrozenCLIPTrunk(nn.Module):
    """The stem, four stages and attention pool of a CLIP ModifiedResNet, frozen.

    Frozen means: no parameter requires a gradient, the forward pass records no graph, BatchNorm is
    ``FrozenBatchNorm2d`` and the module stays in eval mode, and the weights are left out of the state dict
    (they are the teacher's, so a detector checkpoint loads without them).

    Args:
        visual: an open_clip ModifiedResNet (a teacher's ``model.visual``); modified in place.
        dtype: dtype of the trunk's weights and activations (fp16 / bf16 halve its memory and time on GPUs);
            its outputs are float32 either way.
    """

    def __init__(self, visual: nn.Module, dtype: torch.dtype = torch.float32):
        super().__init__()
        visual.requires_grad_(False)
        freeze_batchnorm(visual)
        self.visual = visual.to(dtype).eval()
        self.channels = [stage[-1].conv3.out_channels for stage in self.stages]
        self.grid = math.isqrt(visual.attnpool.positional_embedding.shape[0] - 1)  # the pool's input is grid × grid
        self._prefix = ""
        self.register_load_state_dict_post_hook(_forget_trunk_keys)

    @property
    def stages(self) -> list[nn.Module]:
        """layer1 … layer4 (strides 4, 8, 16, 32)."""
        return [self.visual.layer1, self.visual.layer2, self.visual.layer3, self.visual.layer4]

    @property
    def attnpool(self) -> nn.Module:
        """CLIP's attention pooling (open_clip's AttentionPool2d)."""
        return self.visual.attnpool

    def train(self, mode: bool = True) -> "FrozenCLIPTrunk":
        """The trunk stays in eval mode whatever its parent does."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four stages' outputs (float32) for normalised images [B, 3, H, W]."""
        with torch.no_grad():
            x = self.visual.stem(x.to(self.visual.conv1.weight.dtype))
            out = []
            for stage in self.stages:
                x = stage(x)
                out.append(x.float())
        return out

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """Nothing: the trunk's weights are the teacher's file's, not the detector's."""
        return OrderedDict() if destination is None else destination

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._prefix = prefix  # for _forget_trunk_keys, which runs after the trunk's children have loaded
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _forget_trunk_keys(trunk: FrozenCLIPTrunk, incompatible_keys) -> None:
    """A checkpoint holds no trunk weights: their absence is expected, not an error of a strict load."""
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if not k.startswith(trunk._prefix)]


class CLIPTrunkFPN(nn.Module):
    """A trainable FPN on a frozen CLIP trunk: FPN levels '0', '1', … and 'pool', plus the trunk's last map.

    Args:
        trunk: the frozen trunk.
        returned_layers: the trunk stages (1..4) that feed the FPN, as MODEL.BACKBONE.RETURNED_LAYERS.
        out_channels: the FPN's width.
    """

    def __init__(self, trunk: FrozenCLIPTrunk, returned_layers: list[int], out_channels: int):
        super().__init__()
        if not returned_layers or any(k not in (1, 2, 3, 4) for k in returned_layers):
            raise ValueError(f"MODEL.BACKBONE.RETURNED_LAYERS {list(returned_layers)} must name trunk stages 1..4")
        self.trunk = trunk
        self.returned_layers = list(returned_layers)
        self.fpn = FeaturePyramidNetwork([trunk.channels[k - 1] for k in self.returned_layers], out_channels,
                                         extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> tuple[OrderedDict, torch.Tensor]:
        """(FPN levels, the trunk's last map [B, C, H/32, W/32]) of normalised images."""
        stages = self.trunk(x)
        levels = OrderedDict((str(i), stages[k - 1]) for i, k in enumerate(self.returned_layers))
        return self.fpn(levels), stages[-1]


class VLMScorer(nn.Module):
    """CLIP's own embedding of image regions: each box RoIAligned on the trunk's last map to the attention pool's
    input grid, then pooled by the trunk's attention pool, as CLIP pools a whole image.

    The result equals ``attnpool(roi_align(last_map, boxes, grid, aligned=True))``, computed without projecting
    grid² + 1 tokens per box (for RN50 and 1000 boxes, 0.4 TFLOP): RoIAlign is linear in the map and the
    pool's query, key and value projections are affine, so the map's cells are projected once per image and
    each box's tokens are weighted sums of them, with RoIAlign's own weights (got by aligning an identity map).

    Args:
        trunk: the frozen trunk whose attention pool is used.
        sampling_ratio: RoIAlign samples per bin side (-1: adaptive, ceil(box side / grid)).
        chunk: boxes per step, bounding the [boxes, grid² + 1, cells] weights in memory.
    """

    def __init__(self, trunk: FrozenCLIPTrunk, sampling_ratio: int = -1, chunk: int = 256):
        super().__init__()
        self.trunk = trunk
        self.sampling_ratio, self.chunk = sampling_ratio, chunk

    def forward(self, last_map: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
        """L2-normalised embeddings [R, D] of each image's xyxy boxes (input pixels) from last maps [B, C, h, w]."""
        out = []
        with torch.no_grad(), torch.autocast(last_map.device.type, enabled=False):
            for cells, b in zip(last_map.float(), boxes):
                qkv = self._project_cells(cells)
                out += [self._pool(qkv, cells.shape[-2:], part.float()) for part in b.split(self.chunk) if len(part)]
        pool = self.trunk.attnpool
        if not out:
            return last_map.new_zeros((0, pool.c_proj.out_features), dtype=torch.float32)
        return torch.cat(out)

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.trunk.attnpool
        w = torch.cat([p.q_proj.weight, p.k_proj.weight, p.v_proj.weight]).float()
        return w, torch.cat([p.q_proj.bias, p.k_proj.bias, p.v_proj.bias]).float()

    def _project_cells(self, cells: torch.Tensor) -> torch.Tensor:
        """Query, key and value projections (no bias) of every cell of one map [C, h, w]: [h·w, 3C]."""
        w, _ = self._weights()
        return cells.flatten(1).t() @ w.t()

    def _pool(self, qkv_cells: torch.Tensor, size: tuple, boxes: torch.Tensor) -> torch.Tensor:
        pool = self.trunk.attnpool
        h, w = int(size[0]), int(size[1])
        c = qkv_cells.shape[1] // 3
        heads = pool.num_heads
        hd = c // heads
        w_qkv, b_qkv = self._weights()
        q_cells, k_cells, v_cells = (x.reshape(h * w, heads, hd) for x in qkv_cells.split(c, dim=1))
        pos = F.linear(pool.positional_embedding.float(), w_qkv, b_qkv)  # [T, 3C]; token 0 is the mean token
        _, k_pos, v_pos = (x.reshape(-1, heads, hd) for x in pos.split(c, dim=1))  # q: token 0 only, below
        # RoIAlign's weights: token j of box r is sum over cells of a[r, j, cell] * cell
        eye = torch.eye(h * w, device=boxes.device).view(1, h * w, h, w)
        g = self.trunk.grid
        a = roi_align(eye, [boxes], (g, g), 1.0 / TRUNK_STRIDE, self.sampling_ratio, aligned=True)
        a = a.flatten(2).transpose(1, 2)  # [r, g*g, h*w]
        a = torch.cat([a.mean(1, keepdim=True), a], dim=1)  # AttentionPool2d's first token: the mean of the others
        # only the mean token's output is kept, so only its query is needed
        q = (a[:, 0] @ q_cells.flatten(1) + pos[0, :c]).view(-1, heads, hd) * hd ** -0.5
        # q · (a @ k_cells + k_pos) = (q · k_cells) @ aᵀ + q · k_pos, per head
        logits = torch.einsum("rnd,cnd->rnc", q, k_cells) @ a.transpose(1, 2) + torch.einsum("rnd,tnd->rnt", q, k_pos)
        p = logits.softmax(dim=-1)  # [r, heads, T]
        # p @ (a @ v_cells + v_pos) = (p @ a) · v_cells + p @ v_pos
        out = torch.einsum("rnc,cnd->rnd", p @ a, v_cells) + torch.einsum("rnt,tnd->rnd", p, v_pos)
        emb = F.linear(out.reshape(-1, c), pool.c_proj.weight.float(), pool.c_proj.bias.float())
        return F.normalize(emb, dim=-1)


def fvlm_ensemble(p_det: torch.Tensor, p_vlm: torch.Tensor, base_mask: torch.Tensor, alpha: float,
                  beta: float) -> torch.Tensor:
    """F-VLM's geometric ensemble per category: base p_det^(1−α)·p_vlm^α, novel p_det^(1−β)·p_vlm^β."""
    w = base_mask.to(p_det.dtype) * (alpha - beta) + beta
    return p_det.clamp_min(1e-12) ** (1.0 - w) * p_vlm.clamp_min(1e-12) ** w


class FVLMRoIHeads(ViLDRoIHeads):
    """ViLD-text's RoI heads (and training), whose test-time class probabilities are ensembled with CLIP's own.

    Args (besides ViLDRoIHeads'):
        vlm: the scorer of regions on the trunk's last map.
        alpha: weight of CLIP's probability for base categories (MODEL.FVLM.ALPHA).
        beta: the same for novel categories (MODEL.FVLM.BETA).
        vlm_temperature: softmax temperature of CLIP's region-to-text cosines.
    """

    def __init__(self, *args, vlm: VLMScorer, alpha: float = 0.35, beta: float = 0.65,
                 vlm_temperature: float = 0.01, **kwargs):
        super().__init__(*args, **kwargs)
        self.vlm, self.alpha, self.beta, self.vlm_temperature = vlm, alpha, beta, vlm_temperature

    def vlm_scores(self, last_map: torch.Tensor, boxes: list[torch.Tensor],
                   vocabulary: ClassifierVocabulary | None = None) -> torch.Tensor:
        """CLIP's probabilities [R, K] over ``vocabulary`` (default: the installed one) for each image's boxes
        (no background)."""
        text = self.classifier.vocabulary_for(vocabulary).text_embeddings
        emb = self.vlm(last_map, boxes)
        return F.softmax(emb @ text.t() / self.vlm_temperature, dim=-1)

    def rescore(self, scores: torch.Tensor, boxes: torch.Tensor, counts: list[int], features: dict,
                image_sizes: list, vocabulary: ClassifierVocabulary) -> torch.Tensor:
        """The detector's probabilities ensembled with CLIP's for the same (clipped) boxes."""
        clipped = [box_ops.clip_boxes_to_image(b, s) for b, s in zip(boxes.split(counts), image_sizes)]
        p_vlm = self.vlm_scores(features[CLIP_FEATURES], clipped, vocabulary)
        return fvlm_ensemble(scores, p_vlm, vocabulary.base_mask, self.alpha, self.beta)


class FVLM(ViLD):
    """ViLD's detector on a frozen CLIP trunk: the RPN reads the FPN levels, the RoI heads also the trunk's last map."""

    def extract_features(self, images: torch.Tensor) -> tuple[dict, dict]:
        """FPN levels for the RPN; the same plus the trunk's last map (CLIP_FEATURES) for the RoI heads."""
        levels, last = self.backbone(images)
        return levels, {**levels, CLIP_FEATURES: last}


def build_fvlm(cfg: CfgNode, teacher: nn.Module | None = None) -> FVLM:
    """F-VLM from a config: a copy of ``teacher``'s image trunk (a loaded ``CLIPTeacher``), or without one the trunk
    of TEACHER.MODEL / TEACHER.PRETRAINED; the rest as MODEL.* says.

    The input is normalised as the teacher's images are (its mean and std), whatever MODEL.PIXEL_MEAN says.
    """
    from ..teacher.clip_teacher import OPENAI_MEAN, OPENAI_STD, _create_model
    t, f = cfg.TEACHER, cfg.MODEL.FVLM
    if f.TRUNK_DTYPE not in TRUNK_DTYPES:
        raise ValueError(f"unknown MODEL.FVLM.TRUNK_DTYPE {f.TRUNK_DTYPE!r}: use '' (fp32), fp16 or bf16")
    if teacher is not None:
        visual = copy.deepcopy(teacher.model.visual)  # the teacher's own stays as it is (dtype, BatchNorm)
    else:
        visual = _create_model(t.MODEL, t.PRETRAINED, torch.device("cpu")).visual
    visual = clip_trunk(visual, t.MODEL)
    dim = visual.attnpool.c_proj.out_features
    if cfg.MODEL.VILD.EMBED_DIM != dim:
        raise ValueError(f"MODEL.VILD.EMBED_DIM is {cfg.MODEL.VILD.EMBED_DIM} but teacher {t.MODEL!r} embeds in "
                         f"{dim} dimensions: set MODEL.VILD.EMBED_DIM {dim}")
    pre = getattr(visual, "preprocess_cfg", None) or {}
    mean = [255.0 * v for v in pre.get("mean", OPENAI_MEAN)]
    std = [255.0 * v for v in pre.get("std", OPENAI_STD)]
    trunk = FrozenCLIPTrunk(visual, TRUNK_DTYPES[f.TRUNK_DTYPE])
    backbone = CLIPTrunkFPN(trunk, list(cfg.MODEL.BACKBONE.RETURNED_LAYERS), cfg.MODEL.BACKBONE.OUT_CHANNELS)
    return assemble_model(cfg, backbone, model_cls=FVLM, heads_cls=FVLMRoIHeads, variant="fvlm", pixel_mean=mean,
                          pixel_std=std, vlm=VLMScorer(trunk), alpha=f.ALPHA, beta=f.BETA,
                          vlm_temperature=f.VLM_TEMPERATURE)
