#!/usr/bin/env python
"""vild benchmarks: each figure against its baseline, measured interleaved in the same process, written as JSON.

    python benchmarks/run.py                           # CPU at the reduced default size (320), ~4 min on 2 cores
    python benchmarks/run.py --device cuda --size 1024 # GPU: batch 1 and 8, fp32 and bf16
    python benchmarks/run.py --only inference,training --out /tmp/x.json

Figures: inference, crops, training, precompute, vocabulary (see benchmarks/README.md). Results go to
benchmarks/results/<device>_<size>.json unless --out says otherwise; with --only, figures already in that
file from the same machine are kept.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import log, machine_info  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# per-device defaults (each can be overridden on the command line)
PRESETS = {
    "cpu": dict(size=320, batches=[1, 2], dtypes=["fp32", "bf16"], warmup=1, repeats=3, proposals=None,
                detections=300, crop_proposals=16, crop_repeats=2, train_batch=2, train_steps=2, train_rounds=1,
                train_dtype="fp32", distill_proposals=300, precompute_images=1, precompute_proposals=16,
                precompute_workers=0, precompute_batch=1, vocab_names=16, swap_repeats=20, clip_model="ViT-B-32",
                breakdown=True, profile_train=False,
                # one thread: on a shared, oversubscribed machine every multi-threaded op waits at its OpenMP
                # barrier for a descheduled thread (~8 ms per op), which swamps op-heavy code (see README)
                threads=1),
    "cuda": dict(size=1024, batches=[1, 8], dtypes=["fp32", "bf16"], warmup=2, repeats=5, proposals=None,
                 detections=300, crop_proposals=300, crop_repeats=3, train_batch=8, train_steps=10, train_rounds=2,
                 train_dtype="bf16", distill_proposals=300, precompute_images=64, precompute_proposals=300,
                 precompute_workers=6, precompute_batch=16, vocab_names=1203, swap_repeats=50,
                 clip_model="ViT-B-32", breakdown=True, profile_train=True),
    # a seconds-long pass through every code path (tests/test_benchmarks.py); its numbers mean nothing
    "smoke": dict(size=64, batches=[1], dtypes=["fp32", "bf16"], warmup=0, repeats=1, roi_batch=32, proposals=50, detections=20,
                  crop_proposals=4, crop_repeats=1, train_batch=1, train_steps=1, train_rounds=1, train_dtype="fp32",
                  distill_proposals=20, precompute_images=2, precompute_proposals=2, precompute_workers=1,
                  precompute_batch=2, vocab_names=2, swap_repeats=3,
                  clip_model="vild-test-micro", breakdown=True, profile_train=True, threads=1),
}
FIGURE_ORDER = ["inference", "crops", "training", "precompute", "vocabulary"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--size", type=int, default=None, help="square image side (default: 320 on CPU, 1024 on CUDA)")
    p.add_argument("--out", default="", help="JSON file (default benchmarks/results/<device>_<size>.json)")
    p.add_argument("--only", default="", help=f"comma-separated figures out of {','.join(FIGURE_ORDER)}")
    p.add_argument("--smoke", action="store_true", help="tiny settings for the smoke test (meaningless numbers)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default on CPU: 1, see README; 0 = torch's choice)")
    g = p.add_argument_group("knobs (defaults depend on the device; see PRESETS in run.py)")
    g.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=None)
    g.add_argument("--dtypes", type=lambda s: s.split(","), default=None, help="fp32,bf16")
    g.add_argument("--warmup", type=int, default=None)
    g.add_argument("--repeats", type=int, default=None)
    g.add_argument("--proposals", type=int, default=None, help="RPN proposals per image at test time (both models)")
    g.add_argument("--detections", type=int, default=None)
    g.add_argument("--crop-proposals", type=int, default=None)
    g.add_argument("--crop-repeats", type=int, default=None)
    g.add_argument("--train-batch", type=int, default=None)
    g.add_argument("--roi-batch", type=int, default=None,
                   help="training RoIs sampled per image, both models (default: their own 512)")
    g.add_argument("--train-steps", type=int, default=None)
    g.add_argument("--train-rounds", type=int, default=None)
    g.add_argument("--train-dtype", default=None, choices=["fp32", "bf16"])
    g.add_argument("--distill-proposals", type=int, default=None)
    g.add_argument("--precompute-images", type=int, default=None)
    g.add_argument("--precompute-proposals", type=int, default=None)
    g.add_argument("--precompute-workers", type=int, default=None, help="loader workers decoding the JPEGs")
    g.add_argument("--precompute-batch", type=int, default=None, help="images per embedding call")
    g.add_argument("--vocab-names", type=int, default=None)
    g.add_argument("--swap-repeats", type=int, default=None)
    g.add_argument("--clip-model", default=None)
    g.add_argument("--vild-opts", type=lambda s: s.split(), default=[],
                   help='ablations: ViLD config overrides, e.g. "MODEL.ROI_BOX_HEAD.NUM_CONV 0 MODEL.ROI_BOX_HEAD.NUM_FC 2"')
    g.add_argument("--no-breakdown", dest="breakdown", action="store_false", default=None)
    g.add_argument("--profile-train", action=argparse.BooleanOptionalAction, default=None,
                   help="profile one training step of each model (first round): GPU busy time, kernels, top ops")
    # internal: one model's training steps in a fresh process (for clean peak-memory numbers)
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--worker-model", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    dev_type = torch.device(args.device).type
    preset = PRESETS["smoke" if args.smoke else dev_type]
    for k, v in preset.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    unknown = [f for f in (args.only.split(",") if args.only else []) if f not in FIGURE_ORDER]
    if unknown:
        p.error(f"unknown figure(s) {unknown}: choose from {FIGURE_ORDER}")
    bad = [d for d in args.dtypes if d not in ("fp32", "bf16")]
    if bad:
        p.error(f"unknown dtype(s) {bad}: use fp32 and/or bf16")
    return args


def _code_version() -> str:
    """``git describe`` of the checkout, '-dirty' when it has uncommitted changes ('' outside git)."""
    import subprocess
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def summary(results: dict) -> list[dict]:
    """Every target in the file, as rows {figure, what, ratio, min_ratio, met}."""
    rows = []
    figs = results.get("figures", {})
    for row in figs.get("inference", {}).get("rows", []):
        if row.get("target"):
            rows.append({"figure": "inference", "what": f"{row['dtype']} batch {row['batch']}", **row["target"]})
    for name in ("training", "precompute"):
        t = figs.get(name, {}).get("target")
        if t:
            rows.append({"figure": name, "what": "", **t})
    return rows


def markdown(results: dict) -> str:
    """The README table for a result file."""
    m, figs = results["machine"], results["figures"]
    lines = [f"Machine: {m['cpu']} ({m['cpu_cores_usable']} cores, {m['torch_threads']} torch threads)"
             + (f", GPU {m['gpu']}" if m.get("gpu") else "") + f"; torch {m['torch']}, torchvision "
             f"{m['torchvision']}, open_clip {m['open_clip']}; size {results['args']['size']}"
             + (f"; ViLD ablation {' '.join(results['args']['vild_opts'])}" if results["args"].get("vild_opts") else "")
             + ".", "",
             "| figure | vild | baseline | ratio vild / baseline | target |", "|---|---|---|---|---|"]

    def tgt(t):
        return "—" if not t else f"≥ {t['min_ratio']}× {'**met**' if t['met'] else '**not met**'}"

    for row in figs.get("inference", {}).get("rows", []):
        lines.append(f"| inference {row['dtype']} batch {row['batch']} (img/s; dets/img) | "
                     f"{row['vild']['images_per_s']:.3f} ({row['vild']['mean_detections']:.0f}) | "
                     f"{row['torchvision']['images_per_s']:.3f} ({row['torchvision']['mean_detections']:.0f}) | "
                     f"{row['ratio']:.2f}× | {tgt(row['target'])} |")
    cl = figs.get("inference", {}).get("against_channels_last_torchvision")
    if cl:
        lines.append(f"| inference fp32 batch 1 vs torchvision made channels-last (img/s) | "
                     f"{cl['vild']['images_per_s']:.3f} | {cl['torchvision_channels_last']['images_per_s']:.3f} | "
                     f"{cl['ratio']:.2f}× | — |")
    fl = figs.get("inference", {}).get("flops")
    if fl:
        lines.append(f"| inference work per image (GFLOP, fp32) | {fl['gflop_per_image']['vild']:.0f} | "
                     f"{fl['gflop_per_image']['torchvision']:.0f} | {fl['ratio_vild_over_torchvision']:.2f}× | — |")
    c = figs.get("crops")
    if c:
        lines.append(f"| ViLD vs RPN + CLIP on {c['proposals_embedded']} crops ×{len(c['crop_scales'])} scales (img/s) | "
                     f"{c['vild']['images_per_s']:.3f} | {c['clip_crops']['images_per_s']:.4f} | "
                     f"{c['ratio_vild_over_crops']:.2f}× | — |")
        if c["proposals_embedded"] < 300:
            lines.append(f"| … same at 300 proposals (extrapolated) | {c['vild']['images_per_s']:.3f} | "
                         f"{c['clip_crops_300_extrapolated']['images_per_s']:.4f} | "
                         f"{c['ratio_vild_over_crops_300']:.1f}× | — |")
    t = figs.get("training")
    if t:
        lines.append(f"| training {t['dtype']} batch {t['batch']} (steps/s) | {t['vild']['steps_per_s']:.3f} | "
                     f"{t['torchvision']['steps_per_s']:.3f} | {t['ratio']:.2f}× | {tgt(t['target'])} |")
        if t.get("flops"):
            lines.append(f"| training work per step (GFLOP) | {t['vild']['gflop_per_step']:.0f} | "
                         f"{t['torchvision']['gflop_per_step']:.0f} | {t['flops']['ratio_vild_over_torchvision']:.2f}× | — |")
            lines.append(f"| training FLOP rate (GFLOP/s) | {t['vild']['gflop_per_s']:.0f} | "
                         f"{t['torchvision']['gflop_per_s']:.0f} | {t['flops']['flop_rate_ratio']:.2f}× | — |")
        lines.append(f"| training peak memory (MiB) | {t['vild']['peak_memory_mib']:.0f} | "
                     f"{t['torchvision']['peak_memory_mib']:.0f} | {t['memory_ratio']:.2f}× | — |")
        d = t.get("dispatch")
        if d:
            v, b = d["value_sized_ops"]["vild"], d["value_sized_ops"]["torchvision"]
            lines.append(f"| training ops dispatched per forward + backward | {d['ops']['vild']} | "
                         f"{d['ops']['torchvision']} | {d['ops_ratio_vild_over_torchvision']:.2f}× | — |")
            lines.append(f"| … of which value-sized (a host wait each on a GPU) | {v} | {b} | "
                         f"{v / max(b, 1):.2f}× | — |")
        pv, pt = (t[k].get("profiled_step") or {} for k in ("vild", "torchvision"))
        if "device_busy_fraction" in pv and "device_busy_fraction" in pt:
            lines.append(f"| training: GPU busy in a profiled step (ms of kernels / ms wall) | "
                         f"{pv['device_busy_ms']:.0f} / {pv['wall_ms']:.0f} | {pt['device_busy_ms']:.0f} / "
                         f"{pt['wall_ms']:.0f} | — | — |")
    pc = figs.get("precompute")
    if pc:
        lines.append(f"| precompute ({pc['crops_per_image']} crops/img; img/s) | {pc['writer']['images_per_s']:.3f} | "
                     f"{pc['encode_image']['images_per_s']:.3f} | {pc['ratio']:.2f}× | {tgt(pc['target'])} |")
    v = figs.get("vocabulary")
    if v:
        cold = v["cold"]
        lines.append(f"| vocabulary: 1203 names × {v['num_templates']} templates, cold (s) | "
                     f"{cold['seconds_1203_names']:.1f}{' (extrapolated from ' + str(cold['names']) + ')' if cold['extrapolated'] else ''} | — | — | — |")
        lines.append(f"| vocabulary: 1203 names, cached (ms) | {v['cached_1203']['seconds_median'] * 1000:.1f} | — | — | — |")
        lines.append(f"| `set_vocabulary` 1203 classes (ms) | {v['set_vocabulary']['seconds_median'] * 1000:.2f} | — | — | — |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads and torch.device(args.device).type == "cpu":
        torch.set_num_threads(args.threads)
    if args.worker == "train":
        from figures import train_worker
        print(json.dumps(train_worker(args)), flush=True)
        return {}
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no GPU")
    from figures import FIGURES, Context
    names = args.only.split(",") if args.only else FIGURE_ORDER
    out = Path(args.out) if args.out else RESULTS / f"{device.type}_{args.size}.json"
    machine = machine_info(device)
    results = {"machine": machine, "args": vars(args), "figures": {}}
    if args.only and out.is_file():
        try:
            old = json.loads(out.read_text())
            if {k: old["machine"].get(k) for k in ("cpu", "gpu")} == {k: machine[k] for k in ("cpu", "gpu")}:
                results["figures"] = old.get("figures", {})
        except (ValueError, KeyError):
            pass
    log(f"device {device} ({machine['gpu'] or machine['cpu']}), size {args.size}, figures {names}")
    ctx = Context(args, device)
    try:
        code_version = _code_version()
        t0 = time.perf_counter()
        for name in FIGURE_ORDER:
            if name not in names:
                continue
            log(f"== {name}")
            t = time.perf_counter()
            load0 = os.getloadavg()[0]
            fig = FIGURES[name](ctx)
            fig["wall_seconds"] = round(time.perf_counter() - t, 1)
            # other jobs on a shared machine show here (2 cores: a load over 2 means oversubscribed)
            fig["load_average_1min"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
            fig["measured_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
            # a file merged from --only runs keeps each figure's own settings and code version
            fig["run_args"] = {k: v for k, v in vars(args).items() if k not in ("worker", "worker_model")}
            fig["code_version"] = code_version
            results["figures"][name] = fig
            results["targets"] = summary(results)
            results["wall_seconds"] = round(time.perf_counter() - t0, 1)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=1))  # after every figure: a crash keeps what was measured
    finally:
        ctx.close()
    log(f"done in {time.perf_counter() - t0:.0f}s; wrote {out}")
    print(markdown(results), flush=True)
    for r in results["targets"]:
        print(f"target {r['figure']} {r['what']}: {r['ratio']}x vs >= {r['min_ratio']}x -> "
              f"{'met' if r['met'] else 'NOT met'}" + (f" ({r['note']})" if r.get("note") else ""), flush=True)
    return results


if __name__ == "__main__":
    main()
