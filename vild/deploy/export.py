"""Writing the ONNX files: the detector (vocabulary as an input) and the teacher's text tower (with its tokenizer).

``export_checkpoint(weights, out)`` writes ``out`` and ``text_model_path(out)``; ``export_detector`` and
``export_text_tower`` take a model or teacher in memory. The TorchScript exporter traces the modules of
``vild.deploy.graph`` at opset 17: torchvision registers ONNX forms of ``nms`` and ``roi_align`` there, and
the graph's data-dependent sizes (NMS survivors, boxes over the threshold) stay dynamic in a trace.
"""
from __future__ import annotations

import dataclasses
import gzip
import inspect
import io
import json
import os
import warnings
from pathlib import Path
from typing import Optional, Union

import torch

from ..config import CfgNode
from ..modeling.postprocess import DetectionSettings
from ..modeling.vild import ViLD
from .graph import DETECTOR_INPUTS, DETECTOR_OUTPUTS, DetectorGraph, TextTowerGraph
from .text import TEXT_FORMAT
from .tokenizer import NUM_MERGES

DETECTOR_FORMAT = "vild-detector-onnx-1"
OPSET = 17


def text_model_path(model_path: Union[str, os.PathLike]) -> Path:
    """Where the text tower goes beside a detector file: ``model.onnx`` → ``model.text.onnx``."""
    p = Path(model_path)
    return p.with_name(p.name[:-len(".onnx")] + ".text.onnx" if p.name.endswith(".onnx") else p.name + ".text.onnx")


def _trace_to_onnx(module: torch.nn.Module, args: tuple, input_names: list[str], output_names: list[str],
                   dynamic_axes: dict) -> bytes:
    buf = io.BytesIO()
    kw = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    with warnings.catch_warnings():
        # the tracer warns at every shape turned into a Python number; the graph's dynamic sizes are checked by
        # running the file on other batch sizes, image sizes and vocabularies (tests/test_deploy.py)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # the exporter's own notices about itself (it is the TorchScript one, chosen for torchvision's NMS and
        # RoIAlign) and about negative gather indices, which the graph's indices (from nonzero, NMS) never are
        for message in (".*legacy TorchScript-based ONNX export", ".*torch.jit.script. is deprecated",
                        ".*feature will be removed", ".*aten::index operator of advanced indexing"):
            warnings.filterwarnings("ignore", message=message)
        torch.onnx.export(module, args, buf, input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic_axes, opset_version=OPSET, do_constant_folding=True, **kw)
    return buf.getvalue()


def _save_with_metadata(data: bytes, path: Union[str, os.PathLike], metadata: dict[str, str]) -> Path:
    try:
        import onnx
    except ImportError:
        raise RuntimeError("exporting needs the onnx package: pip install 'vild[onnx]'") from None
    from ..utils.atomic import atomic_write_bytes

    model = onnx.load_from_string(data)
    for k, v in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    path = Path(path)
    atomic_write_bytes(path, model.SerializeToString())
    return path


def example_batch(test_size: int, size_divisibility: int, embed_dim: int, seed: int = 0) -> tuple:
    """Inputs to trace with: two noise images of different sizes, three categories, two hidden ones."""
    g = torch.Generator().manual_seed(seed)
    side = max(test_size, 64)
    pad = -(-side // size_divisibility) * size_divisibility
    sizes = torch.tensor([[side, side], [side * 3 // 4, side]], dtype=torch.int64)
    images = torch.rand(2, 3, pad, pad, generator=g) * 255
    text = torch.nn.functional.normalize(torch.randn(3, embed_dim, generator=g), dim=-1)
    reference = torch.nn.functional.normalize(torch.randn(2, embed_dim, generator=g), dim=-1)
    return images, sizes, text, reference, torch.tensor(0.0), torch.tensor(100, dtype=torch.int64)


def export_detector(model: ViLD, path: Union[str, os.PathLike], cfg: CfgNode,
                    training_vocabulary: Optional[list] = None, teacher: Optional[dict] = None,
                    settings: Optional[DetectionSettings] = None, display_score_thresh: Optional[float] = None,
                    training_embeddings: Optional[torch.Tensor] = None) -> Path:
    """Write ``model`` as an ONNX graph whose vocabulary is an input; ``cfg`` built it (kept as metadata).

    ``settings``: the scoring and NMS fixed in the graph (default: the config's, the evaluation's); the
    threshold and detection count stay inputs. ``training_embeddings`` (the training names' text
    embeddings) travel in the metadata, so that a runner without a text tower can hide them in the softmax.
    """
    if model.roi_heads.variant == "fvlm":
        raise ValueError("F-VLM cannot be exported to ONNX: its scores ensemble the detector's with the frozen CLIP "
                         "trunk's own region scores, which the exported graph does not compute; run F-VLM models "
                         "with vild.Detector, vild-detect or vild-serve")
    model = model.cpu().float().eval()
    settings = settings or model.roi_heads.test_settings
    # the exporter restores the mode it found: train mode would reach the model
    graph = DetectorGraph(model, settings).eval()
    pre = model.preprocessor
    args = example_batch(pre.test_size, pre.size_divisibility, model.embed_dim)
    # which names were trained: ViLD-ensemble weighs its heads by it, calibrated confidences pick their map by it
    takes_base_mask = model.roi_heads.variant == "ensemble" or settings.confidence
    if takes_base_mask:
        args = args + (torch.tensor([True, False, False]),)
    names = list(DETECTOR_INPUTS if takes_base_mask else DETECTOR_INPUTS[:-1])
    outputs = [k for k in DETECTOR_OUTPUTS if k != "mask_probs" or model.roi_heads.mask_on]
    dynamic = {"images": {0: "batch", 2: "height", 3: "width"}, "image_sizes": {0: "batch"},
               "text_embeddings": {0: "categories"}, "reference_embeddings": {0: "hidden_categories"},
               "base_mask": {0: "categories"},
               **{k: {0: "detections"} for k in outputs}}
    with torch.no_grad():
        graph(*args)  # an eager run first sets up the poolers' scales outside the trace
        data = _trace_to_onnx(graph, args, names, outputs, {k: v for k, v in dynamic.items() if k in names + outputs})
    rh = cfg.MODEL.ROI_HEADS
    meta = {
        "format": DETECTOR_FORMAT,
        "cfg": json.dumps(cfg.to_dict()),
        "variant": model.roi_heads.variant,
        "embed_dim": str(model.embed_dim),
        "test_size": str(pre.test_size),
        "size_divisibility": str(pre.size_divisibility),
        "mask_threshold": str(model.mask_threshold),
        "score_thresh": str(rh.SCORE_THRESH_TEST),
        "settings": json.dumps(dataclasses.asdict(settings)),
        "display_score_thresh": "" if display_score_thresh is None else str(display_score_thresh),
        "training_embeddings": "" if training_embeddings is None else json.dumps(
            [[round(float(v), 6) for v in row] for row in training_embeddings]),
        "max_dets": str(rh.DETECTIONS_PER_IMAGE),
        "vocabulary": json.dumps(training_vocabulary or []),
        "teacher": json.dumps(teacher or {}),
    }
    return _save_with_metadata(data, path, meta)


def export_text_tower(teacher, path: Union[str, os.PathLike]) -> Path:
    """Write a ``CLIPTeacher``'s text tower, tokenizer merges and prompt templates as one ONNX file."""
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer, default_bpe

    tok = teacher.tokenizer
    clean = getattr(getattr(tok, "clean_fn", None), "__name__", "_clean_lower")  # older open_clip: always lower
    if type(tok) is not SimpleTokenizer or getattr(tok, "reduction_fn", None) is not None or clean != "_clean_lower":
        raise ValueError(f"the text tower of {teacher.model_name} uses a tokenizer other than CLIP's BPE "
                         f"({type(tok).__name__}); only CLIP-BPE towers export with a torch-free tokenizer")
    model = teacher.model.float().eval()
    tokens = tok(["a photo of a kite.", "an embroidered sofa or couch in the scene."])
    with torch.no_grad():
        data = _trace_to_onnx(TextTowerGraph(model).eval(), (tokens,), ["tokens"], ["embeddings"],
                              {"tokens": {0: "prompts"}, "embeddings": {0: "prompts"}})
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:]
    meta = {
        "format": TEXT_FORMAT,
        "embed_dim": str(teacher.embed_dim),
        "context_length": str(tok.context_length),
        "templates": json.dumps(teacher.templates),
        "teacher": json.dumps(teacher.identity),
        "bpe_merges": "\n".join(merges[:NUM_MERGES]),
        "open_clip": open_clip.__version__,
    }
    return _save_with_metadata(data, path, meta)


def export_checkpoint(weights: Union[str, os.PathLike], out: Union[str, os.PathLike],
                      text_out: Union[str, os.PathLike, None] = None, with_text: bool = True) -> list[Path]:
    """Export a vild checkpoint: the detector to ``out`` and its teacher's text tower to ``text_out``
    (default ``text_model_path(out)``); returns the files written."""
    from ..api import Detector

    det = Detector.from_checkpoint(weights, device="cpu")
    settings = det.display_settings()  # the graph scores as the Detector shows detections
    training = det.teacher.encode_text(det.training_vocabulary) if det.training_vocabulary else None
    written = [export_detector(det.model, out, det.cfg, det.training_vocabulary, det.teacher.identity, settings,
                               det.display_score_thresh, training)]
    if with_text:
        written.append(export_text_tower(det.teacher, text_out or text_model_path(out)))
    return written
