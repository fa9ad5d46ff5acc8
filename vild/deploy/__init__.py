"""Deployment: the detector and the teacher's text tower as ONNX files, run by onnxruntime.

``export_checkpoint(weights, "model.onnx")`` writes ``model.onnx`` and ``model.text.onnx``;
``OnnxDetector("model.onnx")`` runs them with ``Detector``'s call; ``OnnxTextEncoder`` and
``save_vocab`` / ``load_vocab`` are the text side, which imports no torch. Exports resolve lazily.
"""
from __future__ import annotations

from typing import Any

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


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vild.deploy' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
