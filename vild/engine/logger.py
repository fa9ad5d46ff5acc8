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


def setup_logger(output_dir: str | Path | None, rank: int = 0, name: str = "vild", stage: str = "") -> logging.Logger:
    """Console logging on rank 0 (warnings elsewhere), plus a ``log.txt`` file in ``output_dir``; lines name ``stage``."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        if isinstance(h, logging.FileHandler):
            h.close()  # a run in the same process (a notebook, the tests) would otherwise leak the old log file
    fmt = logging.Formatter(f"[%(asctime)s{'' if rank == 0 else f' r{rank}'}{f' {stage}' if stage else ''}] %(message)s",
                            "%H:%M:%S")
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
    """Appends one JSON line per logged step and mirrors scalars to TensorBoard (rank 0 only).

    ``start_iter``: where training (re)starts; lines and TensorBoard events of later iterations, which the run
    is about to log again, are dropped first (``None``: append as is, e.g. the final evaluation's line).
    ``stage``: written into every line (``"stage": ...``) when not empty.
    """

    def __init__(self, output_dir: str | Path, enabled: bool = True, tensorboard: bool = True,
                 start_iter: int | None = None, redo_evaluation_at: int | None = None, stage: str = ""):
        """``redo_evaluation_at``: an iteration whose evaluation lines are dropped too (it will be evaluated again)."""
        self.enabled = enabled
        self.stage = stage
        self.path = Path(output_dir) / "metrics.jsonl"
        self.tb = None
        if enabled and start_iter is not None:
            drop_replayed_lines(self.path, start_iter, redo_evaluation_at)
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                # purge_step hides the events of iterations >= start_iter that an interrupted run wrote
                self.tb = SummaryWriter(str(Path(output_dir) / "tensorboard"),
                                        purge_step=start_iter if start_iter else None)
            except ImportError:  # tensorboard is a dependency, but a broken install must not stop training
                logging.getLogger("vild").warning("tensorboard not importable; writing metrics.jsonl only")

    def write(self, iteration: int, scalars: dict) -> None:
        """Record the scalars of one iteration."""
        if not self.enabled:
            return
        # NaN (e.g. AP of a size with no objects) is not JSON: null, as in the evaluators' metrics.json
        scalars = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in scalars.items()}
        row = {"iteration": iteration, **({"stage": self.stage} if self.stage else {}), **scalars}
        with open(self.path, "a") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")
        if self.tb is not None:
            for k, v in scalars.items():
                if v is not None:
                    self.tb.add_scalar(k, v, iteration)

    def close(self) -> None:
        """Flush TensorBoard."""
        if self.tb is not None:
            self.tb.close()


def drop_replayed_lines(path: str | Path, start_iter: int, redo_evaluation_at: int | None = None) -> int:
    """Rewrite ``metrics.jsonl`` without the lines a run restarting at ``start_iter`` will write again.

    Kept: lines of earlier iterations, and those of ``start_iter`` itself (logged before its checkpoint),
    except evaluation lines (no ``total_loss``) at ``redo_evaluation_at``. A line cut off by a kill goes too.
    Returns how many lines were dropped.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            it = int(row["iteration"])
        except (ValueError, KeyError, TypeError):
            dropped += 1
            continue
        if it > start_iter or (it == redo_evaluation_at and "total_loss" not in row):
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        from ..utils.atomic import atomic_write_bytes
        atomic_write_bytes(path, "".join(f"{line}\n" for line in kept).encode())
    return dropped


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
            self.reset()
        return dict(zip(self._names, avg))

    def reset(self) -> None:
        """Start a new window."""
        self._sum, self._n = None, 0


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
