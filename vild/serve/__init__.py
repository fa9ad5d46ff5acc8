"""``vild-serve``: an HTTP API and a web page over a ``Detector``, with dynamic batching and request limits.

Needs the ``serve`` extra (``pip install 'vild[serve]'``: FastAPI, uvicorn, python-multipart);
``DynamicBatcher`` and ``Limits`` need only the standard library.
"""
from __future__ import annotations

from typing import Any

from .batcher import DynamicBatcher, Overloaded
from .limits import Limits

__all__ = ["DynamicBatcher", "Overloaded", "create_app", "Limits"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .app import create_app
        return create_app
    raise AttributeError(f"module 'vild.serve' has no attribute {name!r}")
