#!/usr/bin/env python
"""F-VLM beside ViLD-text, ViLD and ViLD-ensemble on the synthetic world, from one run: accuracy and training time.

    python benchmarks/fvlm_demo.py                       # ~15 min on 2 cores -> results/fvlm_demo_synthetic.json
    python benchmarks/fvlm_demo.py --fast                # seconds: every stage at smoke-test size
    python benchmarks/fvlm_demo.py --only F-VLM --fvlm-opts MODEL.BACKBONE.RETURNED_LAYERS "[2,3,4]" \\
        MODEL.ANCHOR.SIZES "[[24],[48],[96],[192]]" --out-dir output/fvlm_try --results ""   # one knob, no file

The world, the tiny CLIP teacher, the ViLD configs, the proposal store and the summary of the official
evaluators' metrics are the demo's own (``vild.synthetic.demo``); F-VLM's config is
``configs/synthetic/fvlm_demo.yaml`` with the demo's schedule. Each detector trains in its own single-thread
process, two at a time (ViLD-text beside F-VLM, then ViLD beside ViLD-ensemble, as the demo pairs them); a
model's training seconds run from building its Trainer to its last step (evaluation apart). ViLD's and
ViLD-ensemble's cost also holds the proposal store, which needs ViLD-text's RPN: ``seconds`` lists each part.
F-VLM's trained model is also evaluated at other ensemble weights (alpha, beta): inference only.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import ROOT, log, write_result  # noqa: E402
from vild.config import CfgNode  # noqa: E402
from vild.engine.logger import setup_logger  # noqa: E402
from vild.synthetic.demo import (  # noqa: E402
    FOLDERS,
    VARIANTS,
    DemoSettings,
    demo_config,
    make_store,
    make_teacher,
    make_world,
    proposal_recall,
    summarize,
)

ROWS = ("ViLD-text", "ViLD", "ViLD-ensemble", "F-VLM")
# (alpha, beta) evaluated on the trained F-VLM besides the config's: detector alone, CLIP alone, in between
ENSEMBLE_WEIGHTS = [(0.0, 0.0), (1.0, 1.0), (0.35, 0.65), (0.2, 0.5), (0.5, 0.8), (0.35, 0.8)]


def train_and_evaluate(cfg: CfgNode, folder: str, threads: int = 1) -> dict:
    """Train one detector from scratch (timed), then evaluate its final weights (timed apart)."""
    from vild.engine.trainer import Trainer
    torch.set_num_threads(threads)
    cfg = cfg.clone()
    cfg.OUTPUT_DIR = folder
    train_cfg = cfg.clone()
    train_cfg.DATASETS.TEST = []
    t0 = time.perf_counter()
    Trainer(train_cfg).train()
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    tester = Trainer(cfg)
    tester.resume_or_load(resume=True)
    results = tester.test()
    return {"train_s": round(train_s, 1), "eval_s": round(time.perf_counter() - t1, 1), "results": results}


def train_pair(jobs: dict[str, tuple[CfgNode, Path]], workers: int) -> dict[str, dict]:
    """Train the jobs side by side in single-thread processes (one after the other with ``workers`` 1)."""
    if workers <= 1 or len(jobs) == 1:
        return {name: train_and_evaluate(cfg, str(folder)) for name, (cfg, folder) in jobs.items()}
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx) as pool:
        futures = {name: pool.submit(train_and_evaluate, cfg, str(folder), 1) for name, (cfg, folder) in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


@torch.no_grad()
def ensemble_sweep(cfg: CfgNode, folder: Path, weights: list[tuple[float, float]]) -> list[dict]:
    """The trained F-VLM evaluated at other (alpha, beta): the same weights, only the test-time ensemble changes."""
    from vild.engine.trainer import Trainer
    cfg = cfg.clone()
    cfg.OUTPUT_DIR = str(folder / "sweep")
    cfg.MODEL.WEIGHTS = str(folder / "model_final.pth")
    tester = Trainer(cfg)
    tester.resume_or_load(resume=False)
    heads = tester.model.roi_heads
    out = []
    for alpha, beta in weights:
        heads.alpha, heads.beta = alpha, beta
        out.append({"alpha": alpha, "beta": beta, **summarize(tester.test())})
        log(f"F-VLM alpha {alpha} beta {beta}: novel AP50 {out[-1]['AP50_novel_box']:.1f}, "
            f"APr {out[-1]['APr_mask']:.1f}, base AP {out[-1]['AP_base_mask']:.1f}")
    return out


def load_average() -> float:
    """The 1-minute load average (other jobs on a shared machine show here)."""
    return round(os.getloadavg()[0], 2)


def table(rows: dict, seconds: dict) -> str:
    """Markdown: the accuracy columns and each model's training seconds."""
    lines = ["| model | AP50 novel (box) | APr (novel, mask) | AP base (mask) | AP50 base (box) | training s |",
             "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['AP50_novel_box']:.1f} | {r['APr_mask']:.1f} | {r['AP_base_mask']:.1f} | "
                     f"{r['AP50_base_box']:.1f} | {seconds[name]:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=str(ROOT / "output" / "fvlm_demo"),
                   help="stage folder (world, teacher, models)")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "fvlm_demo_synthetic.json"),
                   help="result JSON ('' = none)")
    p.add_argument("--fast", action="store_true", help="smoke-test sizes (numbers mean nothing)")
    p.add_argument("--only", default=",".join(ROWS), help=f"comma-separated rows out of {','.join(ROWS)}")
    p.add_argument("--fvlm-opts", nargs="*", default=[], help="KEY VALUE overrides of F-VLM's config")
    p.add_argument("--workers", type=int, default=None, help="detectors trained side by side (default: the demo's)")
    p.add_argument("--fvlm-folder", default=FOLDERS["F-VLM"], help="F-VLM's folder under --out-dir (one per try)")
    a = p.parse_args(argv)
    s = DemoSettings.fast() if a.fast else DemoSettings.full()  # every detector from random init, as F-VLM
    if a.workers is not None:
        s.workers = a.workers
    only = [r.strip() for r in a.only.split(",") if r.strip()]
    if unknown := set(only) - set(ROWS):
        raise SystemExit(f"unknown rows {sorted(unknown)}: choose from {', '.join(ROWS)}")
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    setup_logger(out)
    t_all = time.perf_counter()
    world = make_world(out, s)
    t = time.perf_counter()
    teacher, tmetrics = make_teacher(out, s, world)  # cached after the first run: not part of any model's cost
    log(f"teacher ready in {time.perf_counter() - t:.0f}s; zero-shot on val boxes {tmetrics['zero_shot_val_boxes']}")

    def job(name: str, store: Path | None = None) -> tuple[CfgNode, Path]:
        if name == "F-VLM":
            return demo_config(out, s, world, teacher, "fvlm", "lvis", None, a.fvlm_opts), out / a.fvlm_folder
        variant, split, distills = VARIANTS[name]
        return demo_config(out, s, world, teacher, variant, split, store if distills else None), out / FOLDERS[name]

    raw, seconds, load = {}, {}, {}
    first = [n for n in ("ViLD-text", "F-VLM") if n in only]
    if first:
        load["before_first_pair"] = load_average()
        log(f"training {', '.join(first)}")
        raw.update(train_pair({n: job(n) for n in first}, s.workers))
    store, recall = None, None
    second = [n for n in ("ViLD", "ViLD-ensemble") if n in only]
    if second:
        if "ViLD-text" not in raw:
            raise SystemExit("ViLD and ViLD-ensemble need the proposal store, made with ViLD-text's RPN: "
                             "include ViLD-text in --only")
        log("writing the proposal store with ViLD-text's RPN")
        load["before_store"] = load_average()
        shutil.rmtree(out / "clip_proposals", ignore_errors=True)  # a store left by an earlier run would resume
        t = time.perf_counter()
        cfg, _ = job("ViLD")
        store, _ = make_store(out, cfg, out / FOLDERS["ViLD-text"] / "model_final.pth", s)
        seconds["proposal_store"] = round(time.perf_counter() - t, 1)
        recall = proposal_recall(store, world)
        load["before_second_pair"] = load_average()
        log(f"training {', '.join(second)}")
        raw.update(train_pair({n: job(n, store) for n in second}, s.workers))
    load["end"] = load_average()
    rows = {n: summarize(raw[n]["results"]) for n in ROWS if n in raw}
    for n in rows:
        seconds[n] = raw[n]["train_s"]
    cost = {n: seconds[n] + (seconds["proposal_store"] if n in ("ViLD", "ViLD-ensemble") else 0.0) for n in rows}
    sweep = []
    if "F-VLM" in raw:
        cfg, folder = job("F-VLM")
        sweep = ensemble_sweep(cfg, folder, [w for w in ENSEMBLE_WEIGHTS if w != (cfg.MODEL.FVLM.ALPHA,
                                                                               cfg.MODEL.FVLM.BETA)])
    print("\n" + table(rows, cost) + "\n")
    result = {
        "what": "synthetic-world comparison (NOT LVIS numbers): shapes world, tiny CLIP teacher (a ModifiedResNet), "
                "tiny detectors; F-VLM on the teacher's frozen trunk vs ViLD on a tiny trained CNN",
        "settings": asdict(s), "fvlm_opts": a.fvlm_opts, "rows": rows,
        "training_seconds": cost,
        "seconds": {**seconds, "eval": {n: raw[n]["eval_s"] for n in raw},
                    "total_run": round(time.perf_counter() - t_all, 1)},
        "seconds_note": "training_seconds: from building the Trainer to the last step, one thread, two models at "
                        "a time; ViLD and ViLD-ensemble include the proposal store's seconds (their RPN source, "
                        "ViLD-text, is its own row)",
        "teacher_zero_shot": tmetrics["zero_shot_val_boxes"], "proposal_recall_iou50": recall,
        "fvlm_ensemble_sweep": sweep, "load_average_1min": load,
    }
    if "F-VLM" in rows and "ViLD" in rows:
        f, v = rows["F-VLM"], rows["ViLD"]
        result["goal"] = {
            "fvlm_novel_ap50_above_vild": bool(f["AP50_novel_box"] > v["AP50_novel_box"]),
            "fvlm_training_at_most_half_of_vild": bool(cost["F-VLM"] <= 0.5 * cost["ViLD"]),
            "time_ratio_fvlm_over_vild": round(cost["F-VLM"] / cost["ViLD"], 3),
        }
        print(json.dumps(result["goal"]))
    if a.results:
        write_result(a.results, result, torch.device("cpu"))
    return result


if __name__ == "__main__":
    main()
