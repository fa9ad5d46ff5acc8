"""vild: open-vocabulary detection via vision and language knowledge distillation (ViLD).

Exports resolve lazily, so ``import vild`` stays fast; ``from vild import Detector`` pulls in torch and CLIP.
"""
from __future__ import annotations

from typing import Any

_EXPORTS = {
    "Detector": "vild.api",
    "DetectionResult": "vild.api",
    "load_config": "vild.config",
    "build_model": "vild.modeling",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version
        try:
            value = version("vild")
        except PackageNotFoundError:  # running from a source tree that was never installed
            value = "0.0.0+unknown"
    elif name in _EXPORTS:
        import importlib
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    else:
        raise AttributeError(f"module 'vild' has no attribute {name!r}")
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
