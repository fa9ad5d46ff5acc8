"""The five benchmark figures; each returns a JSON-ready dict with its numbers, baselines, ratios and targets."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import (EMBED_DIM, LVIS_BASE_CLASSES, LVIS_CLASSES, DispatchCounter, RssSampler, autocast,
                    build_torchvision, build_vild, interleaved, log, lvis_like_names, median, random_boxes,
                    random_images, random_text_embeddings, sync, timed)
from stages import breakdown


def _target(min_ratio: float | None, ratio: float, note: str = "") -> dict | None:
    if min_ratio is None:
        return None
    return {"min_ratio": min_ratio, "ratio": round(ratio, 3), "met": bool(ratio >= min_ratio), "note": note}


def _rate(n: float, seconds: list[float]) -> float:
    return n / median(seconds) if seconds else float("nan")


class Context:
    """Settings of one run plus lazily built, shared models (a model is built once per process)."""

    def __init__(self, args, device: torch.device):
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

    def vild(self):
        if self._vild is None:
            log("building ViLD R50-FPN (configs/vild_r50.yaml, random init, 1203-class vocabulary)")
            self._vild = build_vild(self.args.size, self.device, proposals=self.args.proposals,
                                    detections=self.args.detections, extra_opts=self.args.vild_opts)
        return self._vild

    def torchvision(self):
        if self._tv is None:
            log("building torchvision maskrcnn_resnet50_fpn (random init, 91 classes)")
            self._tv = build_torchvision(self.args.size, self.device, proposals=self.args.proposals,
                                         detections=self.args.detections)
        return self._tv

    def teacher(self):
        if self._teacher is None:
            from vild.teacher import CLIPTeacher
            log(f"building the CLIP teacher {self.args.clip_model} (random init)")
            self._teacher = CLIPTeacher(self.args.clip_model, None, device=self.device, templates="vild",
                                        cache_dir=self.scratch_dir("cache"))
        return self._teacher


# ---- 1. inference --------------------------------------------------------------------------------
def inference(ctx: Context) -> dict:
    """ViLD (1203 classes) vs torchvision Mask R-CNN (91 classes): images/s, 300 detections, masks on."""
    a, dev = ctx.args, ctx.device
    vild, tv = ctx.vild(), ctx.torchvision()
    rows, breakdowns = [], {}
    warmed: set[str] = set()
    for dtype in a.dtypes:
        batches = a.batches if (ctx.cuda or dtype == "fp32") else a.batches[:1]
        for batch in batches:
            imgs = random_images(batch, a.size, dev, seed=batch)
            tv_imgs = [i.float() / 255.0 for i in imgs]
            dets: dict[str, list[int]] = {"vild": [], "torchvision": []}
            mask_ok = {"vild": True, "torchvision": True}
            inst: dict = {"on": False}

            def call(kind, model, x):
                def run():
                    with torch.inference_mode(), autocast(dev, dtype):
                        return model(x)
                if inst["on"]:
                    out, stages = breakdown(kind, model, run, dev)
                    breakdowns.setdefault(f"{dtype}_b{batch}", {})[kind] = stages
                    return out
                return run()

            fns = {"vild": lambda: call("vild", vild, imgs), "torchvision": lambda: call("torchvision", tv, tv_imgs)}

            def check(name, outs):
                for o in outs:
                    n = len(o["boxes"])
                    dets[name].append(n)
                    m = o.get("masks")
                    if m is None or m.shape[0] != n or tuple(m.shape[-2:]) != (a.size, a.size):
                        mask_ok[name] = False

            key = dtype if not ctx.cuda else f"{dtype}_b{batch}"
            warmup = 0 if key in warmed else a.warmup
            warmed.add(key)
            label = f"inference {dtype} batch {batch}"
            want_breakdown = a.breakdown and (batch == a.batches[0] or ctx.cuda)
            if want_breakdown and ctx.cuda:
                # an extra untimed pass with stage timers (they add device syncs)
                interleaved(fns, dev, 0, warmup, label=label)
                warmup = 0
                inst["on"] = True
                for fn in fns.values():
                    fn()
                inst["on"] = False
            if want_breakdown and not ctx.cuda:
                # on the CPU the stage timers cost nothing: the last timed run carries them
                times = interleaved(fns, dev, a.repeats - 1, warmup, on_result=check, label=label)
                inst["on"] = True
                last = interleaved(fns, dev, 1, 0, on_result=check, label=label + " (staged)")
                inst["on"] = False
                for k in times:
                    times[k] += last[k]
            else:
                reps = a.repeats if (ctx.cuda or batch == a.batches[0]) else max(1, a.repeats - 1)
                times = interleaved(fns, dev, reps, warmup, on_result=check, label=label)
            ips = {k: _rate(batch, v) for k, v in times.items()}
            ratio = ips["vild"] / ips["torchvision"]
            if ctx.cuda:
                tgt = _target(3.0, ratio, f"GPU target (defined at 1024x1024, batch 8); measured at {a.size}") \
                    if batch == 8 else None
            else:
                tgt = _target(1.0, ratio, "CPU fp32 target") if dtype == "fp32" else None
            row = {"batch": batch, "dtype": dtype, "ratio": round(ratio, 3), "target": tgt}
            for k in ("vild", "torchvision"):
                row[k] = {"images_per_s": round(ips[k], 4), "seconds_per_batch": [round(t, 4) for t in times[k]],
                          "mean_detections": round(sum(dets[k]) / max(1, len(dets[k])), 1),
                          "masks_ok": mask_ok[k]}
            fair = all(row[k]["mean_detections"] >= a.detections and mask_ok[k] for k in ("vild", "torchvision"))
            row["fair"] = fair
            log(f"inference {dtype} b{batch}: ViLD {ips['vild']:.3f} img/s, torchvision {ips['torchvision']:.3f} "
                f"img/s, ratio {ratio:.2f}; detections/img {row['vild']['mean_detections']} vs "
                f"{row['torchvision']['mean_detections']}{'' if fair else '  (NOT all at the detection cap!)'}")
            rows.append(row)
    tuned = _against_channels_last_torchvision(ctx, vild, tv) if not ctx.cuda and "fp32" in a.dtypes else None
    # the work behind one image (fp32, batch 1): ViLD's head does more, its post-processing less
    imgs = random_images(1, a.size, dev, seed=1)
    with torch.no_grad():  # not inference_mode: torch 2.4's FlopCounterMode counts nothing under it
        gf = {"vild": _flops(lambda: vild(imgs)) / 1e9,
              "torchvision": _flops(lambda: tv([i.float() / 255.0 for i in imgs])) / 1e9}
    flops = {"measure": "matmul + convolution FLOPs of one fp32 forward of one image (torch.utils.flop_counter)",
             "gflop_per_image": {k: round(v, 1) for k, v in gf.items()},
             "ratio_vild_over_torchvision": round(gf["vild"] / gf["torchvision"], 3)}
    return {"size": a.size, "vocabulary": {"vild": LVIS_CLASSES, "torchvision": 91},
            "proposals_per_image": a.proposals or 1000, "detections_per_image": a.detections,
            "score_thresh": 0.0, "rows": rows, "flops": flops, "stage_seconds_per_batch": breakdowns,
            "against_channels_last_torchvision": tuned,
            "note": ("CPU: batches 1 and 2 (batch 8 is too slow on 2 cores), one repeat fewer at batch 2; "
                     "bf16 autocast at batch 1 only"
                     if not ctx.cuda else "")}


def _against_channels_last_torchvision(ctx: Context, vild, tv) -> dict:
    """fp32 batch 1 against torchvision converted to channels-last, one line its user could add (no target).

    ViLD's CPU heads run channels-last (vild/modeling/conv_stack.py); this shows what that is worth
    against a baseline given the same generic trick. BN folding and the fc as a 7x7 conv are left out:
    torchvision's heads have no BatchNorm, and the conv-fc is code of ours, not a switch of theirs.
    """
    import copy
    a, dev = ctx.args, ctx.device
    tv_cl = copy.deepcopy(tv).to(memory_format=torch.channels_last)
    imgs = random_images(1, a.size, dev, seed=1)
    tv_imgs = [i.float() / 255.0 for i in imgs]
    dets: dict[str, list[int]] = {"vild": [], "torchvision_channels_last": []}

    def run(model, x):
        def f():
            with torch.inference_mode():
                return model(x)
        return f

    times = interleaved({"vild": run(vild, imgs), "torchvision_channels_last": run(tv_cl, tv_imgs)}, dev,
                        a.repeats, a.warmup, on_result=lambda n, outs: dets[n].extend(len(o["boxes"]) for o in outs),
                        label="inference fp32 batch 1 vs channels-last torchvision")
    ips = {k: _rate(1, v) for k, v in times.items()}
    ratio = ips["vild"] / ips["torchvision_channels_last"]
    log(f"inference fp32 b1 vs channels-last torchvision: ViLD {ips['vild']:.3f} img/s, torchvision "
        f"{ips['torchvision_channels_last']:.3f} img/s, ratio {ratio:.2f}")
    return {"batch": 1, "dtype": "fp32", "ratio": round(ratio, 3),
            **{k: {"images_per_s": round(ips[k], 4), "seconds_per_batch": [round(t, 4) for t in times[k]],
                   "mean_detections": round(sum(dets[k]) / max(1, len(dets[k])), 1)} for k in times},
            "note": "torchvision as above after model.to(memory_format=torch.channels_last); no target"}


# ---- 2. CLIP on cropped regions ------------------------------------------------------------------
def crops(ctx: Context) -> dict:
    """R-CNN-style alternative: the RPN's proposals cropped and embedded by CLIP (1x and 1.5x) vs ViLD."""
    a, dev = ctx.args, ctx.device
    vild, teacher = ctx.vild(), ctx.teacher()
    dtype = "bf16" if ctx.cuda else "fp32"  # the teacher autocasts to bf16 on CUDA, so ViLD does too
    imgs = random_images(1, a.size, dev, seed=7)
    p = a.crop_proposals
    rpn_times: list[float] = []

    def crop_pipeline():
        props, t_rpn = timed(lambda: vild.propose(imgs), dev)
        rpn_times.append(t_rpn)
        boxes = [b[:p] for b, _ in props]
        return teacher.embed_regions(imgs, boxes)

    def vild_inference():
        with torch.inference_mode(), autocast(dev, dtype):
            return vild(imgs)

    n_props: list[int] = []
    times = interleaved({"vild": vild_inference, "clip_crops": crop_pipeline}, dev, a.crop_repeats, a.warmup,
                        on_result=lambda k, out: n_props.append(len(out[0])) if k == "clip_crops" else None,
                        label="crops")
    rpn_times = rpn_times[-len(times["clip_crops"]):]
    t_crops, t_rpn, t_vild = median(times["clip_crops"]), median(rpn_times), median(times["vild"])
    used = int(median(n_props))
    t_300 = t_rpn + (t_crops - t_rpn) * 300 / max(1, used)
    ratio = t_crops / t_vild
    log(f"crops: ViLD {1 / t_vild:.3f} img/s; RPN + CLIP on {used} proposals x {len(teacher.crop_scales)} scales "
        f"{1 / t_crops:.3f} img/s (ViLD / crops {ratio:.2f}x); at 300 proposals ~{1 / t_300:.4f} img/s "
        f"({t_300 / t_vild:.1f}x)")
    return {
        "size": a.size, "clip_model": a.clip_model, "crop_scales": list(teacher.crop_scales), "dtype": dtype,
        "proposals_embedded": used, "crops_per_image": used * len(teacher.crop_scales),
        "vild": {"images_per_s": round(1 / t_vild, 4), "seconds": [round(t, 4) for t in times["vild"]]},
        "clip_crops": {"images_per_s": round(1 / t_crops, 4), "seconds": [round(t, 4) for t in times["clip_crops"]],
                       "rpn_seconds": round(t_rpn, 4)},
        "clip_crops_300_extrapolated": {"images_per_s": round(1 / t_300, 5), "seconds": round(t_300, 3)},
        "ratio_vild_over_crops": round(ratio, 3),
        "ratio_vild_over_crops_300": round(t_300 / t_vild, 3),
        "note": (f"measured with {used} proposals per image (300 is too slow on this machine); the 300-proposal "
                 "figure scales the CLIP part linearly" if used < 300 else ""),
    }


# ---- 3. training ---------------------------------------------------------------------------------
def training(ctx: Context) -> dict:
    """Steps/s and peak memory of ViLD (with distillation) vs torchvision Mask R-CNN, one process per model."""
    a = ctx.args
    runs: dict[str, list[dict]] = {"vild": [], "torchvision": []}
    for r in range(a.train_rounds):
        order = ["vild", "torchvision"] if r % 2 == 0 else ["torchvision", "vild"]
        for kind in order:
            cmd = [sys.executable, str(Path(__file__).resolve().parent / "run.py"), "--worker", "train",
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
    note = ""
    if ratio < 0.9 and flop_bound < 0.9:
        note = (f"a ViLD step does {gf['vild'] / gf['torchvision']:.2f}x torchvision's FLOPs, so at torchvision's "
                f"FLOP rate it would run at {flop_bound:.2f}x")
    out["target"] = _target(0.9, ratio, note)
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


def train_worker(args) -> dict:
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
    flops = _flops(step)  # after the timed steps: the counting mode slows a step down
    # counted apart: torch's SGD takes a few foreach ops on a GPU but one set per parameter on the CPU
    with DispatchCounter() as counter:
        forward_backward()
    with DispatchCounter() as opt_counter:
        opt.step()
    profile = _profile_step(step, dev) if args.profile_train else None
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


def _profile_step(fn, device: torch.device, top: int = 8) -> dict:
    """One call of ``fn`` under torch.profiler: where a step's time goes, and on a GPU how busy the GPU was.

    ``device_busy_ms`` sums the kernels' durations (one stream: they do not overlap); far below ``wall_ms``
    means the GPU waited for the host (Python, op dispatch, synchronisations), not for arithmetic.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    with profile(activities=acts) as prof:
        t = time.perf_counter()
        fn()
        sync(device)
        wall = time.perf_counter() - t
    events = prof.events()
    names = [e.name for e in events if e.device_type == DeviceType.CPU]
    out = {"wall_ms": round(wall * 1e3, 1), "aten_ops": sum(n.startswith("aten::") for n in names),
           # ops whose output size depends on values: on a GPU each waits for the device (a host sync)
           "sync_ops": {n: names.count(n) for n in DispatchCounter.VALUE_SIZED if n in names},
           "top_ops_self_cpu_ms": _top(prof, "self_cpu_time_total", top)}
    if cuda:
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
        busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e3
        out.update({"device_busy_ms": round(busy, 1), "device_busy_fraction": round(busy / (wall * 1e3), 3),
                    "kernels": len(kernels),
                    "runtime_sync_and_copy_calls": {n: names.count(n) for n in _SYNC_CALLS if n in names},
                    "top_ops_self_device_ms": _top(prof, "self_device_time_total", top)})
    return out


_SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
               "cudaMemcpyAsync")


def _top(prof, attr: str, n: int) -> list:
    rows = []
    for e in prof.key_averages():
        v = getattr(e, attr, None)
        if v is None and attr == "self_device_time_total":
            v = getattr(e, "self_cuda_time_total", 0)  # older torch
        if v:
            rows.append((e.key, round(v / 1e3, 2), e.count))
    return sorted(rows, key=lambda r: -r[1])[:n]


def _flops(fn) -> float:
    """Matmul and convolution FLOPs of one call of ``fn`` (forward, and backward if it runs one)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


# ---- 4. precompute -------------------------------------------------------------------------------
def precompute(ctx: Context) -> dict:
    """Proposal-store writer path (decode, crop, embed 1x + 1.5x, write) vs raw encode_image on ready crops."""
    import cv2
    import numpy as np

    from vild.data import ProposalStoreWriter
    from vild.engine.precompute import batches_of, embed_into_store, image_loader
    a, dev = ctx.args, ctx.device
    teacher = ctx.teacher()
    n_img, p = a.precompute_images, a.precompute_proposals
    tmp = ctx.scratch_dir("store")
    rng = np.random.default_rng(0)
    files, boxes = [], []
    for i in range(n_img):
        # smooth random "photos" (noise decodes unlike real JPEGs); a JPEG like the datasets' files
        small = rng.integers(0, 256, (a.size // 16 + 1, a.size // 16 + 1, 3), dtype=np.uint8)
        img = cv2.GaussianBlur(cv2.resize(small, (a.size, a.size), interpolation=cv2.INTER_CUBIC), (5, 5), 0)
        path = tmp / f"{i:06d}.jpg"
        cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        files.append(str(path))
        boxes.append(random_boxes(p, a.size, a.size, seed=i))
    rounds = a.warmup + a.repeats
    writers = [ProposalStoreWriter(tmp / f"store_{r}", 0, 1, list(range(n_img)), p, teacher.embed_dim,
                                   teacher=teacher.identity, crop_scales=list(teacher.crop_scales))
               for r in range(rounds)]

    pipeline_stats: list[dict] = []
    loader = image_loader(_JpegFiles(files), a.precompute_batch, a.precompute_workers, pin_memory=ctx.cuda,
                          persistent_workers=a.precompute_workers > 0)

    def writer_path():
        # the precompute tool's own loop (vild.engine.precompute.embed_into_store): decoding in loader
        # workers, crops by roi_align on the device, store writes on a background thread
        w = writers.pop(0)
        st: dict = {}
        embed_into_store(batches_of(loader, a.precompute_batch, _jpeg_collate), teacher, w,
                         lambda ids, images: [boxes[i] for i in ids], stats=st)
        w.close()
        pipeline_stats.append({k: round(v, 4) for k, v in st.items()})

    n_crops = n_img * p * len(teacher.crop_scales)
    h, w_ = teacher.image_size
    torch.manual_seed(0)
    ready = (torch.rand(n_crops, 3, h, w_, device=dev) - teacher.mean) / teacher.std

    def encode_image():
        with torch.inference_mode():
            for s in range(0, n_crops, teacher.batch_size):
                with teacher._autocast():
                    teacher.model.encode_image(ready[s:s + teacher.batch_size])

    times = interleaved({"writer": writer_path, "encode_image": encode_image}, dev, a.repeats, a.warmup,
                        label="precompute")
    # where the writer's extra time goes: the crops alone and embed_regions alone, on images already on the device
    decoded = [im.to(dev) for _, im in loader]

    def crops_only():
        for _ in teacher.region_crops(decoded, boxes):
            pass

    parts = interleaved({"crops_only": crops_only, "embed_regions": lambda: teacher.embed_regions(decoded, boxes)},
                        dev, max(1, a.repeats // 2), 1, label="precompute parts")
    ips_writer = _rate(n_img, times["writer"])
    ips_raw = _rate(n_img, times["encode_image"])
    ratio = ips_writer / ips_raw
    log(f"precompute: writer {ips_writer:.3f} img/s, encode_image on the same crops {ips_raw:.3f} img/s, "
        f"ratio {ratio:.2f}")
    return {"size": a.size, "clip_model": a.clip_model, "images": n_img, "proposals_per_image": p,
            "crops_per_image": p * len(teacher.crop_scales), "durable_writes": True,
            "writer": {"images_per_s": round(ips_writer, 4), "crops_per_s": round(ips_writer * n_crops / n_img, 2),
                       "seconds": [round(t, 4) for t in times["writer"]]},
            "encode_image": {"images_per_s": round(ips_raw, 4), "crops_per_s": round(ips_raw * n_crops / n_img, 2),
                             "seconds": [round(t, 4) for t in times["encode_image"]]},
            "ratio": round(ratio, 3), "target": _target(0.7, ratio),
            "loader_workers": a.precompute_workers, "images_per_batch": a.precompute_batch,
            "writer_stage_seconds": pipeline_stats[-a.repeats:],
            "parts_seconds": {k: round(median(v), 4) for k, v in parts.items()},
            "note": "random proposal boxes (no RPN: the figure is the store-writing path)"}


class _JpegFiles(torch.utils.data.Dataset):
    """(index, RGB uint8 [3, H, W]) for each JPEG file, decoded with OpenCV as the datasets do."""

    def __init__(self, files: list[str]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        import cv2
        arr = cv2.imread(self.files[i], cv2.IMREAD_COLOR)
        return i, torch.from_numpy(cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)).permute(2, 0, 1).contiguous()


def _jpeg_collate(items):
    return [i for i, _ in items], [im for _, im in items]


# ---- 5. vocabulary -------------------------------------------------------------------------------
def vocabulary(ctx: Context) -> dict:
    """Embedding 1203 names with the 'vild' template ensemble (cold, cached) and swapping a detector's vocabulary."""
    from vild.teacher.clip_teacher import atomic_save
    from vild.teacher.vocabulary import parse_vocabulary
    a, dev = ctx.args, ctx.device
    teacher = ctx.teacher()
    names = lvis_like_names(LVIS_CLASSES)
    k = min(a.vocab_names, LVIS_CLASSES)
    subset = names[:k]
    n_templates = len(teacher.templates)
    teacher._sha256 = None
    _, t_identity = timed(lambda: teacher.identity, dev)
    teacher.cache_dir = ctx.scratch_dir("cold")
    misses = teacher.cache_misses
    emb, t_cold = timed(lambda: teacher.encode_text(subset), dev)
    assert teacher.cache_misses == misses + 1, "the cold call must miss the cache"
    hits = teacher.cache_hits
    cached = [timed(lambda: teacher.encode_text(subset), dev)[1] for _ in range(5)]
    assert teacher.cache_hits == hits + 5, "the cached calls must hit the cache"
    full_cached = cached
    seeded = False
    if k < LVIS_CLASSES:
        # the cached path for all 1203 names: seed the cache file (cold 1203 is too slow here), then load it
        vocab = parse_vocabulary(names, dedupe=False)
        atomic_save(F.normalize(torch.randn(LVIS_CLASSES, teacher.embed_dim), dim=-1), teacher.text_cache_path(vocab))
        seeded = True
        full_cached = [timed(lambda: teacher.encode_text(names), dev)[1] for _ in range(5)]
    # every synonym of a name is embedded with every template: count prompts, and scale by them
    synonyms, synonyms_1203 = (sum(len(s) for s in parse_vocabulary(n, dedupe=False)) for n in (subset, names))
    prompts = synonyms * n_templates
    cold_1203 = t_cold * synonyms_1203 / synonyms
    log(f"vocabulary: cold {k} names ({synonyms} synonyms) x {n_templates} templates {t_cold:.2f}s "
        f"({prompts / t_cold:.1f} prompts/s; 1203 names ~{cold_1203:.1f}s), cached 1203 "
        f"{median(full_cached) * 1000:.1f} ms")

    model = ctx.vild()
    vocabs = [random_text_embeddings(LVIS_CLASSES, model.embed_dim, seed=s) for s in (1, 2)]
    if emb.shape[1] == model.embed_dim and not seeded:
        vocabs[0] = emb
    swaps = [timed(lambda v=vocabs[i % 2]: model.set_vocabulary(v), dev)[1] for i in range(a.swap_repeats)]
    model.set_vocabulary(random_text_embeddings(LVIS_CLASSES, model.embed_dim))  # back to the inference vocabulary
    log(f"vocabulary swap (set_vocabulary, 1203 x {model.embed_dim}): {median(swaps) * 1000:.2f} ms")
    return {
        "clip_model": a.clip_model, "templates": "vild", "num_templates": n_templates,
        "teacher_identity_seconds": round(t_identity, 3),
        "cold": {"names": k, "synonyms": synonyms, "prompts": prompts, "seconds": round(t_cold, 3),
                 "prompts_per_s": round(prompts / t_cold, 2), "synonyms_1203_names": synonyms_1203,
                 "seconds_1203_names": round(cold_1203, 2), "extrapolated": k < LVIS_CLASSES},
        "cached": {"names": k, "seconds_median": round(median(cached), 5)},
        "cached_1203": {"names": LVIS_CLASSES, "seconds_median": round(median(full_cached), 5),
                        "seeded_cache_file": seeded},
        "set_vocabulary": {"classes": LVIS_CLASSES, "seconds_median": round(median(swaps), 6),
                           "device": str(dev)},
        "note": (f"cold timed on {k} of 1203 names and scaled by synonyms, i.e. prompts (batched, so cost is "
                 "linear); "
                 "the 1203-name cached figure loads a cache file of the right shape" if k < LVIS_CLASSES else ""),
    }


FIGURES = {"inference": inference, "crops": crops, "training": training, "precompute": precompute,
           "vocabulary": vocabulary}
