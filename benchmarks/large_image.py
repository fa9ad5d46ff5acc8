#!/usr/bin/env python
"""Full-resolution masks on a large photo: time and peak memory of ViLD's paste against torchvision's.

    python benchmarks/large_image.py                  # 6000x4000 (24 MP), 100 detections, CPU
    python benchmarks/large_image.py --size 4000x3000 --detections 300

The shipped demo model detects on a 24-megapixel photo (the synthetic world's shapes, scaled up) at score
threshold 0; its boxes and 28x28 mask probabilities are then pasted into the photo by ViLD's
``paste_masks`` and by torchvision's ``paste_masks_in_image`` (what its Mask R-CNN does), each in a fresh
process, so that the peak resident memory of each is its own.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, RssSampler, log, write_result  # noqa: E402


def worker(kind: str, inputs: str) -> dict:
    """Paste the saved detections with ``kind``'s code; seconds and this process's peak memory growth."""
    import torch
    torch.set_num_threads(1)
    d = torch.load(inputs, weights_only=True)
    probs, boxes, (h, w) = d["mask_probs"], d["boxes"], d["size"]
    # sampled: ru_maxrss would start from the parent's high-water mark, which a child inherits at fork
    sampler = RssSampler(interval=0.002)
    t = time.perf_counter()
    if kind == "vild":
        from vild.modeling.postprocess import paste_masks
        masks = paste_masks(probs, boxes, h, w)
    else:
        from torchvision.models.detection.roi_heads import paste_masks_in_image
        masks = paste_masks_in_image(probs[:, None], boxes, (h, w))[:, 0] >= 0.5
    seconds = time.perf_counter() - t
    rss = sampler.stop()
    peak = (rss["max_kib"] - rss["start_kib"]) / 1024
    return {"seconds": round(seconds, 2), "peak_rss_increase_mib": round(peak, 1),
            "output_mib": round(masks.numel() * masks.element_size() / 2 ** 20, 1),
            "mask_pixels": int(masks.sum())}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="6000x4000", help="WIDTHxHEIGHT")
    p.add_argument("--detections", type=int, default=100)
    p.add_argument("--weights", default=str(ROOT / "tests" / "assets" / "demo_model" / "model.pth"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "large_image_cpu.json"))
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--inputs", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.worker, a.inputs)))
        return
    import cv2
    import torch

    from vild import Detector
    from vild.synthetic.world import generate_world
    torch.set_num_threads(1)
    width, height = (int(v) for v in a.size.split("x"))
    with tempfile.TemporaryDirectory(prefix="vild_large_") as tmp:
        world = generate_world(tmp, seed=0, num_train=1, num_val=1, image_size=128)
        src = cv2.imread(str(next(Path(world["images_val"]).glob("*.png"))))
        image = torch.from_numpy(cv2.resize(src, (width, height))[..., ::-1].copy()).permute(2, 0, 1)
        det = Detector.from_checkpoint(a.weights, score_thresh=0.0, max_dets=a.detections,
                                       vocabulary="star,heart,ring,arrow,circle,square,triangle")
        model = det.model
        model.roi_heads.score_thresh, model.roi_heads.detections_per_img = 0.0, a.detections
        with torch.no_grad():
            out = model([image], paste_masks=False)[0]  # boxes in the photo's pixels, masks as 28x28 probabilities
        inputs = Path(tmp) / "detections.pt"
        torch.save({"mask_probs": out["mask_probs"], "boxes": out["boxes"], "size": (height, width)}, inputs)
        runs = {}
        for kind in ("vild", "torchvision"):
            proc = subprocess.run([sys.executable, __file__, "--worker", kind, "--inputs", str(inputs)],
                                  capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if proc.returncode != 0:
                raise RuntimeError(f"{kind} worker failed:\n{proc.stderr[-3000:]}")
            runs[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
            log(f"{kind}: {runs[kind]}")
    agree = min(runs["vild"]["mask_pixels"], runs["torchvision"]["mask_pixels"]) / \
        max(1, max(runs["vild"]["mask_pixels"], runs["torchvision"]["mask_pixels"]))
    result = {
        "what": "pasting a photo's detections as full-resolution bool masks; each in a fresh process",
        "size": [width, height], "detections": len(out["boxes"]), **runs,
        "ratio_seconds_vild_over_torchvision": round(runs["vild"]["seconds"] / runs["torchvision"]["seconds"], 3),
        "ratio_peak_vild_over_torchvision": round(runs["vild"]["peak_rss_increase_mib"]
                                                  / runs["torchvision"]["peak_rss_increase_mib"], 3),
        "mask_pixel_count_agreement": round(agree, 4),
    }
    write_result(a.out, result, torch.device("cpu"))


if __name__ == "__main__":
    main()
