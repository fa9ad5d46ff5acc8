"""Training curves from metrics.jsonl: what is read, what is drawn, and that the drawing follows the numbers."""
import json

import cv2
import numpy as np
import pytest

from vild.engine.curves import _SMOOTH, PANEL_H, PANEL_W, panels, plot_training_curves, read_metrics


def write_jsonl(path, rows, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return path


def test_read_metrics_later_lines_win_and_cut_lines_are_skipped(tmp_path):
    rows = [{"iteration": i, "total_loss": 10.0 - i, "lr": 0.1} for i in (1, 2, 3)]
    rows += [{"iteration": 3, "total_loss": 99.0}, {"iteration": 4, "total_loss": float("nan")}]  # resumed run
    got = read_metrics(write_jsonl(tmp_path / "m.jsonl", rows, tail='{"iteration": 5, "total_lo'))
    assert got["total_loss"] == [(1, 9.0), (2, 8.0), (3, 99.0)]
    assert got["lr"] == [(1, 0.1), (2, 0.1), (3, 0.1)]


def test_panels_total_loss_first_then_losses_lr_and_one_panel_per_evaluation():
    s = {k: [(1, 1.0)] for k in ["loss_mask", "total_loss", "loss_cls", "lr", "sec_per_iter",
                                 "val/bbox/AP", "val/bbox/APr", "val/bbox/AP75", "val/segm/AP", "coco/bbox/AP50_novel",
                                 "val/bbox/per_category/person/AP"]}  # a per-category table gets no panel
    got = panels(s)
    assert [t for t, _ in got] == ["total_loss", "loss_mask", "loss_cls", "lr", "coco/bbox", "val/bbox", "val/segm"]
    assert list(dict(got)["val/bbox"]) == ["AP", "APr"]  # headline stats only, in a fixed order


@pytest.mark.parametrize("direction", [-1, 1])
def test_the_drawn_curve_follows_the_loss(tmp_path, direction):
    rows = [{"iteration": i, "total_loss": 5.0 + direction * i / 50, "lr": 0.01} for i in range(1, 201)]
    out = plot_training_curves(write_jsonl(tmp_path / "metrics.jsonl", rows))
    assert out == tmp_path / "training_curves.png"
    img = cv2.imread(str(out))
    assert img.shape == (PANEL_H, 2 * PANEL_W, 3)  # total_loss and lr
    ys, xs = np.nonzero(np.all(img[:, :PANEL_W] == _SMOOTH, axis=2))
    left, right = ys[xs < PANEL_W / 3].mean(), ys[xs > 2 * PANEL_W / 3].mean()
    assert (right - left) * -direction > PANEL_H / 3  # image rows grow downwards: a falling loss ends lower


def test_nothing_to_plot_is_an_error_naming_the_file(tmp_path):
    path = write_jsonl(tmp_path / "metrics.jsonl", [{"iteration": 1, "sec_per_iter": 0.1}])
    with pytest.raises(ValueError, match="metrics.jsonl has no losses"):
        plot_training_curves(path)
    assert not (tmp_path / "training_curves.png").exists()
