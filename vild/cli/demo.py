"""``vild-demo`` (``tools/demo.py`` in a checkout): the synthetic-world ablation, from world to table."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None, results_dir: str | None = None, picture: str | None = None) -> int:
    """``vild-demo``: the synthetic-world ablation; table and picture go under ``--out`` unless given."""
    p = argparse.ArgumentParser(
        description="The synthetic-world demo: world -> tiny CLIP -> ViLD-text / ViLD / ensemble / oracle "
                    "(/ F-VLM) -> table.")
    p.add_argument("--out", default="", help="cache and output folder (default: output/demo, output/demo_full with "
                                             "--full)")
    p.add_argument("--recompute", action="store_true", help="ignore cached stages and start afresh")
    p.add_argument("--fast", action="store_true", help="a few images and steps (smoke test; numbers meaningless)")
    p.add_argument("--full", action="store_true",
                   help="every stage from nothing, as the shipped weights were made: the teacher pretrained here and "
                        "the detectors trained from random init for 1000 iterations (about 2.5x the time)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results-dir", default=None,
                   help=f"where the table goes ('' = nowhere; default: {results_dir or 'OUT/results'}; "
                        f"OUT/results with --full)")
    p.add_argument("--picture", default=None,
                   help=f"detections of novel categories ('' = none; default: "
                        f"{picture or 'OUT/demo_novel_detections.png'}; under OUT with --full)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--iters", type=int, default=0, help="training iterations per detector (default: DemoSettings)")
    p.add_argument("--export", default="",
                   help="after the run, copy the ViLD and ViLD-ensemble models (fp16) and the teacher here "
                        "(tests/assets/demo_model: --iters 6000 --train-teacher --teacher-steps 3000 "
                        "--export tests/assets/demo_model)")
    p.add_argument("--train-teacher", action="store_true",
                   help="pretrain the tiny CLIP teacher here instead of starting from the shipped one")
    p.add_argument("--teacher-steps", type=int, default=0,
                   help="teacher pretraining steps with --train-teacher (default: DemoSettings)")
    p.add_argument("--fvlm", action="store_true",
                   help="also train F-VLM (the teacher's frozen trunk as backbone, configs/synthetic/fvlm_demo.yaml) "
                        "beside ViLD-text and the oracle, as one more row; its table is demo_synthetic_fvlm.md")
    a = p.parse_args(argv)

    from ..synthetic.demo import DemoSettings, export_demo_model, run_demo

    if a.fast and a.full:
        p.error("--fast and --full exclude each other: pass one")
    s = DemoSettings.fast() if a.fast else DemoSettings.full() if a.full else DemoSettings()
    a.out = a.out or ("output/demo_full" if a.full else "output/demo")
    s.seed = a.seed
    s.detector_iters = a.iters or s.detector_iters
    s.teacher_steps = a.teacher_steps or s.teacher_steps
    s.train_teacher = s.train_teacher or a.train_teacher
    s.fvlm = a.fvlm
    # a checkout's README shows the default run's table: --full keeps its own under --out
    results_dir, picture = (None, None) if a.full else (results_dir, picture)
    results = a.results_dir if a.results_dir is not None else results_dir or str(Path(a.out) / "results")
    pic = a.picture if a.picture is not None else picture or str(Path(a.out) / "demo_novel_detections.png")
    run_demo(a.out, s, recompute=a.recompute, results_dir=results or None, picture=pic or None,
             threads=a.threads or None)
    if a.export:
        for folder in ("vild", "vild_ensemble"):
            print(f"exported {export_demo_model(a.out, a.export, folder)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
