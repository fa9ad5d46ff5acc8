"""Calibrate shipped demo checkpoints again, in place, on the demo world they were trained and calibrated on.

The demo calibrates each detector right after training it (``vild.synthetic.demo.train_detector``); this runs the
same ``calibrate_from_config`` on an exported checkpoint (its old calibration dropped), for when the display
scoring gains a calibrated part: the region mean on 200 training images of the demo world (seed 0), then on its
150 validation images the image head's null (ViLD-ensemble), the confidence fits and the display threshold.
Writes the new entries (region mean apart) to ``--out``.

    python benchmarks/calibrate_demo_model.py   # tests/assets/demo_model/model_ensemble.pth
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vild.engine.calibration import calibrate_from_config  # noqa: E402
from vild.engine.checkpoint import load_checkpoint  # noqa: E402
from vild.synthetic.demo import DemoSettings, demo_config, make_world  # noqa: E402
from vild.utils.atomic import atomic_save  # noqa: E402


def recalibrate(weights: Path, world: dict, scratch: Path) -> dict:
    """Measure ``weights``' calibration again on the demo world, its old one dropped; returns the new entry.

    The checkpoint is replaced only once the new calibration is written: a failed run leaves it as it was."""
    ckpt = load_checkpoint(weights)
    variant = ckpt["cfg"]["MODEL"]["VILD"]["VARIANT"]
    # the checkpoint names its teacher by file name: the demo config takes the one beside it
    cfg = demo_config(scratch, DemoSettings(), world, weights.parent / ckpt["cfg"]["TEACHER"]["PRETRAINED"], variant,
                      "lvis", None)
    ckpt.pop("calibration", None)
    work = weights.with_name(f".{weights.stem}.calibrating{weights.suffix}")  # beside it: it finds the teacher there
    try:
        atomic_save(ckpt, work)
        entry = calibrate_from_config(cfg, str(work))
        os.replace(work, weights)
    finally:
        work.unlink(missing_ok=True)
    return entry


def main(argv: list[str] | None = None) -> dict:
    """Parse arguments, calibrate each checkpoint, write the result file."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", nargs="+", default=["tests/assets/demo_model/model_ensemble.pth"])
    p.add_argument("--out", default="benchmarks/results/demo_model_calibration.json")
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    scratch = Path(tempfile.mkdtemp(prefix="vild_calibrate_"))
    try:
        world = make_world(scratch, DemoSettings())
        rows = {}
        for w in a.weights:
            entry = recalibrate(Path(w), world, scratch)
            rows[w] = {k: v for k, v in entry.items() if k != "region_mean"}
            print(w, json.dumps(rows[w]))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = {"what": "display calibration of shipped demo checkpoints on the demo world (seed 0)",
              "settings": {"seed": DemoSettings().seed, "train_images": 200, "val_images": DemoSettings().num_val},
              "rows": rows, "machine": {"platform": platform.platform(), "torch": torch.__version__}}
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
