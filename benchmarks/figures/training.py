"""Figure 3, training: steps/s and peak memory of ViLD (with distillation) against torchvision's Mask R-CNN."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from common import (EMBED_DIM, LVIS_BASE_CLASSES, LVIS_CLASSES, DispatchCounter, RssSampler, autocast,
                    build_torchvision, log, median, random_boxes, random_images, random_text_embeddings, sync,
                    timed)

from .context import Context, target
from .measure import count_flops, profile_step


def training(ctx: Context) -> dict:
    """Steps/s and peak memory of ViLD (with distillation) vs torchvision Mask R-CNN, one process per model."""
    a = ctx.args
    runs: dict[str, list[dict]] = {"vild": [], "torchvision": []}
    for r in range(a.train_rounds):
        order = ["vild", "torchvision"] if r % 2 == 0 else ["torchvision", "vild"]
        for kind in order:
            cmd = [sys.executable, str(Path(__file__).resolve().parent.parent / "run.py"), "--worker", "train",
                   "--worker-model", kind, "--device", a.device, "--size", str(a.size),
                   "--train-batch", str(a.train_batch), "--train-steps", str(a.train_steps),
                   "--warmup", str(a.warmup), "--distill-proposals", str(a.distill_proposals),
                   "--train-dtype", a.train_dtype]
            cmd += ["--vild-opts", " ".join(a.vild_opts)] if a.vild_opts else []
            cmd += ["--threads", str(a.threads)] if a.threads else []
            cmd += ["--roi-batch", str(a.roi_batch)] if a.roi_batch else []
            cmd += ["--profile-train" if a.profile_train and r == 0 else "--no-profile-train"]
            log(f"training round {r + 1}/{a.train_rounds}: {kind} in a fresh process")
            proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            if proc.returncode != 0:
                raise RuntimeError(f"training worker {kind} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[kind].append(res)
            log(f"  {kind}: steps {[round(s, 2) for s in res['step_seconds']]} s, peak memory "
                f"{res['peak_memory_mib']} MiB")
    out = {"size": a.size, "batch": a.train_batch, "dtype": a.train_dtype,
           "distill_proposals_per_image": a.distill_proposals, "vild_train_vocabulary": LVIS_BASE_CLASSES,
           "roi_batch_per_image": a.roi_batch or 512}
    sps = {}
    for kind, rs in runs.items():
        steps = [s for r in rs for s in r["step_seconds"]]
        sps[kind] = 1.0 / median(steps)
        out[kind] = {"steps_per_s": round(sps[kind], 4), "images_per_s": round(sps[kind] * a.train_batch, 4),
                     "step_seconds": [round(s, 4) for s in steps],
                     "peak_memory_mib": max(r["peak_memory_mib"] for r in rs),
                     "memory_measure": rs[0]["memory_measure"], "losses": rs[-1]["losses"],
                     "dispatch_per_step": rs[0]["dispatch"],
                     "profiled_step": rs[0].get("profile")}
    ratio = sps["vild"] / sps["torchvision"]
    out["ratio"] = round(ratio, 3)
    out["memory_ratio"] = round(out["vild"]["peak_memory_mib"] / max(1e-9, out["torchvision"]["peak_memory_mib"]), 3)
    # the work each step does: a ratio below what the FLOPs allow would point at overhead, one above it
    # at a model that computes more efficiently than the baseline
    gf = {kind: runs[kind][0]["gflop_per_step"] for kind in runs}
    for kind in runs:
        out[kind]["gflop_per_step"] = gf[kind]
        out[kind]["gflop_per_s"] = round(gf[kind] * sps[kind], 1)
    flop_bound = gf["torchvision"] / gf["vild"]
    out["flops"] = {"measure": "matmul + convolution FLOPs of one step, forward and backward (torch.utils.flop_counter)",
                    "ratio_vild_over_torchvision": round(gf["vild"] / gf["torchvision"], 3),
                    "ratio_at_equal_flop_rate": round(flop_bound, 3),
                    "flop_rate_ratio": round(out["vild"]["gflop_per_s"] / out["torchvision"]["gflop_per_s"], 3)}
    # what the host issues per step: where a GPU waits for the host, this bounds the step, not the FLOPs
    ops = {kind: runs[kind][0]["dispatch"] for kind in runs}
    out["dispatch"] = {"measure": "ops dispatched by a training step's forward and backward (the SGD step's apart, "
                                  "as optimizer_ops) and those whose output size depends on values (each a "
                                  "host-device synchronisation on a GPU)",
                       "ops": {k: v["ops"] for k, v in ops.items()},
                       "ops_ratio_vild_over_torchvision": round(ops["vild"]["ops"] / ops["torchvision"]["ops"], 3),
                       "value_sized_ops": {k: v["value_sized_ops"] for k, v in ops.items()},
                       "optimizer_ops": {k: v["optimizer_ops"] for k, v in ops.items()}}
    # on the CPU a step is bound by its FLOPs (the paper's head does several times torchvision's): the FLOP
    # ratio and rate are the figures there, the step rate has no target
    note = ""
    if ratio < 0.9 and flop_bound < 0.9:
        note = (f"a ViLD step does {gf['vild'] / gf['torchvision']:.2f}x torchvision's FLOPs, so at torchvision's "
                f"FLOP rate it would run at {flop_bound:.2f}x")
    out["target"] = target(0.9 if a.device.startswith("cuda") else None, ratio, note)
    log(f"training: ViLD {sps['vild']:.3f} steps/s, torchvision {sps['torchvision']:.3f} steps/s, ratio {ratio:.2f}")
    return out


def _train_targets(kind: str, n: int, size: int, distill: int, device: torch.device, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        boxes = random_boxes(5, size, size, seed=seed + i, min_side=size / 8)
        masks = torch.zeros(len(boxes), size, size, dtype=torch.uint8)
        for j, (x0, y0, x1, y1) in enumerate(boxes.round().int().tolist()):
            masks[j, y0:y1, x0:x1] = 1
        if kind == "vild":
            t = {"boxes": boxes, "labels": torch.randint(0, LVIS_BASE_CLASSES, (len(boxes),), generator=g),
                 "masks": masks, "proposal_boxes": random_boxes(distill, size, size, seed=100 + seed + i),
                 "proposal_embeds": F.normalize(torch.randn(distill, EMBED_DIM, generator=g), dim=-1),
                 "proposal_valid": torch.ones(distill, dtype=torch.bool)}
        else:
            t = {"boxes": boxes, "labels": torch.randint(1, 91, (len(boxes),), generator=g), "masks": masks}
        out.append({k: v.to(device) for k, v in t.items()})
    return out


def train_worker(args: argparse.Namespace) -> dict:
    """One model's training steps in this (fresh) process; peak memory relative to before the first step."""
    import resource
    dev = torch.device(args.device)
    kind, size, b = args.worker_model, args.size, args.train_batch
    torch.manual_seed(0)
    if kind == "vild":
        from common import vild_config
        from vild.modeling import build_model
        cfg = vild_config(size, extra_opts=args.vild_opts)
        if getattr(args, "roi_batch", None):
            cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = args.roi_batch
        model = build_model(cfg)
        vocab = random_text_embeddings(LVIS_CLASSES, model.embed_dim)
        base = torch.zeros(LVIS_CLASSES, dtype=torch.bool)
        base[:LVIS_BASE_CLASSES] = True
        # training sees the base categories only (as vild.engine.trainer does)
        model.set_vocabulary(vocab[base], None)
        images = random_images(b, size, dev)
    else:
        model = build_torchvision(size, dev)
        if getattr(args, "roi_batch", None):
            model.roi_heads.fg_bg_sampler.batch_size_per_image = args.roi_batch
        images = [i.float() / 255.0 for i in random_images(b, size, dev)]
    model = model.to(dev).train()
    targets = _train_targets(kind, b, size, args.distill_proposals, dev)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=4e-5)

    def forward_backward():
        with autocast(dev, args.train_dtype):
            losses = model(images, targets)
        total = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        total.backward()
        return losses

    def step():
        losses = forward_backward()
        opt.step()
        return losses

    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base_mem = torch.cuda.memory_allocated(dev)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    sampler = RssSampler() if dev.type == "cpu" else None
    times, losses = [], {}
    for i in range(args.warmup + args.train_steps):
        losses, dt = timed(step, dev)
        if i >= args.warmup:
            times.append(dt)
    flops = count_flops(step)  # after the timed steps: the counting mode slows a step down
    # counted apart: torch's SGD takes a few foreach ops on a GPU but one set per parameter on the CPU
    with DispatchCounter() as counter:
        forward_backward()
    with DispatchCounter() as opt_counter:
        opt.step()
    profile = profile_step(step, dev) if args.profile_train else None
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) / 2 ** 20
        measure = "torch.cuda.max_memory_allocated (weights, gradients, optimizer state, activations)"
        extra = {"training_memory_mib": round((torch.cuda.max_memory_allocated(dev) - base_mem) / 2 ** 20, 1)}
    else:
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        sampled = sampler.stop()
        # ru_maxrss (the kernel's high-water mark) can lag behind memory that was freed again, so the
        # resident size is also sampled every few ms; the larger increase is reported
        peak = max(rss1 - rss0, sampled["max_kib"] - sampled["start_kib"]) / 1024
        measure = ("peak resident-memory increase over the training steps in a fresh process (ru_maxrss delta, "
                   "and /proc/self/statm sampled every 5 ms): activations, gradients, optimizer state")
        extra = {"process_max_rss_mib": round(max(rss1, sampled["max_kib"]) / 1024, 1),
                 "ru_maxrss_delta_mib": round((rss1 - rss0) / 1024, 1),
                 "sampled_rss_delta_mib": round((sampled["max_kib"] - sampled["start_kib"]) / 1024, 1)}
    return {"model": kind, "step_seconds": times, "gflop_per_step": round(flops / 1e9, 2),
            "dispatch": {**counter.result(), "optimizer_ops": opt_counter.ops},
            "peak_memory_mib": round(peak, 1), "memory_measure": measure,
            "losses": {k: round(float(v.detach()), 4) for k, v in losses.items()}, "profile": profile, **extra}
