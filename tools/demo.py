#!/usr/bin/env python
"""The synthetic-world demo behind ``make demo``: world → tiny CLIP → ViLD-text / ViLD / ensemble / oracle → table."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from vild.synthetic.demo import DemoSettings, export_demo_model, run_demo  # noqa: E402


def main() -> None:
    """Parse flags and run the demo."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="output/demo", help="cache and output folder")
    p.add_argument("--recompute", action="store_true", help="ignore cached stages and start afresh")
    p.add_argument("--fast", action="store_true", help="a few images and steps (smoke test; numbers meaningless)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results-dir", default="benchmarks/results", help="where the table goes ('' = nowhere)")
    p.add_argument("--picture", default="docs/demo_novel_detections.png", help="detections of novel categories")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--iters", type=int, default=0, help="training iterations per detector (default: DemoSettings)")
    p.add_argument("--export", default="", help="after the run, copy the ViLD model (fp16) and teacher here")
    p.add_argument("--teacher-steps", type=int, default=0, help="teacher pretraining steps (default: DemoSettings)")
    a = p.parse_args()
    s = DemoSettings.fast() if a.fast else DemoSettings()
    s.seed = a.seed
    s.detector_iters = a.iters or s.detector_iters
    s.teacher_steps = a.teacher_steps or s.teacher_steps
    run_demo(a.out, s, recompute=a.recompute, results_dir=a.results_dir or None, picture=a.picture or None,
             threads=a.threads or None)
    if a.export:
        print(f"exported {export_demo_model(a.out, a.export)}")


if __name__ == "__main__":
    main()
