"""What happens around a training step (``Trainer.run_step``): the learning-rate schedule, logs and metrics with the
ETA, checkpoints, evaluation. The loop calls every hook in order before and after each step, and once at the end.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..config import CfgNode
from ..utils import comm
from .checkpoint import prune_checkpoints
from .logger import ETA, LossWindow, MetricsWriter

if TYPE_CHECKING:
    from .trainer import Trainer


@dataclass
class LoopState:
    """The running loop, as the step and the hooks see it."""

    start_iter: int
    max_iter: int
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    writer: MetricsWriter  # metrics.jsonl and TensorBoard of the training steps and their evaluations
    eta: ETA
    window: LossWindow = field(default_factory=LossWindow)  # losses since the last log line, on the device
    iteration: int = 0  # the step running, counted from 0
    losses: dict = field(default_factory=dict)  # the step's losses (device tensors)
    means: dict | None = None  # the window's mean losses over all ranks (finite), on the steps that read them
    results: dict = field(default_factory=dict)  # the final evaluation's metrics

    @property
    def last(self) -> bool:
        """Whether this is the run's last step."""
        return self.iteration + 1 == self.max_iter

    def ends_period(self, period: int) -> bool:
        """Whether this step ends a period of ``period`` steps (0: none), or is the last step."""
        return every(period, self.iteration) or self.last


class Hook:
    """Work around the training step; each method does nothing unless a hook overrides it."""

    def before_step(self, state: LoopState) -> None:
        """Before the step of ``state.iteration``."""

    def needs_checked_losses(self, state: LoopState) -> bool:
        """Whether ``after_step`` reads ``state.means`` at this step (or must not act on a non-finite loss)."""
        return False

    def after_step(self, state: LoopState) -> None:
        """After the step of ``state.iteration``."""

    def after_train(self, state: LoopState) -> None:
        """After the last step."""


def lr_factor(cfg: CfgNode, iteration: int) -> float:
    """Learning-rate multiplier at an iteration: linear warm-up, then step decays or cosine."""
    s = cfg.SOLVER
    if s.LR_SCHEDULER == "step":
        f = s.GAMMA ** sum(iteration >= m for m in s.STEPS)
    elif s.LR_SCHEDULER == "cosine":
        f = 0.5 * (1.0 + math.cos(math.pi * min(iteration / max(s.MAX_ITER, 1), 1.0)))
    else:
        raise ValueError(f"unknown SOLVER.LR_SCHEDULER {s.LR_SCHEDULER!r}: use step or cosine")
    if iteration < s.WARMUP_ITERS:
        alpha = iteration / s.WARMUP_ITERS
        f *= s.WARMUP_FACTOR * (1 - alpha) + alpha
    return f


class LRSchedule(Hook):
    """SOLVER.BASE_LR times ``lr_factor`` for every parameter group, set before each step."""

    def __init__(self, cfg: CfgNode):
        self.cfg = cfg

    def before_step(self, state: LoopState) -> None:
        """Set the step's learning rate."""
        lr = self.cfg.SOLVER.BASE_LR * lr_factor(self.cfg, state.iteration)
        for group in state.optimizer.param_groups:
            group["lr"] = lr


class MetricsLogger(Hook):
    """Every ``period`` steps and at the last: the window's mean losses, the learning rate and seconds per step
    into metrics.jsonl and TensorBoard, and a console line with the ETA."""

    def __init__(self, period: int, logger: logging.Logger):
        self.period, self.logger = period, logger

    def needs_checked_losses(self, state: LoopState) -> bool:
        """The logged steps."""
        return state.ends_period(self.period)

    def after_step(self, state: LoopState) -> None:
        """Write the step's line."""
        if not state.ends_period(self.period):
            return
        spi, left = state.eta(state.iteration)
        scalars = {**state.means, "lr": state.optimizer.param_groups[0]["lr"], "sec_per_iter": spi}
        state.window.reset()
        state.writer.write(state.iteration + 1, scalars)
        self.logger.info("iter %d/%d  loss %.3f  (%s)  lr %.2e  %.2fs/it  eta %s", state.iteration + 1,
                         state.max_iter, scalars["total_loss"],
                         "  ".join(f"{k} {scalars[k]:.3f}" for k in state.losses), scalars["lr"], spi, left)


class PeriodicCheckpointer(Hook):
    """Every ``period`` steps a checkpoint, and ``model_final.pth`` at the last; only the ``keep`` newest periodic
    ones stay (0: all). Checkpoint time does not count toward the ETA."""

    def __init__(self, trainer: Trainer, period: int, keep: int):
        self.trainer, self.period, self.keep = trainer, period, keep

    def needs_checked_losses(self, state: LoopState) -> bool:
        """The saving steps: a checkpoint must not keep the weights of a non-finite loss."""
        return state.ends_period(self.period)

    def after_step(self, state: LoopState) -> None:
        """Save (rank 0 writes), prune, redraw the training curves."""
        if not state.ends_period(self.period):
            return
        trainer = self.trainer
        if trainer.save_checkpoint(state.iteration + 1, state.optimizer, state.scaler, final=state.last):
            for old in prune_checkpoints(trainer.output_dir, self.keep):
                trainer.logger.info("removed %s (SOLVER.KEEP_CHECKPOINTS %d)", old.name, self.keep)
            trainer.plot_curves()
        comm.synchronize()
        state.eta.restart(state.iteration + 1)


class PeriodicEvaluator(Hook):
    """Every ``period`` steps but the last, and with ``final`` after training: ``trainer.test()``, its metrics
    into metrics.jsonl. Evaluation time does not count toward the ETA."""

    def __init__(self, trainer: Trainer, period: int, final: bool):
        self.trainer, self.period, self.final = trainer, period, final

    def after_step(self, state: LoopState) -> None:
        """Evaluate mid-training (the last step's evaluation is the final one)."""
        if not every(self.period, state.iteration) or state.last:
            return
        state.writer.write(state.iteration + 1, flatten_metrics(self.trainer.test()))
        self.trainer.model.train()
        state.eta.restart(state.iteration + 1)

    def after_train(self, state: LoopState) -> None:
        """The final evaluation into ``state.results``."""
        trainer = self.trainer
        if not (self.final and trainer.cfg.DATASETS.TEST):
            return
        state.results = trainer.test()
        if state.results:
            writer = MetricsWriter(trainer.output_dir, enabled=comm.is_main_process(), tensorboard=False,
                                   stage=trainer.stage)
            writer.write(state.max_iter, flatten_metrics(state.results))


def every(period: int, iteration: int) -> bool:
    """Whether step ``iteration`` (0-based) ends a period; a period of 0 means never."""
    return period > 0 and (iteration + 1) % period == 0


def flatten_metrics(d: dict, prefix: str = "") -> dict:
    """Nested metrics as one level of ``"a/b/c": float`` (non-numbers left out)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten_metrics(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out
