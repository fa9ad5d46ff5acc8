"""Training or evaluating a config: the staged pipeline (ViLD, ViLD-ensemble) or one ``Trainer`` run."""
from __future__ import annotations

from ..config import CfgNode
from .distributed import cleanup


def train_or_evaluate(cfg: CfgNode, eval_only: bool = False, resume: bool = False) -> dict:
    """Train ``cfg`` (every stage its variant needs) or, with ``eval_only``, evaluate its weights; the results.

    ``eval_only`` evaluates MODEL.WEIGHTS, or else the newest checkpoint in OUTPUT_DIR; ``resume`` continues
    from the newest checkpoint. The process group, if one was joined, is left at the end.
    """
    from .pipeline import Pipeline, uses_pipeline
    from .trainer import Trainer
    try:
        if uses_pipeline(cfg) and not eval_only:
            return Pipeline(cfg, resume=resume).run()
        trainer = Trainer(cfg)
        if eval_only:
            # MODEL.WEIGHTS, or else the newest checkpoint in OUTPUT_DIR
            trainer.resume_or_load(resume=resume or not cfg.MODEL.WEIGHTS, evaluate_only=True)
            return trainer.test()
        return trainer.train(resume=resume)
    finally:
        cleanup()
