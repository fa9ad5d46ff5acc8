"""Training logs: console lines with ETA, ``metrics.jsonl``, and TensorBoard event files."""
from __future__ import annotations

import datetime
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

from ..utils import comm


def setup_logger(output_dir: str | Path | None, rank: int = 0, name: str = "vild") -> logging.Logger:
    """Console logging on rank 0 (warnings elsewhere), plus a ``log.txt`` file in ``output_dir``."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        if isinstance(h, logging.FileHandler):
            h.close()  # a run in the same process (a notebook, the tests) would otherwise leak the old log file
    fmt = logging.Formatter(f"[%(asctime)s{'' if rank == 0 else f' r{rank}'}] %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if output_dir and rank == 0:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(Path(output_dir) / "log.txt")
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    return logger


class MetricsWriter:
    """Appends one JSON line per logged step and mirrors scalars to TensorBoard (rank 0 only)."""

    def __init__(self, output_dir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))
            except ImportError:  # tensorboard is a dependency, but a broken install must not stop training
                logging.getLogger("vild").warning("tensorboard not importable; writing metrics.jsonl only")

    def write(self, iteration: int, scalars: dict) -> None:
        """Record the scalars of one iteration."""
        if not self.enabled:
            return
        # NaN (e.g. AP of a size with no objects) is not JSON: null, as in the evaluators' metrics.json
        scalars = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in scalars.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"iteration": iteration, **scalars}, allow_nan=False) + "\n")
        if self.tb is not None:
            for k, v in scalars.items():
                if v is not None:
                    self.tb.add_scalar(k, v, iteration)

    def close(self) -> None:
        """Flush TensorBoard."""
        if self.tb is not None:
            self.tb.close()


class LossWindow:
    """Losses summed on the device since the last read: no host sync per iteration, one per log line."""

    def __init__(self):
        self._sum: torch.Tensor | None = None
        self._names: list[str] = []
        self._n = 0

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        """Add one iteration's (scalar) losses; ``total_loss`` is their sum."""
        vec = torch.stack([v.detach().float() for v in losses.values()])
        vec = torch.cat([vec, vec.sum()[None]])
        self._names = [*losses, "total_loss"]
        self._sum = vec if self._sum is None else self._sum + vec
        self._n += 1

    def mean(self, reset: bool = True) -> dict[str, float]:
        """Each loss averaged over the window and over all ranks (a collective: every rank must call it)."""
        if self._sum is None:
            return {}
        avg = comm.all_reduce_mean(self._sum / self._n).tolist()
        if reset:
            self._sum, self._n = None, 0
        return dict(zip(self._names, avg))


class ETA:
    """Seconds per iteration, smoothed over logging windows that exclude checkpoint and evaluation time."""

    def __init__(self, start_iter: int, max_iter: int):
        self.max_iter = max_iter
        self.spi: float | None = None
        self.restart(start_iter)

    def restart(self, iteration: int) -> None:
        """Start timing afresh at ``iteration`` (after work that is not training: checkpoints, evaluation)."""
        self._it0, self._t0 = iteration, time.perf_counter()

    def __call__(self, iteration: int) -> tuple[float, str]:
        """Return (seconds per iteration, ETA string) after ``iteration`` finished."""
        done = iteration + 1 - self._it0
        if done > 0:
            spi = (time.perf_counter() - self._t0) / done
            self.spi = spi if self.spi is None else 0.7 * self.spi + 0.3 * spi
        self.restart(iteration + 1)
        spi = self.spi or 0.0
        return spi, str(datetime.timedelta(seconds=int(spi * max(self.max_iter - iteration - 1, 0))))
