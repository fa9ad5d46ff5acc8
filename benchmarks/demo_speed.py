#!/usr/bin/env python
"""The demo's cost: ``make demo``'s default settings against the full-length ones, on one machine in one run.

    python benchmarks/demo_speed.py          # ~10 min on 2 quiet cores -> results/demo_speed_cpu.json

Both runs start from nothing in their own temporary folder (world, teacher, four detectors, proposal store,
calibration) through ``vild.synthetic.demo.run_demo``:

* ``full`` (``vild-demo --full``): the teacher pretrained here, the detectors from random init, 1000 iterations;
* ``default`` (``vild-demo``): the shipped teacher, the detectors from the shipped backbone, 400 iterations.

The figure is the ratio of the stages' wall time (default / full), beside each run's table and ablation checks.
The full run's freshly pretrained teacher is compared byte for byte with the shipped one
(``vild/synthetic/pretrained/vild-tiny-clip.pt``), and its ViLD-text's backbone tensor for tensor with the shipped
backbone (``…/tiny-backbone.pt``): the default demo starts from what ``--full`` makes.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from common import ROOT, log, write_result  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    """Run the demo at both settings from scratch; write the stage times, tables and checks."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "demo_speed_cpu.json"))
    p.add_argument("--fast", action="store_true", help="both runs at smoke-test size (numbers meaningless)")
    a = p.parse_args(argv)
    from vild.synthetic.demo import (
        SHIPPED_BACKBONE,
        SHIPPED_TEACHER,
        DemoSettings,
        export_backbone,
        run_demo,
    )
    from vild.teacher.clip_teacher import sha256_file
    runs = {"full": DemoSettings.full(), "default": DemoSettings()}
    if a.fast:
        runs = {"full": DemoSettings.fast(), "default": DemoSettings.fast()}
        runs["full"].pretrained_backbone, runs["default"].train_teacher = False, False
    tmp = Path(tempfile.mkdtemp(prefix="vild_demo_speed_"))
    results = {}
    try:
        for name, settings in runs.items():
            log(f"{name}: {asdict(settings)}")
            t = time.perf_counter()
            summary = run_demo(tmp / name, settings, results_dir=None, picture=None)
            stages = {k: v for k, v in summary["seconds"].items() if k != "total"}
            results[name] = {"settings": asdict(settings), "seconds_stages": round(sum(stages.values()), 1),
                             "seconds": summary["seconds"], "seconds_wall": round(time.perf_counter() - t, 1),
                             "rows": summary["rows"], "checks": summary["checks"],
                             "teacher_zero_shot": summary["teacher_zero_shot"]}
            log(f"{name}: stages {results[name]['seconds_stages']} s, checks {summary['checks']}")
        made_teacher = tmp / "full" / "teacher" / "vild-tiny-clip.pt"
        teacher_identical = sha256_file(made_teacher) == sha256_file(SHIPPED_TEACHER)
        export_backbone(tmp / "full" / "vild_text" / "model_final.pth", tmp / "backbone.pt")
        made, shipped = (torch.load(f, weights_only=True) for f in (tmp / "backbone.pt", SHIPPED_BACKBONE))
        backbone_identical = made.keys() == shipped.keys() and all(torch.equal(made[k], shipped[k]) for k in made)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratio = results["default"]["seconds_stages"] / results["full"]["seconds_stages"]
    log(f"default / full stage time: {ratio:.2f}; shipped teacher / backbone identical to the ones --full makes: "
        f"{teacher_identical} / {backbone_identical}")
    write_result(a.out, {
        "what": "make demo's stage wall time at its default settings against the full-length ones (--full), "
                "both from nothing, one after the other on this machine",
        "command": " ".join(["python benchmarks/demo_speed.py", *(argv if argv is not None else sys.argv[1:])]),
        "ratio_default_over_full": round(ratio, 3), "target": "<= 0.4",
        "shipped_teacher_identical_to_full_runs": teacher_identical,
        "shipped_backbone_identical_to_full_runs_vild_text": backbone_identical, "runs": results,
    }, torch.device("cpu"))


if __name__ == "__main__":
    main()
