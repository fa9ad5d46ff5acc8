"""What every figure shares: the run's settings and models (``Context``), targets and rates."""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from common import build_torchvision, build_vild, log, median

if TYPE_CHECKING:
    from torchvision.models.detection import MaskRCNN

    from vild.modeling import ViLD
    from vild.teacher import CLIPTeacher


def target(min_ratio: float | None, ratio: float, note: str = "") -> dict | None:
    """The target entry of a figure: ``ratio`` against ``min_ratio`` (None without a target)."""
    if min_ratio is None:
        return None
    return {"min_ratio": min_ratio, "ratio": round(ratio, 3), "met": bool(ratio >= min_ratio), "note": note}


def rate(n: float, seconds: list[float]) -> float:
    """``n`` items per second at the median of ``seconds``."""
    return n / median(seconds) if seconds else float("nan")


class Context:
    """Settings of one run plus lazily built, shared models (a model is built once per process)."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.args, self.device = args, device
        self.cuda = device.type == "cuda"
        self._vild = None
        self._tv = None
        self._teacher = None
        # one scratch folder for the run's stores and caches, removed by close(): runs leave nothing in /tmp
        self.scratch = Path(tempfile.mkdtemp(prefix="vild_bench_"))

    def scratch_dir(self, name: str) -> Path:
        """A new empty folder under the run's scratch folder."""
        return Path(tempfile.mkdtemp(prefix=f"{name}_", dir=self.scratch))

    def close(self) -> None:
        """Remove the scratch folder (stores, JPEGs, text-embedding caches)."""
        shutil.rmtree(self.scratch, ignore_errors=True)

    def vild(self) -> "ViLD":
        """ViLD R50-FPN with random weights and a 1203-class vocabulary, built on first use."""
        if self._vild is None:
            log("building ViLD R50-FPN (configs/vild_r50.yaml, random init, 1203-class vocabulary)")
            self._vild = build_vild(self.args.size, self.device, proposals=self.args.proposals,
                                    detections=self.args.detections, extra_opts=self.args.vild_opts)
        return self._vild

    def torchvision(self) -> "MaskRCNN":
        """torchvision's ``maskrcnn_resnet50_fpn`` with random weights (the baseline), built on first use."""
        if self._tv is None:
            log("building torchvision maskrcnn_resnet50_fpn (random init, 91 classes)")
            self._tv = build_torchvision(self.args.size, self.device, proposals=self.args.proposals,
                                         detections=self.args.detections)
        return self._tv

    def teacher(self) -> "CLIPTeacher":
        """The CLIP teacher ``--clip-model`` with random weights and the 'vild' templates, built on first use."""
        if self._teacher is None:
            from vild.teacher import CLIPTeacher
            log(f"building the CLIP teacher {self.args.clip_model} (random init)")
            self._teacher = CLIPTeacher(self.args.clip_model, None, device=self.device, templates="vild",
                                        cache_dir=self.scratch_dir("cache"))
        return self._teacher
