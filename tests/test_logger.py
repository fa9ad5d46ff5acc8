"""Training log helpers: losses averaged over a logging window, an ETA that ignores pauses, the log file."""
import logging

import pytest
import torch

from vild.engine import logger as logger_mod
from vild.engine.logger import ETA, LossWindow, setup_logger


def test_loss_window_averages_each_loss_and_their_total():
    w = LossWindow()
    for a, b in [(1.0, 2.0), (3.0, 4.0)]:
        w.add({"loss_a": torch.tensor(a), "loss_b": torch.tensor(b)})
    assert w.mean() == pytest.approx({"loss_a": 2.0, "loss_b": 3.0, "total_loss": 5.0})
    assert w.mean() == {}  # read and reset
    w.add({"loss_a": torch.tensor(float("nan")), "loss_b": torch.tensor(1.0)})
    w.add({"loss_a": torch.tensor(1.0), "loss_b": torch.tensor(1.0)})
    kept = w.mean(reset=False)
    assert kept["loss_a"] != kept["loss_a"] and w.mean()["loss_b"] == 1.0  # a NaN anywhere in the window shows


def test_eta_excludes_time_spent_outside_training(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(logger_mod.time, "perf_counter", lambda: now[0])
    eta = ETA(0, 100)
    now[0] = 10.0
    spi, left = eta(9)  # 10 iterations in 10 s
    assert spi == pytest.approx(1.0) and left == "0:01:30"
    now[0] += 500.0  # an evaluation
    eta.restart(10)
    now[0] += 10.0
    spi, _ = eta(19)
    assert spi == pytest.approx(1.0)


def test_setting_up_the_logger_again_closes_the_old_log_file(tmp_path):
    first = setup_logger(tmp_path / "a")
    old = next(h for h in first.handlers if isinstance(h, logging.FileHandler))
    first.info("to a")
    second = setup_logger(tmp_path / "b")
    second.info("to b")
    assert old.stream is None  # closed, not left for the garbage collector
    assert (tmp_path / "a" / "log.txt").read_text().strip().endswith("to a")
    assert "to a" not in (tmp_path / "b" / "log.txt").read_text()
    setup_logger(None)  # leaves no file open behind this test
