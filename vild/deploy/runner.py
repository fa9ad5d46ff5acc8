"""``OnnxDetector``: the exported detector on onnxruntime, with the call and results of ``vild.Detector``.

It is a ``Detector`` whose model is the ONNX graph (``OnnxModel``) and whose text encoder is the exported text
tower: vocabulary parsing, batching, image reading and ``DetectionResult`` are the Detector's own. Resizing
before the graph and mask pasting after it are the model's own code too (``ImagePreprocessor``), so torch is
imported here; the graph itself runs on onnxruntime.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from ..api import Detector
from ..config import cfg_from_dict
from ..modeling.classifier import TextClassifier
from ..modeling.postprocess import DetectionSettings
from ..modeling.preprocess import ImagePreprocessor
from ..teacher.vocabulary import parse_vocabulary
from .export import DETECTOR_FORMAT, text_model_path
from .graph import DETECTOR_OUTPUTS
from .text import OnnxTextEncoder, VocabEmbeddings, load_vocab, open_graph, graph_metadata


def providers_for(device: str) -> list[str]:
    """onnxruntime execution providers for a device name: cpu | cuda | cuda:N | auto."""
    import onnxruntime as ort
    available = ort.get_available_providers()
    device = str(device)
    if device == "cpu":
        return ["CPUExecutionProvider"]
    has_cuda = "CUDAExecutionProvider" in available
    if device == "auto":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"] if has_cuda else ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if not has_cuda:
            raise ValueError(f"device {device}: this onnxruntime has no CUDA provider (it has {available}); "
                             f"install onnxruntime-gpu or pass --device cpu")
        index = int(device.split(":")[1]) if ":" in device else 0
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    raise ValueError(f"unknown device {device!r}: use cpu, cuda, cuda:N or auto")


def check_image(image: Any, index: int = 0) -> None:
    """An image the model takes: a uint8 (or float, 0..255) tensor [3, H, W]; else a ValueError saying what to pass."""
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"image {index} is a {type(image).__name__}: pass uint8 RGB tensors [3, H, W] "
                         f"(or call the detector, which reads paths, PIL images and arrays)")
    if image.dtype != torch.uint8 and not image.is_floating_point():
        raise ValueError(f"image {index} has dtype {image.dtype}: pass uint8 RGB [3, H, W] (or float on 0..255)")
    if image.dim() != 3 or image.shape[0] != 3 or image.shape[1] < 1 or image.shape[2] < 1:
        raise ValueError(f"image {index} has shape {tuple(image.shape)}: pass RGB images [3, H, W]")


class OnnxModel:
    """The exported graph in the place of a ``ViLD`` module: images in (list of [3, H, W]), per-image dicts out.

    Args:
        runtime: an onnxruntime inference runtime for a ``vild-export`` detector file.
        meta: its metadata (``graph_metadata``).
    """

    def __init__(self, runtime: Any, meta: dict[str, str]):
        self.runtime = runtime
        self.variant = meta["variant"]
        # the graph normalises: the preprocessor here only resizes and pads raw pixels (mean 0, std 1)
        self.preprocessor = ImagePreprocessor([0.0] * 3, [1.0] * 3, int(meta["test_size"]),
                                              int(meta["size_divisibility"])).eval()
        self.mask_threshold = float(meta["mask_threshold"])
        # scoring and NMS are fixed in the graph; its threshold and detection count are inputs
        fixed = json.loads(meta["settings"]) if meta.get("settings") else {}
        self.roi_heads = SimpleNamespace(test_settings=DetectionSettings(**{
            **fixed, "score_thresh": float(meta["score_thresh"]), "max_dets": int(meta["max_dets"])}),
            mask_on="mask_probs" in [o.name for o in runtime.get_outputs()])
        # checks and normalises vocabularies with the model's own rules and messages
        self.classifier = TextClassifier(int(meta["embed_dim"]))
        self.outputs = [o.name for o in runtime.get_outputs()]
        self.takes_base_mask = any(i.name == "base_mask" for i in runtime.get_inputs())

    @property
    def embed_dim(self) -> int:
        """Dimension of the text embeddings the graph takes."""
        return self.classifier.embed_dim

    def to(self, device: Union[str, torch.device]) -> "OnnxModel":
        """Inputs and outputs live on the CPU (onnxruntime's providers choose where the graph runs)."""
        if torch.device(device).type != "cpu":
            raise ValueError(f"an OnnxModel takes CPU tensors, not {device}: choose the GPU with providers")
        return self

    def eval(self) -> "OnnxModel":
        """Always in inference mode."""
        return self

    def set_vocabulary(self, text_embeddings: torch.Tensor, base_mask: Optional[torch.Tensor] = None,
                       reference: Optional[torch.Tensor] = None) -> None:
        """Classify against [K, D] text embeddings from now on, with hidden ``reference`` ones competing
        (``ViLD.set_vocabulary``'s checks)."""
        self.classifier.set_vocabulary(text_embeddings, base_mask, reference)

    def run(self, images: np.ndarray, image_sizes: np.ndarray,
            settings: Optional[DetectionSettings] = None) -> dict[str, np.ndarray]:
        """The graph on a padded batch of raw pixels float32 [B, 3, H, W] and (h, w) int64 [B, 2]: flat outputs."""
        if self.classifier.num_classes == 0:
            raise RuntimeError('no vocabulary: call detector.set_vocabulary("cat,dog") first')
        d = self.preprocessor.size_divisibility
        if not isinstance(images, np.ndarray) or images.dtype != np.float32 or images.ndim != 4 \
                or images.shape[1] != 3 or images.shape[2] % d or images.shape[3] % d:
            raise ValueError(f"the graph takes float32 [B, 3, H, W] with H and W multiples of {d}; got "
                             f"{getattr(images, 'dtype', type(images).__name__)} {getattr(images, 'shape', '')}")
        sizes = np.asarray(image_sizes)
        if sizes.shape != (images.shape[0], 2) or (sizes < 1).any() or (sizes > np.array(images.shape[2:])).any():
            raise ValueError(f"image_sizes must be [B, 2] (h, w) inside the batch's {images.shape[2:]}; got {sizes}")
        fixed = self.roi_heads.test_settings
        st = settings or fixed
        changed = [f.name for f in dataclasses.fields(st) if f.name not in ("score_thresh", "max_dets")
                   and getattr(st, f.name) != getattr(fixed, f.name)]
        if changed:
            raise ValueError(f"this graph was exported with {', '.join(f'{k}={getattr(fixed, k)}' for k in changed)}; "
                             f"asked for {', '.join(f'{k}={getattr(st, k)}' for k in changed)}: export it again "
                             f"with those settings, or keep the graph's")
        feeds = {"images": images, "image_sizes": sizes.astype(np.int64),
                 "text_embeddings": self.classifier.text_embeddings.numpy(),
                 "reference_embeddings": self.classifier.reference_embeddings.numpy(),
                 "score_thresh": np.array(st.score_thresh, dtype=np.float32),
                 "max_dets": np.array(st.max_dets, dtype=np.int64)}
        if self.takes_base_mask:
            feeds["base_mask"] = self.classifier.base_mask.numpy()
        return dict(zip(self.outputs, self.runtime.run(self.outputs, feeds)))

    def __call__(self, images: Sequence[torch.Tensor], settings: Optional[DetectionSettings] = None) -> list[dict]:
        """Per image: boxes, scores, labels and masks (bool [n, H, W]) in its own frame, as ``ViLD`` gives them."""
        for i, im in enumerate(images):
            check_image(im, i)
        batch, original_sizes = self.preprocessor(list(images))
        out = self.run(batch.tensors.numpy(), np.asarray(batch.image_sizes, dtype=np.int64), settings)
        owner = out["batch_index"]
        results = []
        for i in range(len(images)):
            sel = owner == i
            r = {k: torch.from_numpy(np.ascontiguousarray(out[k][sel])) for k in DETECTOR_OUTPUTS
                 if k in out and k != "batch_index"}
            results.append(r)
        return self.preprocessor.postprocess(results, batch.image_sizes, original_sizes, self.mask_threshold)


class _NoTextEncoder:
    """Stands in for a missing text tower: embeddings must then come from a vocab.npz."""

    identity: dict = {}

    def __init__(self, expected: Path):
        self.expected = expected

    def encode_text(self, names: Any) -> torch.Tensor:
        raise RuntimeError(f"no text encoder to embed category names: export it beside the model ({self.expected}, "
                           f"vild-export writes it) or pass embeddings: set_vocabulary('vocab.npz') from vild-embed")


class OnnxDetector(Detector):
    """``Detector`` on an exported ``model.onnx``: same call, ``set_vocabulary`` and ``DetectionResult``.

    Args:
        model_path: the detector file from ``vild-export``.
        text_model: the text tower file or an ``OnnxTextEncoder`` (default: ``model.text.onnx`` beside the model,
            if there; False: none); without one, vocabularies come as embeddings (a vocab.npz or
            ``VocabEmbeddings``).
        device: cpu | cuda | cuda:N | auto (onnxruntime's CUDA provider).
        threads: onnxruntime intra-op threads (0: its default).
        **kwargs: ``Detector``'s: vocabulary (names, a vocab.npz path or ``VocabEmbeddings``), score_thresh,
            max_dets, batch_size.
    """

    def __init__(self, model_path: Union[str, os.PathLike],
                 text_model: Union[str, os.PathLike, OnnxTextEncoder, bool, None] = None, device: str = "cpu",
                 threads: int = 0, **kwargs: Any):
        providers = providers_for(device)
        runtime = open_graph(model_path, providers, threads)
        meta = graph_metadata(runtime, model_path, DETECTOR_FORMAT)
        self.providers = runtime.get_providers()
        if text_model is None and text_model_path(model_path).is_file():
            text_model = text_model_path(model_path)
        if isinstance(text_model, (str, os.PathLike)):
            text_model = OnnxTextEncoder(text_model, providers)
        teacher = text_model or _NoTextEncoder(text_model_path(model_path))
        self.model_teacher: dict = json.loads(meta["teacher"])
        model = OnnxModel(runtime, meta)
        fixed = model.roi_heads.test_settings  # the Detector asks for the scoring the graph has
        # the hidden training names need no text tower: their embeddings travel in the metadata
        training = (torch.tensor(json.loads(meta["training_embeddings"]), dtype=torch.float32)
                    if meta.get("training_embeddings") else None)
        super().__init__(model, teacher, cfg_from_dict(json.loads(meta["cfg"])),
                         json.loads(meta["vocabulary"]) or None, device="cpu", per_class_nms=not fixed.class_agnostic,
                         objectness_weight=fixed.objectness_weight, centering=fixed.centering,
                         confidence=fixed.confidence, abstain=fixed.abstain, training_embeddings=training, **kwargs)
        if meta.get("display_score_thresh"):
            self.display_score_thresh = float(meta["display_score_thresh"])

    def set_vocabulary(self, vocabulary: Union[str, os.PathLike, VocabEmbeddings, Any]) -> None:
        """Names ("kite,unicycle", lists: embedded by the text tower), a vocab.npz path, or ``VocabEmbeddings``."""
        if isinstance(vocabulary, os.PathLike) or (isinstance(vocabulary, str) and vocabulary.endswith(".npz")):
            vocabulary = load_vocab(vocabulary)
        if isinstance(vocabulary, VocabEmbeddings):
            self._check_teacher(vocabulary.teacher)
            names = parse_vocabulary(vocabulary.names, dedupe=False) if vocabulary.names else []
            if len(names) != len(vocabulary.embeddings):
                raise ValueError(f"{len(vocabulary.names)} names for {len(vocabulary.embeddings)} embeddings: "
                                 f"one row per category")
            # the embeddings given stand in for the text tower's: the Detector reads them from its cache
            self._emb_cache[json.dumps(names)] = torch.from_numpy(np.asarray(vocabulary.embeddings, np.float32))
            vocabulary = names
        super().set_vocabulary(vocabulary)

    def _check_teacher(self, teacher: dict) -> None:
        want, got = self.model_teacher.get("sha256"), (teacher or {}).get("sha256")
        if want and got and want != got:
            raise ValueError(f"these embeddings come from another text tower ({teacher.get('model')}, sha256 "
                             f"{got[:12]}…) than the model was trained with ({self.model_teacher.get('model')}, "
                             f"{want[:12]}…): embed the names again with vild-embed --weights <this model's "
                             f"checkpoint>")
