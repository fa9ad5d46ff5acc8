"""Training curves as one PNG from ``metrics.jsonl``: a panel per loss, the learning rate, and AP per evaluation."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import cv2
import numpy as np

from ..utils.atomic import atomic_write_bytes

PANEL_W, PANEL_H, COLUMNS = 360, 220, 4
_LEFT, _RIGHT, _TOP, _BOTTOM = 58, 12, 26, 30
_RAW, _SMOOTH, _AXIS, _TEXT = (200, 200, 235), (180, 90, 30), (150, 150, 150), (40, 40, 40)  # BGR
# the headline numbers of each evaluator (LVIS: APr = novel; COCO OVD: AP50 on novel / base)
_EVAL_STATS = ["AP", "APr", "APc", "APf", "AP50_novel", "AP50_base"]
_EVAL_COLORS = [(180, 90, 30), (40, 40, 210), (60, 160, 60), (160, 60, 160), (40, 40, 210), (60, 160, 60)]

Series = list[tuple[int, float]]


def read_metrics(path: str | os.PathLike) -> dict[str, Series]:
    """Every finite scalar in a ``metrics.jsonl`` as ``{key: [(iteration, value), ...]}``, sorted by iteration.

    A resumed run logs some iterations again: the later line wins. A line cut off by a kill is skipped.
    """
    found: dict[str, dict[int, float]] = {}
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(row, dict) or "iteration" not in row:
                continue
            it = int(row["iteration"])
            for k, v in row.items():
                if k != "iteration" and isinstance(v, (int, float)) and math.isfinite(v):
                    found.setdefault(k, {})[it] = float(v)
    return {k: sorted(d.items()) for k, d in found.items()}


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average that shrinks at the ends instead of padding."""
    if window <= 1 or len(values) < 3:
        return values
    c = np.concatenate([[0.0], np.cumsum(values)])
    i = np.arange(len(values))
    lo, hi = np.maximum(i - window // 2, 0), np.minimum(i + window // 2 + 1, len(values))
    return (c[hi] - c[lo]) / (hi - lo)


def panels(series: dict[str, Series]) -> list[tuple[str, dict[str, Series]]]:
    """What to draw: each loss (total first), the learning rate, then one panel per evaluated dataset and task."""
    losses = sorted((k for k in series if k.startswith("loss") or k == "total_loss"), key=lambda k: k != "total_loss")
    out = [(k, {k: series[k]}) for k in losses]
    if "lr" in series:
        out.append(("lr", {"lr": series["lr"]}))
    groups: dict[str, dict[str, Series]] = {}
    for k in series:
        prefix, _, stat = k.rpartition("/")
        if prefix.count("/") == 1 and stat in _EVAL_STATS:  # "dataset/task/AP"; not per-category tables
            groups.setdefault(prefix, {})[stat] = series[k]
    for prefix in sorted(groups):
        out.append((prefix, {s: groups[prefix][s] for s in _EVAL_STATS if s in groups[prefix]}))
    return out


def plot_training_curves(metrics: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Draw ``metrics.jsonl`` into a PNG (default: ``training_curves.png`` beside it), written atomically."""
    metrics = Path(metrics)
    out = Path(out) if out is not None else metrics.with_name("training_curves.png")
    todo = panels(read_metrics(metrics))
    if not todo:
        raise ValueError(f"{metrics} has no losses or evaluation results to plot")
    # one iteration axis for all panels, so an evaluation sits under the losses of its iteration
    x_range = (0.0, float(max(it for _, group in todo for s in group.values() for it, _ in s)))
    rows = math.ceil(len(todo) / COLUMNS)
    canvas = np.full((rows * PANEL_H, min(len(todo), COLUMNS) * PANEL_W, 3), 255, np.uint8)
    for i, (title, group) in enumerate(todo):
        y0, x0 = (i // COLUMNS) * PANEL_H, (i % COLUMNS) * PANEL_W
        _draw_panel(canvas[y0:y0 + PANEL_H, x0:x0 + PANEL_W], title, group, x_range)
    ok, png = cv2.imencode(".png", canvas)
    if not ok:
        raise RuntimeError(f"could not encode the curves of {metrics} as PNG")
    atomic_write_bytes(out, png.tobytes())
    return out


def _draw_panel(img: np.ndarray, title: str, group: dict[str, Series], x_range: tuple[float, float]) -> None:
    single = title in group  # a loss or the lr; else the stats of one evaluation
    lines = {}
    for name, s in group.items():
        x, y = np.array([p[0] for p in s], float), np.array([p[1] for p in s], float)
        lines[name] = (x, y, smooth(y, max(1, len(y) // 25)) if single else y)
    # a loss spike must not flatten the rest of the curve: the range follows the smoothed line
    ys = np.concatenate([v[2] for v in lines.values()] + ([np.percentile(lines[title][1], [2, 98])]
                                                         if single else [np.zeros(1)]))  # AP from 0
    y_lo, y_hi = float(ys.min()), float(ys.max())
    if y_hi - y_lo < 1e-12 * max(1.0, abs(y_hi)):
        y_lo, y_hi = y_lo - 0.5 * max(abs(y_lo), 1e-3), y_hi + 0.5 * max(abs(y_hi), 1e-3)
    x_lo, x_hi = x_range[0], max(x_range[1], x_range[0] + 1)
    w, h = PANEL_W - _LEFT - _RIGHT, PANEL_H - _TOP - _BOTTOM

    def to_px(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        px = _LEFT + (x - x_lo) / (x_hi - x_lo) * w
        py = _TOP + (1 - (np.clip(y, y_lo, y_hi) - y_lo) / (y_hi - y_lo)) * h
        return np.round(np.stack([px, py], 1)).astype(np.int32)

    cv2.rectangle(img, (_LEFT, _TOP), (_LEFT + w, _TOP + h), _AXIS, 1)

    def put(text: str, org: tuple[int, int], color: tuple = _TEXT, scale: float = 0.4) -> None:
        cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, color, 1, cv2.LINE_AA)

    put(title, (6, 16), scale=0.45)
    put(f"{y_hi:.3g}", (4, _TOP + 10))
    put(f"{y_lo:.3g}", (4, _TOP + h))
    put(f"{x_lo:.0f}", (_LEFT, PANEL_H - 10))
    label = f"{x_hi:.0f} iter"
    put(label, (_LEFT + w - cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)[0][0], PANEL_H - 10))
    for j, (name, (x, y, y_smooth)) in enumerate(lines.items()):
        if single:
            if len(x) > 1:
                cv2.polylines(img, [to_px(x, y)], False, _RAW, 1, cv2.LINE_AA)
            color = _SMOOTH
        else:
            color = _EVAL_COLORS[_EVAL_STATS.index(name)]
            put(f"{name} {y[-1]:.1f}", (_LEFT + 6, _TOP + 14 + 14 * j), color)
        pts = to_px(x, y_smooth)
        if len(pts) > 1:
            cv2.polylines(img, [pts], False, color, 2 if single else 1, cv2.LINE_AA)
        if not single or len(pts) == 1:
            for p in pts:
                cv2.circle(img, (int(p[0]), int(p[1])), 3, color, -1, cv2.LINE_AA)
