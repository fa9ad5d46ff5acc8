"""Figure 2, crops: the R-CNN-style alternative (the RPN's proposals cropped and embedded by CLIP) against ViLD."""
from __future__ import annotations

import torch
from common import autocast, interleaved, log, median, random_images, timed

from .context import Context


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
