"""The CLIP teacher: prompt templates, vocabularies, cached text and region embeddings.

Exports resolve lazily: ``vild.teacher.vocabulary`` and ``vild.teacher.templates`` import without torch (the
ONNX deployment's text side uses them), ``CLIPTeacher`` pulls in torch and open_clip.
"""
from __future__ import annotations

from typing import Any

_EXPORTS = {
    "CLIPTeacher": "clip_teacher",
    "get_templates": "templates",
    "parse_vocabulary": "vocabulary",
    "load_vocabulary_file": "vocabulary",
    "clean_name": "vocabulary",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vild.teacher' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
