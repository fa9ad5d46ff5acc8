"""Shape categories, colours and cheap cv2 rasterisation of shape masks and backgrounds.

Shapes are polygons in unit coordinates (roughly inside [-1, 1]^2, y down); holes are
polygons filled back with 0. Everything takes an explicit numpy Generator: no global RNG.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

_SHIFT = 4  # cv2 fixed-point bits: sub-pixel vertices keep small shapes round
_SCALE = 1 << _SHIFT


@dataclass(frozen=True)
class ShapeCategory:
    name: str
    synonyms: tuple[str, ...]
    definition: str
    max_rotation: float  # degrees; hearts stay roughly upright so they read as hearts


# Chosen to stay distinguishable at ~16 px under rotation: no hexagon/pentagon pairs,
# the diamond is elongated so a rotated square never becomes one.
CATEGORIES: tuple[ShapeCategory, ...] = (
    ShapeCategory("circle", ("circle", "disk"), "a round filled disk", 180),
    ShapeCategory("square", ("square",), "a filled shape with four equal sides", 180),
    ShapeCategory("triangle", ("triangle",), "a filled shape with three sides", 180),
    ShapeCategory("star", ("star",), "a five-pointed star", 180),
    ShapeCategory("heart", ("heart",), "a heart symbol", 35),
    ShapeCategory("cross", ("cross", "plus sign"), "a plus-shaped cross", 180),
    ShapeCategory("crescent", ("crescent", "crescent moon"), "a crescent moon", 180),
    ShapeCategory("ring", ("ring", "annulus"), "a round ring with a hole", 180),
    ShapeCategory("arrow", ("arrow",), "an arrow with a shaft and a head", 180),
    ShapeCategory("diamond", ("diamond", "rhombus"), "an elongated rhombus", 180),
    ShapeCategory("ellipse", ("ellipse", "oval"), "an elongated oval", 180),
    ShapeCategory("semicircle", ("semicircle", "half circle"), "half of a disk", 180),
    ShapeCategory("hourglass", ("hourglass", "bowtie"), "two triangles tip to tip", 180),
    ShapeCategory("bolt", ("bolt", "lightning bolt"), "a zig-zag lightning bolt", 180),
)
CATEGORY_NAMES: tuple[str, ...] = tuple(c.name for c in CATEGORIES)
NOVEL_NAMES: tuple[str, ...] = ("arrow", "heart", "ring", "star")

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220),
    "yellow": (240, 220, 30), "orange": (245, 140, 20), "purple": (140, 40, 180),
    "pink": (250, 120, 190), "cyan": (40, 210, 220), "white": (245, 245, 245),
    "black": (15, 15, 15), "brown": (120, 70, 30), "gray": (128, 128, 128),
}


def _circle(n: int = 48, r: float = 1.0, cx: float = 0.0, cy: float = 0.0,
            ry: float | None = None, a0: float = 0.0, a1: float = 2 * np.pi) -> np.ndarray:
    t = np.linspace(a0, a1, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + (ry if ry is not None else r) * np.sin(t)], 1)


def _star(points: int, inner: float) -> np.ndarray:
    t = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def unit_polygons(name: str, rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Return (fill polygons, hole polygons) of one shape instance in unit coordinates."""
    j = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731  small per-instance variation
    if name == "circle":
        return [_circle()], []
    if name == "ellipse":
        return [_circle(ry=j(0.38, 0.5))], []
    if name == "square":
        a = j(0.78, 0.85)
        return [np.array([[-a, -a], [a, -a], [a, a], [-a, a]])], []
    if name == "diamond":
        w = j(0.45, 0.55)
        return [np.array([[0, -1], [w, 0], [0, 1], [-w, 0]])], []
    if name == "triangle":
        return [_circle(3, a0=-np.pi / 2, a1=1.5 * np.pi) + [0, 0.2]], []
    if name == "star":
        return [_star(5, j(0.38, 0.45))], []
    if name == "heart":
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return [np.stack([x, y + 2.5], 1) / 16.5], []
    if name == "cross":
        a = j(0.26, 0.32)
        return [np.array([[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1],
                          [-a, 1], [-a, a], [-1, a], [-1, -a], [-a, -a]])], []
    if name == "crescent":
        return [_circle()], [_circle(r=j(0.8, 0.88), cx=j(0.38, 0.48))]
    if name == "ring":
        return [_circle()], [_circle(r=j(0.5, 0.58))]
    if name == "arrow":
        s, h = j(0.16, 0.22), j(0.5, 0.6)
        return [np.array([[-1, -s], [0.15, -s], [0.15, -h], [1, 0], [0.15, h], [0.15, s],
                          [-1, s]])], []
    if name == "semicircle":
        arc = np.concatenate([_circle(32, a0=np.pi, a1=2 * np.pi), [[1.0, 0.0]]])
        return [arc + [0, 0.45]], []
    if name == "hourglass":
        w = j(0.7, 0.8)
        return [np.array([[-w, -1], [w, -1], [0.08, 0], [w, 1], [-w, 1], [-0.08, 0]])], []
    if name == "bolt":
        return [np.array([[0.1, -1], [0.55, -1], [0.15, -0.15], [0.6, -0.15], [-0.3, 1],
                          [-0.05, 0.15], [-0.55, 0.15]])], []
    raise KeyError(f"unknown shape {name!r}")


def _to_fixed(poly: np.ndarray, center: tuple[float, float], size: float,
              angle: float) -> np.ndarray:
    c, s = np.cos(np.deg2rad(angle)), np.sin(np.deg2rad(angle))
    p = poly @ np.array([[c, s], [-s, c]]) * (size / 2) + np.asarray(center)
    return np.round(p * _SCALE).astype(np.int32)


def shape_mask(name: str, hw: tuple[int, int], center: tuple[float, float], size: float,
               angle: float, rng: np.random.Generator) -> np.ndarray:
    """Rasterise one shape instance (diameter `size` px) into a uint8 {0,1} mask of shape hw."""
    fills, holes = unit_polygons(name, rng)
    mask = np.zeros(hw, np.uint8)
    cv2.fillPoly(mask, [_to_fixed(p, center, size, angle) for p in fills], 1, cv2.LINE_8, _SHIFT)
    if holes:
        cv2.fillPoly(mask, [_to_fixed(p, center, size, angle) for p in holes], 0, cv2.LINE_8,
                     _SHIFT)
    return mask


def random_angle(name: str, rng: np.random.Generator) -> float:
    """Rotation in degrees within the category's allowed range."""
    m = next(c.max_rotation for c in CATEGORIES if c.name == name)
    return float(rng.uniform(-m, m))


def jitter_color(rgb: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """A colour near `rgb` (per-instance variation, names stay right)."""
    return np.clip(np.asarray(rgb, np.float32) + rng.normal(0, 12, 3), 0, 255)


def random_background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Noisy gradient background with clutter lines/dots (float32 HxWx3, 0..255)."""
    base = rng.uniform(60, 200, 3) * rng.uniform(0.6, 1.0) + rng.uniform(0, 40)
    grad = rng.normal(0, 30, (2, 3))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = base + (yy / h - 0.5)[..., None] * grad[0] + (xx / w - 0.5)[..., None] * grad[1]
    if rng.random() < 0.5:  # stripes: texture that is not an object
        period, phase = rng.uniform(6, 20), rng.uniform(0, 2 * np.pi)
        ang = rng.uniform(0, np.pi)
        wave = np.sin((xx * np.cos(ang) + yy * np.sin(ang)) * 2 * np.pi / period + phase)
        img = img + wave[..., None] * rng.uniform(5, 20)
    img = np.ascontiguousarray(img.astype(np.float32))
    for _ in range(int(rng.integers(0, 6))):
        col = tuple(float(v) for v in rng.uniform(0, 255, 3))
        p = rng.uniform(0, [w, h, w, h]).astype(int)
        if rng.random() < 0.6:
            cv2.line(img, (int(p[0]), int(p[1])), (int(p[2]), int(p[3])), col, 1)
        else:
            cv2.circle(img, (int(p[0]), int(p[1])), int(rng.integers(1, 3)), col, -1)
    return img + rng.normal(0, rng.uniform(2, 12), (h, w, 1)).astype(np.float32)


def paint(img: np.ndarray, mask: np.ndarray, color: np.ndarray,
          rng: np.random.Generator) -> None:
    """Paint `color` with mild shading and noise into float image `img` where mask is set."""
    m = mask.astype(bool)
    n = int(m.sum())
    if n:
        img[m] = color + rng.normal(0, 6, (n, 3)).astype(np.float32)
