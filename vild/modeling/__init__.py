"""The ViLD Mask R-CNN."""
from .classifier import TextClassifier, ensemble_scores
from .vild import ViLD, build_model

__all__ = ["ViLD", "build_model", "TextClassifier", "ensemble_scores"]
