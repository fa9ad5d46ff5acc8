#!/usr/bin/env python
"""F-VLM R50 against ViLD R50: inference images/s on the CPU at 320 px, interleaved in one process.

    python benchmarks/fvlm_speed.py                     # ~3 min on 2 cores -> results/fvlm_speed_cpu_320.json
    python benchmarks/fvlm_speed.py --size 64 --repeats 1 --warmup 0 --out /tmp/x.json   # a smoke run

Both models have random weights (speed does not depend on them) and the run.py inference figure's settings:
an LVIS-sized vocabulary (1203 random unit text embeddings, the first 866 counted as base), 1000 proposals,
300 detections per image, score threshold 0, masks pasted into the image, batch 1, fp32, one thread (see
README.md on threads). ViLD is ``configs/vild_r50.yaml`` (torchvision ResNet-50, 512-d embeddings); F-VLM is
``configs/fvlm_r50.yaml`` (CLIP RN50's trunk, frozen, 1024-d embeddings, CLIP's region scores for every
box). ``fvlm_vlm_seconds_per_image`` is the part of F-VLM's time spent on CLIP's region scores.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import (  # noqa: E402
    LVIS_BASE_CLASSES,
    LVIS_CLASSES,
    ROOT,
    build_vild,
    interleaved,
    log,
    median,
    random_images,
    random_text_embeddings,
    write_result,
)


def build_fvlm(size: int, proposals: int, detections: int, seed: int = 0):
    """Random-init F-VLM R50 (configs/fvlm_r50.yaml at ``size``), an LVIS-sized vocabulary, eval mode."""
    from vild.config import load_config
    from vild.modeling import build_model
    cfg = load_config("fvlm_r50.yaml", [
        "INPUT.TEST_SIZE", str(size), "INPUT.IMAGE_SIZE", str(size), "MODEL.DEVICE", "cpu", "TEACHER.PRETRAINED", "",
        "MODEL.RPN.POST_NMS_TOPK_TEST", str(proposals), "MODEL.RPN.PRE_NMS_TOPK_TEST", str(max(proposals, 1000)),
        "MODEL.ROI_HEADS.DETECTIONS_PER_IMAGE", str(detections)])
    torch.manual_seed(seed)
    model = build_model(cfg)
    base = torch.arange(LVIS_CLASSES) < LVIS_BASE_CLASSES
    model.set_vocabulary(random_text_embeddings(LVIS_CLASSES, model.embed_dim, seed=seed), base)
    return model.eval()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=320)
    p.add_argument("--proposals", type=int, default=1000)
    p.add_argument("--detections", type=int, default=300)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fvlm_speed_cpu_320.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    dev = torch.device("cpu")
    vild = build_vild(a.size, dev, proposals=a.proposals, detections=a.detections)
    fvlm = build_fvlm(a.size, a.proposals, a.detections)
    images = random_images(1, a.size, dev)
    dets: dict[str, list[int]] = {"vild": [], "fvlm": []}
    masks_ok = {"vild": True, "fvlm": True}

    def run(model):
        def f():
            with torch.inference_mode():
                return model(images)
        return f

    def check(name, outs):
        for o in outs:
            dets[name].append(len(o["boxes"]))
            masks_ok[name] &= tuple(o["masks"].shape) == (len(o["boxes"]), a.size, a.size)

    vlm_seconds = []
    scorer = fvlm.roi_heads.vlm
    plain_forward = scorer.forward

    def timed_forward(*args, **kwargs):
        t = time.perf_counter()
        out = plain_forward(*args, **kwargs)
        vlm_seconds.append(time.perf_counter() - t)
        return out
    scorer.forward = timed_forward
    log(f"F-VLM R50 vs ViLD R50 at {a.size} px, batch 1, fp32, {a.threads} thread(s)")
    times = interleaved({"vild": run(vild), "fvlm": run(fvlm)}, dev, a.repeats, a.warmup, on_result=check,
                        label="inference")
    ips = {k: 1.0 / median(v) for k, v in times.items()}
    result = {
        "what": "inference images/s, F-VLM R50 (configs/fvlm_r50.yaml) vs ViLD R50 (configs/vild_r50.yaml), "
                "random weights, 1203-class vocabulary",
        "args": vars(a),
        "vild": {"images_per_s": round(ips["vild"], 4), "seconds_per_batch": [round(t, 4) for t in times["vild"]],
                 "mean_detections": sum(dets["vild"]) / len(dets["vild"]), "masks_ok": masks_ok["vild"]},
        "fvlm": {"images_per_s": round(ips["fvlm"], 4), "seconds_per_batch": [round(t, 4) for t in times["fvlm"]],
                 "mean_detections": sum(dets["fvlm"]) / len(dets["fvlm"]), "masks_ok": masks_ok["fvlm"],
                 "vlm_seconds_per_image": round(median(vlm_seconds[-a.repeats:]), 4)},
        "ratio_fvlm_over_vild": round(ips["fvlm"] / ips["vild"], 3),
        "trainable_parameters_millions": {
            k: round(sum(q.numel() for q in m.parameters() if q.requires_grad) / 1e6, 2)
            for k, m in (("vild", vild), ("fvlm", fvlm))},
    }
    log(f"ViLD {ips['vild']:.3f} img/s, F-VLM {ips['fvlm']:.3f} img/s (ratio {result['ratio_fvlm_over_vild']}), "
        f"CLIP region scores {result['fvlm']['vlm_seconds_per_image']:.2f} s per image")
    if a.out:
        write_result(a.out, result, dev)
    return result


if __name__ == "__main__":
    main()
