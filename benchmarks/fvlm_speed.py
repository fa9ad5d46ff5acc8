#!/usr/bin/env python
"""F-VLM R50 against ViLD R50 on the CPU at 320 px, interleaved in one process: inference images/s, training steps.

    python benchmarks/fvlm_speed.py                     # ~3 min on 2 cores -> results/fvlm_speed_cpu_320.json
    python benchmarks/fvlm_speed.py --size 64 --repeats 1 --warmup 0 --out /tmp/x.json   # a smoke run

Both models have random weights (speed does not depend on them) and the run.py inference figure's settings:
an LVIS-sized vocabulary (1203 random unit text embeddings, the first 866 counted as base), 1000 proposals,
300 detections per image, score threshold 0, masks pasted into the image, batch 1, fp32, one thread (see
README.md on threads). ViLD is ``configs/vild_r50.yaml`` (torchvision ResNet-50, 512-d embeddings); F-VLM is
``configs/fvlm_r50.yaml`` (CLIP RN50's trunk, frozen, 1024-d embeddings, CLIP's region scores for every
box). ``vlm_seconds_per_image`` is the part of F-VLM's time spent on CLIP's region scores.
Training: seconds per SGD step (forward, backward, step; batch 1) on random targets, 5 boxes with masks per
image, of 866 base classes; ViLD also distills 300 proposals per image (random unit CLIP embeddings), as it
trains from a proposal store, and F-VLM has none. The proposal store's own cost is not in this figure.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import (  # noqa: E402
    EMBED_DIM,
    LVIS_BASE_CLASSES,
    LVIS_CLASSES,
    ROOT,
    build_vild,
    interleaved,
    log,
    median,
    random_boxes,
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


def train_step(model, size: int, distill: int, seed: int = 0):
    """A function running one SGD step of ``model`` on one image with random base-class targets."""
    g = torch.Generator().manual_seed(seed)
    image = random_images(1, size, torch.device("cpu"), seed=seed)
    boxes = random_boxes(5, size, size, seed=seed, min_side=size / 8)
    masks = torch.zeros(len(boxes), size, size, dtype=torch.uint8)
    for j, (x0, y0, x1, y1) in enumerate(boxes.round().int().tolist()):
        masks[j, y0:y1, x0:x1] = 1
    target = {"boxes": boxes, "labels": torch.randint(0, LVIS_BASE_CLASSES, (5,), generator=g), "masks": masks}
    if distill:
        embeds = torch.nn.functional.normalize(torch.randn(distill, EMBED_DIM, generator=g), dim=-1)
        target.update(proposal_boxes=random_boxes(distill, size, size, seed=seed + 100), proposal_embeds=embeds,
                      proposal_valid=torch.ones(distill, dtype=torch.bool))
    vocab = model.roi_heads.classifier.text_embeddings[:LVIS_BASE_CLASSES].clone()
    model.set_vocabulary(vocab, None)  # training sees the base categories only
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=4e-5)

    def step():
        model.train()
        total = sum(model(image, [target]).values())
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        return float(total.detach())
    return step


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=320)
    p.add_argument("--proposals", type=int, default=1000)
    p.add_argument("--detections", type=int, default=300)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--train-repeats", type=int, default=3, help="timed training steps of each model (0: none)")
    p.add_argument("--distill", type=int, default=300, help="ViLD's distillation proposals per image")
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
    if a.train_repeats:
        log("training steps, batch 1")
        steps = interleaved({"vild": train_step(vild, a.size, a.distill), "fvlm": train_step(fvlm, a.size, 0)}, dev,
                            a.train_repeats, 1, label="training")
        result["training"] = {
            "vild_seconds_per_step": round(median(steps["vild"]), 3),
            "fvlm_seconds_per_step": round(median(steps["fvlm"]), 3),
            "samples": {k: [round(t, 3) for t in v] for k, v in steps.items()},
            "ratio_vild_over_fvlm": round(median(steps["vild"]) / median(steps["fvlm"]), 3)}
        log(f"training: ViLD {result['training']['vild_seconds_per_step']} s/step, F-VLM "
            f"{result['training']['fvlm_seconds_per_step']} s/step")
    if a.out:
        write_result(a.out, result, dev)
    return result


if __name__ == "__main__":
    main()
