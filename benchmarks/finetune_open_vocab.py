#!/usr/bin/env python
"""Fine-tuning that keeps the open vocabulary, on the synthetic world (not LVIS numbers).

    python benchmarks/finetune_open_vocab.py          # ~10 min on 2 busy CPU cores -> results/finetune_open_vocab.json

The demo's ViLD (``tests/assets/demo_model``: trained on 10 base shapes; arrow, heart, ring and star novel) is
fine-tuned on a dataset of 5 of its base shapes plus 2 of its novel ones, which become new categories learnt from
boxes (heart, star). Arrow and ring stay novel: in the images, never annotated. Two fine-tunings from the same
weights, data and settings, each through ``vild-train`` (``vild.cli.train.run``):

* with distillation (``MODEL.VILD.VARIANT vild``): the one-command pipeline, the CLIP proposal store filled from
  the starting model's RPN (``PIPELINE.PROPOSAL_MODEL``);
* without (``MODEL.VILD.VARIANT text``): the ViLD-text loss only.

All three models are scored on the world's validation images with all 14 names as the vocabulary: box AP50 of the
novel shapes, the new ones, the kept base ones, and the dropped base ones (in the images, no longer annotated).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from common import ROOT, log, write_result  # noqa: E402

ASSET = ROOT / "tests" / "assets" / "demo_model"
GROUPS = {
    "novel": ["arrow", "ring"],  # never annotated, in the demo model's training or in the fine-tuning
    "new": ["heart", "star"],  # novel for the starting model, annotated in the fine-tuning data
    "base_kept": ["circle", "square", "triangle", "cross", "crescent"],  # base before, annotated in the fine-tuning
    "base_dropped": ["diamond", "ellipse", "semicircle", "hourglass", "bolt"],  # base before, unannotated now
}


def finetune_json(coco_train: str, out: Path, num_images: int) -> Path:
    """The fine-tuning dataset: the first ``num_images`` training images, annotated with the kept and new shapes."""
    data = json.loads(Path(coco_train).read_text())
    names = set(GROUPS["base_kept"] + GROUPS["new"])
    cats = [c for c in data["categories"] if c["name"] in names]
    ids = {c["id"] for c in cats}
    images = sorted(data["images"], key=lambda im: im["id"])[:num_images]
    keep = {im["id"] for im in images}
    anns = [a for a in data["annotations"] if a["image_id"] in keep and a["category_id"] in ids]
    out.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return out


def run(argv: list[str]) -> dict:
    """``vild-train ARGV`` in this (single-thread) process; returns its evaluation metrics."""
    torch.set_num_threads(1)
    from vild.cli.train import run as train
    t = time.perf_counter()
    results = train(argv)
    return {"results": results, "seconds": round(time.perf_counter() - t, 1)}


def ap50_by_group(metrics: dict) -> dict:
    """Mean box AP50 over each group's categories, from the COCO evaluator's per-category table."""
    per = metrics["custom_test"]["bbox"]["per_category"]
    return {g: round(sum(per[n]["AP50"] for n in names) / len(names), 2) for g, names in GROUPS.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=300, help="fine-tuning iterations (6 images each)")
    p.add_argument("--lr", type=float, default=0.001)
    p.add_argument("--images", type=int, default=300, help="fine-tuning images")
    p.add_argument("--val", type=int, default=150, help="validation images")
    p.add_argument("--seed", type=int, default=0, help="SEED of the fine-tunings (data order, sampling)")
    p.add_argument("--workers", type=int, default=2, help="runs side by side, one thread each")
    p.add_argument("--distill-weight", type=float, default=0.0,
                   help="MODEL.VILD.DISTILL_WEIGHT of the fine-tuning with distillation (default: the config's)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "finetune_open_vocab.json"))
    a = p.parse_args(argv)
    from vild.synthetic.world import generate_world
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="vild_finetune_bench_"))
    try:
        log(f"world: the demo's (seed 0, 128 px), {a.images} training and {a.val} validation images, in {tmp}")
        world = generate_world(str(tmp / "world"), seed=0, num_train=a.images, num_val=a.val, image_size=128)
        train_json = finetune_json(world["coco_train"], tmp / "finetune.json", a.images)
        common = ["--config", "synthetic/vild.yaml", "--test-json", world["coco_val"], "--test-images",
                  world["images_val"], "TEACHER.PRETRAINED", str(ASSET / "vild-tiny-clip.pt"),
                  "TEACHER.CACHE_DIR", str(tmp / "cache"), "TEST.PER_CATEGORY_TABLE", "True"]
        tune = ["--train-json", str(train_json), "--train-images", world["images_train"],
                "MODEL.WEIGHTS", str(ASSET / "model.pth"), "SOLVER.MAX_ITER", str(a.iters), "SOLVER.BASE_LR",
                str(a.lr), "SOLVER.WARMUP_ITERS", str(max(a.iters // 15, 1)), "SOLVER.CHECKPOINT_PERIOD", "0",
                "SEED", str(a.seed)]
        jobs = {
            "fine-tuned with distillation": [*common, *tune, "MODEL.VILD.VARIANT", "vild",
                                             *(["MODEL.VILD.DISTILL_WEIGHT", str(a.distill_weight)]
                                               if a.distill_weight else []),
                                             "PIPELINE.PROPOSAL_MODEL", str(ASSET / "model.pth"),
                                             "OUTPUT_DIR", str(tmp / "with_distillation")],
            "fine-tuned without distillation (ViLD-text loss)": [*common, *tune, "MODEL.VILD.VARIANT", "text",
                                                                 "OUTPUT_DIR", str(tmp / "without_distillation")],
            "starting model (demo ViLD)": [*common, "--eval-only", "MODEL.WEIGHTS", str(ASSET / "model.pth"),
                                           "OUTPUT_DIR", str(tmp / "start")],
        }
        log(f"{len(jobs)} runs, {a.workers} at a time")
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=a.workers, mp_context=ctx) as pool:
            futures = {name: pool.submit(run, args) for name, args in jobs.items()}
            done = {name: f.result() for name, f in futures.items()}
        order = ["starting model (demo ViLD)", "fine-tuned with distillation",
                 "fine-tuned without distillation (ViLD-text loss)"]
        rows = {name: ap50_by_group(done[name]["results"]) for name in order}
        start, with_d = rows[order[0]], rows[order[1]]
        checks = {"novel_ap50_within_5_points_of_start_with_distillation":
                  bool(abs(with_d["novel"] - start["novel"]) <= 5),
                  "new_ap50_rises_with_distillation": bool(with_d["new"] > start["new"])}
        table = ["| model | AP50 novel (arrow, ring) | AP50 new (heart, star) | AP50 base kept | AP50 base dropped |",
                 "|---|---|---|---|---|"]
        table += [f"| {n} | {r['novel']:.1f} | {r['new']:.1f} | {r['base_kept']:.1f} | {r['base_dropped']:.1f} |"
                  for n, r in rows.items()]
        print("\n" + "\n".join(table) + "\n")
        for k, ok in checks.items():
            print(f"  [{'x' if ok else ' '}] {k}")
        write_result(a.out, {
            "what": "synthetic-world fine-tuning (NOT LVIS numbers): box AP50 per category group, vocabulary = all "
                    "14 shape names",
            "command": " ".join(["python benchmarks/finetune_open_vocab.py", *(argv if argv is not None else sys.argv[1:])]),
            "groups": GROUPS, "settings": vars(a), "rows": rows, "checks": checks, "table": "\n".join(table),
            "runs": {n: {"argv": jobs[n], "seconds": done[n]["seconds"]} for n in order},
            "per_category_ap50": {n: {c: v["AP50"] for c, v in done[n]["results"]["custom_test"]["bbox"][
                "per_category"].items()} for n in order},
            "seconds_total": round(time.perf_counter() - t0, 1), "workers": a.workers,
        }, torch.device("cpu"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
