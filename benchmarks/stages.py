"""Where inference time goes: wall-clock per stage of one forward pass, for ViLD and torchvision's Mask R-CNN.

The real forward runs unchanged; its sub-modules and post-processing functions are wrapped for the duration
of one call with timers that synchronise the device on entry and exit (so on a GPU this adds syncs:
use it on an untimed pass there). ``other`` is the total minus the named stages (Python glue, box decoding,
score softmax, per-image loops, ...).
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch

from common import sync


class StageTimer:
    """Accumulate seconds per stage name while patched callables run."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self._depth = 0

    def wrap(self, stage: str, fn):
        def timed(*args, **kwargs):
            if self._depth:  # a stage inside another stage counts for the outer one only
                return fn(*args, **kwargs)
            self._depth += 1
            sync(self.device)
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync(self.device)
                self.seconds[stage] += time.perf_counter() - t
                self._depth -= 1
        return timed


@contextlib.contextmanager
def _patched(timer: StageTimer, modules: list[tuple[str, object]], functions: list[tuple[str, object, str]]):
    """Wrap ``module.forward`` / ``owner.attr`` callables for the duration of the block."""
    undo = []
    try:
        for stage, mod in modules:
            if mod is None:
                continue
            mod.forward = timer.wrap(stage, mod.forward)  # instance attribute shadows the class method
            undo.append(lambda m=mod: delattr(m, "forward"))
        for stage, owner, attr in functions:
            orig = getattr(owner, attr)
            setattr(owner, attr, timer.wrap(stage, orig))
            undo.append(lambda o=owner, a=attr, f=orig: setattr(o, a, f))
        yield timer
    finally:
        for u in reversed(undo):
            u()


def vild_stages(model, timer: StageTimer):
    """Context that times ViLD's stages (see the module docstring)."""
    import vild.modeling.preprocess as pre_mod
    import vild.modeling.roi_heads as rh_mod
    rh = model.roi_heads
    modules = [("preprocess", model.preprocessor), ("backbone+fpn", model.backbone), ("rpn", model.rpn),
               ("box_roi_align", rh.box_pooler), ("box_head", rh.text_head), ("box_head", rh.image_head),
               ("classifier", rh.classifier), ("mask_roi_align", rh.mask_pooler), ("mask_head", rh.mask_head),
               ("mask_head", rh.mask_predictor)]
    # the mask head's convs run through run_conv_stack (not mask_head.forward) on the CPU
    functions = [("box_postprocess", rh_mod, "select_detections"), ("mask_paste", pre_mod, "paste_masks"),
                 ("mask_head", rh_mod, "run_conv_stack")]
    return _patched(timer, modules, functions)


def torchvision_stages(model, timer: StageTimer):
    """Context that times torchvision Mask R-CNN's stages, named like ViLD's."""
    rh = model.roi_heads
    modules = [("preprocess", model.transform), ("backbone+fpn", model.backbone), ("rpn", model.rpn),
               ("box_roi_align", rh.box_roi_pool), ("box_head", rh.box_head), ("classifier", rh.box_predictor),
               ("mask_roi_align", rh.mask_roi_pool), ("mask_head", rh.mask_head), ("mask_head", rh.mask_predictor)]
    # transform.postprocess rescales boxes (negligible) and pastes every mask (paste_masks_in_image)
    functions = [("box_postprocess", rh, "postprocess_detections"), ("mask_paste", model.transform, "postprocess")]
    return _patched(timer, modules, functions)


def breakdown(kind: str, model, run, device: torch.device) -> tuple[object, dict]:
    """Run ``run()`` once with stage timers on ``model``; return (its result, {stage: seconds, total})."""
    timer = StageTimer(device)
    ctx = vild_stages(model, timer) if kind == "vild" else torchvision_stages(model, timer)
    with ctx:
        sync(device)
        t = time.perf_counter()
        out = run()
        sync(device)
        total = time.perf_counter() - t
    stages = dict(timer.seconds)
    stages["other"] = max(0.0, total - sum(stages.values()))
    stages["total"] = total
    return out, {k: round(v, 4) for k, v in stages.items()}
