"""Deployment: the detector and the teacher's text tower as ONNX files, run by onnxruntime.

``export_checkpoint(weights, "model.onnx")`` writes ``model.onnx`` and ``model.text.onnx``;
``OnnxDetector("model.onnx")`` runs them with ``Detector``'s call; ``OnnxTextEncoder`` and
``save_vocab`` / ``load_vocab`` are the text side, which imports no torch. Exports resolve lazily.
"""
from __future__ import annotations

from ..utils.lazy import lazy_getattr

_EXPORTS = {
    "export_checkpoint": "export",
    "export_detector": "export",
    "export_text_tower": "export",
    "text_model_path": "export",
    "OnnxDetector": "runner",
    "OnnxModel": "runner",
    "OnnxTextEncoder": "text",
    "VocabEmbeddings": "text",
    "save_vocab": "text",
    "load_vocab": "text",
}
__all__ = list(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS, globals())
