"""Running a model over a test loader and feeding an evaluator, on every rank."""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Iterable

import torch
from tqdm import tqdm

from ..utils import comm


@torch.no_grad()
def inference_on_dataset(model: torch.nn.Module, loader: Iterable, evaluator: Any, device: torch.device,
                         autocast: AbstractContextManager, settings: Any = None, vocabulary: Any = None) -> Any:
    """Predict every image of this rank's shard, then let the evaluator gather and score on rank 0.

    ``evaluator`` may be a list: one pass of the model feeds them all, and a list of metrics comes back.
    ``settings`` (``DetectionSettings``): what the model keeps, instead of its config's test settings;
    ``vocabulary`` (``ViLD.make_vocabulary``): the categories scored, instead of the model's installed ones.
    """
    evaluators = list(evaluator) if isinstance(evaluator, (list, tuple)) else [evaluator]
    was_training = model.training
    model.eval()
    for e in evaluators:
        e.reset()
    for images, targets in tqdm(loader, desc="inference", disable=not comm.is_main_process(), leave=False):
        with autocast:
            outputs = model([im.to(device) for im in images], settings=settings, vocabulary=vocabulary)
        outputs = [{k: v.to("cpu") for k, v in o.items()} for o in outputs]
        for e in evaluators:
            e.process(targets, outputs)
    model.train(was_training)
    metrics = [e.evaluate() for e in evaluators]
    return metrics if isinstance(evaluator, (list, tuple)) else metrics[0]
