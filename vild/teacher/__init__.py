"""The CLIP teacher: prompt templates, vocabularies, cached text and region embeddings.

Exports resolve lazily: ``vild.teacher.vocabulary`` and ``vild.teacher.templates`` import without torch (the
ONNX deployment's text side uses them), ``CLIPTeacher`` pulls in torch and open_clip.
"""
from __future__ import annotations

from ..utils.lazy import lazy_getattr

_EXPORTS = {
    "CLIPTeacher": "clip_teacher",
    "get_templates": "templates",
    "parse_vocabulary": "vocabulary",
    "load_vocabulary_file": "vocabulary",
    "clean_name": "vocabulary",
}
__all__ = list(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS, globals())
