"""Figure 1, inference: ViLD (1203 classes) against torchvision's Mask R-CNN (91 classes), images/s."""
from __future__ import annotations

import torch
from common import LVIS_CLASSES, autocast, interleaved, log, random_images
from stages import breakdown

from .context import Context, rate, target
from .measure import count_flops


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
            ips = {k: rate(batch, v) for k, v in times.items()}
            ratio = ips["vild"] / ips["torchvision"]
            if ctx.cuda:
                tgt = target(3.0, ratio, f"GPU target (defined at 1024x1024, batch 8); measured at {a.size}") \
                    if batch == 8 else None
            else:
                tgt = target(1.0, ratio, "CPU fp32 target") if dtype == "fp32" else None
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
        gf = {"vild": count_flops(lambda: vild(imgs)) / 1e9,
              "torchvision": count_flops(lambda: tv([i.float() / 255.0 for i in imgs])) / 1e9}
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
    ips = {k: rate(1, v) for k, v in times.items()}
    ratio = ips["vild"] / ips["torchvision_channels_last"]
    log(f"inference fp32 b1 vs channels-last torchvision: ViLD {ips['vild']:.3f} img/s, torchvision "
        f"{ips['torchvision_channels_last']:.3f} img/s, ratio {ratio:.2f}")
    return {"batch": 1, "dtype": "fp32", "ratio": round(ratio, 3),
            **{k: {"images_per_s": round(ips[k], 4), "seconds_per_batch": [round(t, 4) for t in times[k]],
                   "mean_detections": round(sum(dets[k]) / max(1, len(dets[k])), 1)} for k in times},
            "note": "torchvision as above after model.to(memory_format=torch.channels_last); no target"}
