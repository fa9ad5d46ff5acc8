"""The Python one-liner API: ``Detector.from_checkpoint(path)(image)`` → boxes, scores, labels, masks, names."""
from __future__ import annotations

import dataclasses
import json
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from .config import CfgNode
from .engine.checkpoint import ModelCheckpoint
from .engine.distributed import resolve_device
from .io import to_image_tensor
from .teacher import CLIPTeacher, parse_vocabulary
from .teacher.vocabulary import VocabLike, dedupe_case_insensitive, name_key

if TYPE_CHECKING:
    from .modeling.postprocess import DetectionSettings

# Scoring shown to people (see DetectionSettings); the evaluation keeps the config's. The geometric mean
# with the RPN's objectness keeps regions that are no object (clutter, parts of objects) low for any name;
# centering (with a checkpoint's calibrated region mean) takes hub names' head start away.
DISPLAY_OBJECTNESS_WEIGHT = 0.5
DISPLAY_CENTERING = 0.5
# Display thresholds per variant for checkpoints without a calibrated one (the model itself keeps
# SCORE_THRESH_TEST, 0.0, for AP). Ensemble scores of novel categories are smaller (p_T^(1-λ) stays low
# because the text head learned novel objects as background).
DEFAULT_SCORE_THRESH = {"text": 0.5, "vild": 0.5, "ensemble": 0.35}


def default_score_thresh(variant: str) -> float:
    """A score threshold for showing detections to people, chosen per ViLD variant."""
    return DEFAULT_SCORE_THRESH.get(variant, 0.5)


@dataclass
class DetectionResult:
    """Detections of one image, in its original frame."""

    boxes: torch.Tensor  # float32 [n, 4] xyxy pixels
    scores: torch.Tensor  # float32 [n]
    labels: torch.Tensor  # int64 [n], index into ``vocabulary``
    masks: Optional[torch.Tensor]  # bool [n, H, W]; None when the model has no mask head
    names: list[str]  # display name of each detection
    image: torch.Tensor  # uint8 [3, H, W] RGB, the image the detections belong to
    vocabulary: list[str] = field(default_factory=list)  # display names, label k → vocabulary[k]
    source: Optional[str] = None  # the path it was read from, if any
    _bounds: Optional[tuple] = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.scores)

    def draw(self) -> np.ndarray:
        """The image with masks, boxes and "name score" labels drawn (RGB uint8 H×W×3)."""
        return np.asarray(self._render())

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the annotated image (format from the file extension)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._render().save(path)

    def _render(self):
        from .visualize import render_detections
        return render_detections(self.image, self.boxes, self.labels, self.scores, self.names, self.masks,
                                 bounds=self._mask_bounds())

    def _mask_bounds(self) -> Optional[np.ndarray]:
        """Each mask's rows and columns (``vild.utils.mask_bounds``): found once for drawing and RLE, and again
        if the masks are replaced or edited in place (which bumps a tensor's version)."""
        if self.masks is None:
            return None
        cached = self._bounds
        if cached is None or cached[0] is not self.masks or cached[1] != self.masks._version:
            from .utils.mask_bounds import mask_bounds
            self._bounds = cached = (self.masks, self.masks._version, mask_bounds(self.masks))
        return cached[2]

    def to_coco_json(self, image_id: int = 0, category_ids: Union[Mapping[str, int], Sequence[int], None] = None
                     ) -> list[dict]:
        """COCO-results dicts: bbox xywh, score, category_name (+ category_id given a mapping), RLE segmentation.

        ``category_ids`` maps display names to ids, or is a list of ids in vocabulary order.
        """
        rles = self._rles()
        boxes, scores = self.boxes.tolist(), self.scores.tolist()  # Python floats at once, not one tensor each
        cat_ids = None if category_ids is None else self._category_ids(category_ids)
        out = []
        for i in range(len(self)):
            x0, y0, x1, y1 = boxes[i]
            d: dict[str, Any] = {"image_id": image_id, "category_name": self.names[i],
                                 "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                                 "score": round(scores[i], 5)}
            if cat_ids is not None:
                d["category_id"] = cat_ids[i]
            if rles is not None:
                d["segmentation"] = rles[i]
            out.append(d)
        return out

    def _category_ids(self, category_ids: Union[Mapping[str, int], Sequence[int]]) -> list[int]:
        if isinstance(category_ids, Mapping):
            missing = [n for n in self.names if n not in category_ids]
            if missing:
                raise KeyError(f"category {missing[0]!r} has no id in the mapping given to to_coco_json")
            return [int(category_ids[n]) for n in self.names]
        return [int(category_ids[k]) for k in self.labels.tolist()]

    def _rles(self) -> Optional[list[dict]]:
        if self.masks is None:
            return None
        from .evaluation.results import encode_masks
        return encode_masks(self.masks, self._mask_bounds()) if len(self) else []


class Detector:
    """An open-vocabulary detector: a trained ViLD model plus the CLIP teacher that embeds category names.

    ``vocabulary`` defaults to ``training_vocabulary``; ``score_thresh`` and ``max_dets`` to the config's
    test settings (0.0 and DETECTIONS_PER_IMAGE: right for AP, see ``default_score_thresh`` for display).
    Each box gets one label (NMS across the vocabulary); ``per_class_nms=True`` runs NMS per class instead,
    as the COCO/LVIS evaluation does, so that one box may carry several labels. With
    ``reference_vocabulary`` (default) the training categories the vocabulary leaves out still compete
    for each region, hidden: a region showing one of them is not forced onto the nearest name asked for.
    ``confidence``: show the calibrated confidences of the checkpoint's fit (default: when it has one), so that
    a shown 0.8 means about 8 in 10 such boxes were right on held-out images (``vild.engine.calibration``).
    ``abstain``: ViLD-ensemble's image head scores against a null of the checkpoint's calibrated similarity, so that
    regions resembling none of the names score low (default: when the checkpoint has one; see
    ``ViLDRoIHeads.class_scores``).
    ``text_cache_size`` bounds the text embeddings kept in memory (least recently used vocabularies go first);
    ``training_embeddings`` [len(training_vocabulary), D] spares embedding the training names.
    """

    def __init__(self, model: torch.nn.Module, teacher: CLIPTeacher, cfg: CfgNode,
                 training_vocabulary: Optional[list] = None, device: Union[str, torch.device] = "cpu",
                 vocabulary: Optional[VocabLike] = None, score_thresh: Optional[float] = None,
                 max_dets: Optional[int] = None, batch_size: int = 4, per_class_nms: bool = False,
                 reference_vocabulary: bool = True, objectness_weight: Optional[float] = None,
                 centering: Optional[float] = None, confidence: Optional[bool] = None,
                 abstain: Optional[bool] = None, text_cache_size: int = 64,
                 training_embeddings: Optional[torch.Tensor] = None):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.teacher, self.cfg = teacher, cfg
        self.training_vocabulary: list[list[str]] = (parse_vocabulary(training_vocabulary, dedupe=False)
                                                     if training_vocabulary else [])
        self.score_thresh = float(cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST if score_thresh is None else score_thresh)
        self.max_dets = int(cfg.MODEL.ROI_HEADS.DETECTIONS_PER_IMAGE if max_dets is None else max_dets)
        self.batch_size = int(batch_size)
        self.per_class_nms = bool(per_class_nms)
        self.reference_vocabulary = bool(reference_vocabulary)
        self.objectness_weight = DISPLAY_OBJECTNESS_WEIGHT if objectness_weight is None else float(objectness_weight)
        self.centering = DISPLAY_CENTERING if centering is None else float(centering)
        # calibrated confidences are shown when the checkpoint has a fit (from_checkpoint), unless asked otherwise
        self.confidence = confidence
        # ViLD-ensemble's image head abstains when the checkpoint has a calibrated null similarity (from_checkpoint)
        self.abstain = abstain
        # the threshold for showing detections to people: the checkpoint's calibrated one, else the variant's
        self.display_score_thresh = default_score_thresh(cfg.MODEL.VILD.VARIANT)
        # the training names' text embeddings (hidden competitors): embedded on first use unless given
        self._training_embeddings = training_embeddings
        self.training_keys = {name_key(s) for syns in self.training_vocabulary for s in syns}
        self.text_cache_size = int(text_cache_size)
        self._emb_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._vocab: list[list[str]] = []
        self._base_mask: list[bool] = []
        if vocabulary is not None or self.training_vocabulary:
            self.set_vocabulary(vocabulary if vocabulary is not None
                                else dedupe_case_insensitive(self.training_vocabulary))

    # ---- construction -----------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: Union[str, os.PathLike], device: Union[str, torch.device] = "auto",
                        cache_dir: Union[str, os.PathLike, None] = None, **kwargs: Any) -> "Detector":
        """Load a vild training checkpoint (safely), its config, weights, CLIP teacher and training vocabulary.

        Text embeddings are cached in ``cache_dir`` (default: $VILD_CACHE, else ~/.cache/vild), not in the
        training run's TEACHER.CACHE_DIR, a path on the machine that trained it.
        """
        dev = resolve_device(str(device))
        ckpt = ModelCheckpoint(path)
        cfg = ckpt.cfg
        cfg.TEACHER.CACHE_DIR = str(cache_dir) if cache_dir else ""
        cfg.TEACHER.PRETRAINED = _resolve_teacher_weights(cfg.TEACHER.PRETRAINED, Path(path).expanduser().parent,
                                                          ckpt.teacher.get("sha256"))
        teacher = CLIPTeacher.from_config(cfg, dev)
        ckpt.check_teacher(teacher.identity, "put the original teacher weights file beside the checkpoint")
        model = ckpt.build_model(teacher=teacher)
        det = cls(model, teacher, cfg, ckpt.data.get("vocabulary"), device=dev, **kwargs)
        calibration = ckpt.data.get("calibration") or {}
        if det.confidence is None:
            det.confidence = calibration.get("confidence") is not None
        if det.abstain is None:
            det.abstain = calibration.get("image_null") is not None
        # with a confidence fit, "score_thresh" is a confidence and "raw_score_thresh" the raw scores' own threshold
        key = "raw_score_thresh" if not det.confidence and "raw_score_thresh" in calibration else "score_thresh"
        if key in calibration:
            det.display_score_thresh = float(calibration[key])
        return det

    # ---- vocabulary -------------------------------------------------------------------------
    @property
    def variant(self) -> str:
        """The ViLD variant: text | vild | ensemble."""
        return self.cfg.MODEL.VILD.VARIANT

    @property
    def has_masks(self) -> bool:
        """Whether detections come with masks (False for a model trained on boxes only: ``masks`` is None)."""
        return bool(self.model.roi_heads.mask_on)

    @property
    def vocabulary(self) -> list[list[str]]:
        """The current categories, each a list of synonyms (the first is the display name)."""
        return [list(s) for s in self._vocab]

    @property
    def names(self) -> list[str]:
        """Display names of the current categories, in label order."""
        return [s[0] for s in self._vocab]

    @property
    def base_mask(self) -> list[bool]:
        """Per current category: True when it (or a synonym) was a training category."""
        return list(self._base_mask)

    def set_vocabulary(self, vocabulary: VocabLike) -> None:
        """Detect these categories from now on: "kite,unicycle", "couch|sofa,tv", or a list of names / synonym lists."""
        if not isinstance(vocabulary, str):
            # a list's positions are label indices the caller may map to ids: never drop or merge an entry
            vocab = parse_vocabulary(vocabulary, dedupe=False)
            keys = [name_key(syns[0]) for syns in vocab]
            if len(vocab) != len(vocabulary) or len(set(keys)) != len(keys):
                raise ValueError("every vocabulary entry needs a distinct, non-blank name (a blank or repeated "
                                 "entry would shift label indices); for a lenient parse pass one string")
        else:
            vocab = dedupe_case_insensitive(parse_vocabulary(vocabulary))
        key = json.dumps(vocab)
        emb = self._emb_cache.get(key)
        if emb is None:
            emb = self.teacher.encode_text(vocab)
        self._emb_cache[key] = emb
        self._emb_cache.move_to_end(key)
        while len(self._emb_cache) > max(1, self.text_cache_size):
            self._emb_cache.popitem(last=False)
        base = [any(name_key(s) in self.training_keys for s in syns) for syns in vocab]
        reference = self._reference_embeddings(vocab)
        self.model.set_vocabulary(emb.to(self.device), torch.tensor(base, dtype=torch.bool),
                                  None if reference is None else reference.to(self.device))
        self._vocab, self._base_mask = vocab, base

    def _reference_embeddings(self, vocab: list[list[str]]) -> Optional[torch.Tensor]:
        """Text embeddings of the training categories the vocabulary does not name (hidden competitors)."""
        if not self.reference_vocabulary or not self.training_vocabulary:
            return None
        named = {name_key(s) for syns in vocab for s in syns}
        rows = [i for i, syns in enumerate(self.training_vocabulary) if not any(name_key(s) in named for s in syns)]
        if not rows:
            return None
        if self._training_embeddings is None:
            self._training_embeddings = self.teacher.encode_text(self.training_vocabulary)
        return self._training_embeddings[rows]

    # ---- inference --------------------------------------------------------------------------
    def __call__(self, images: Any, bgr: bool = False, batch_size: Optional[int] = None, *,
                 score_thresh: Optional[float] = None, max_dets: Optional[int] = None, masks: bool = True
                 ) -> Union[DetectionResult, list[DetectionResult]]:
        """Detect in one image (→ one result) or a list of images (→ list, one forward pass per batch).

        An image is a path, PIL image, numpy array (RGB, or BGR with ``bgr=True``) or uint8 tensor [3, H, W].
        ``score_thresh``, ``max_dets`` and ``masks`` apply to this call only (see ``predict``).
        """
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        bs = max(1, int(batch_size or self.batch_size))
        results: list[DetectionResult] = []
        for i in range(0, len(items), bs):
            chunk = items[i:i + bs]
            sources = [str(x) if isinstance(x, (str, os.PathLike)) else None for x in chunk]
            results += self.predict([to_image_tensor(x, bgr) for x in chunk], sources, score_thresh=score_thresh,
                                    max_dets=max_dets, masks=masks)
        return results[0] if single else results

    def display_settings(self, **overrides: Any) -> DetectionSettings:
        """The model's test settings with this detector's way of showing detections (one label per box unless
        ``per_class_nms``, objectness, centering, confidence, abstention); ``overrides`` replace any field."""
        return dataclasses.replace(self.model.roi_heads.test_settings, **{
            "class_agnostic": not self.per_class_nms, "objectness_weight": self.objectness_weight,
            "centering": self.centering, "confidence": bool(self.confidence), "abstain": bool(self.abstain),
            **overrides})

    @torch.no_grad()  # not inference_mode: results must stay ordinary tensors that callers may edit in place
    def predict(self, images: list[torch.Tensor], sources: Optional[list[Optional[str]]] = None, *,
                score_thresh: Optional[float] = None, max_dets: Optional[int] = None,
                masks: bool = True) -> list[DetectionResult]:
        """One forward pass over uint8 RGB tensors [3, H, W]; returns a result per image.

        ``score_thresh`` and ``max_dets`` override the detector's settings for this call only; ``masks=False``
        skips the mask head (boxes only, faster).
        """
        score_thresh = self.score_thresh if score_thresh is None else float(score_thresh)
        max_dets = self.max_dets if max_dets is None else int(max_dets)
        if not self._vocab:
            raise RuntimeError('no vocabulary: call detector.set_vocabulary("cat,dog") first')
        if max_dets < 1:
            raise ValueError(f"max_dets is {max_dets}: keep at least 1 detection per image")
        if sources is not None and len(sources) != len(images):
            raise ValueError(f"{len(images)} images but {len(sources)} sources: pass one source (or None) per image")
        if not images:
            return []
        # thresholding inside the model spares the mask head the detections that would be dropped
        settings = self.display_settings(score_thresh=score_thresh, max_dets=max_dets, masks=masks)
        outputs = self.model([im.to(self.device) for im in images], settings=settings)
        names = self.names
        results = []
        for im, out, src in zip(images, outputs, sources or [None] * len(images)):
            keep = torch.nonzero(out["scores"] >= score_thresh).squeeze(1)[:max_dets]
            if len(keep) < len(out["scores"]):  # the model thresholds already: usually nothing to drop, and
                out = {k: v[keep] for k, v in out.items()}  # indexing would copy masks of [n, H, W] bytes
            labels = out["labels"].cpu()
            masks = out["masks"].cpu() if "masks" in out else None
            results.append(DetectionResult(out["boxes"].float().cpu(), out["scores"].float().cpu(),
                                           labels, masks, [names[int(k)] for k in labels], im.cpu(), names, src))
        return results


def _resolve_teacher_weights(pretrained: str, checkpoint_dir: Path, sha256: Optional[str] = None) -> str:
    """The teacher weights file: as named (from the cwd) or beside the checkpoint, the one whose sha256 is the
    training teacher's when several exist; open_clip tags pass through."""
    if not pretrained:
        return pretrained
    # distinct files only: the teacher hashes the chosen one again, and CLIP weights are hundreds of MB
    found = list({os.path.realpath(c): str(c) for c in (Path(pretrained), checkpoint_dir / pretrained,
                                                        checkpoint_dir / Path(pretrained).name)
                  if c.is_file()}.values())
    if sha256 and len(found) > 1:
        from .teacher.clip_teacher import sha256_file
        for cand in found:
            if sha256_file(cand) == sha256:
                return cand
    return found[0] if found else pretrained  # an open_clip tag, or missing: CLIPTeacher says which
