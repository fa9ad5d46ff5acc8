"""The five figures of ``benchmarks/run.py``, one module each; each returns a JSON-ready dict with its numbers,
baselines, ratios and targets."""
from __future__ import annotations

from .context import Context
from .crops import crops
from .inference import inference
from .precompute import precompute
from .training import train_worker, training
from .vocabulary import vocabulary

FIGURES = {"inference": inference, "crops": crops, "training": training, "precompute": precompute,
           "vocabulary": vocabulary}
__all__ = ["FIGURES", "Context", "train_worker"]
