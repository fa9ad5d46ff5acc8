#!/usr/bin/env python
"""Box AP on large, noisy photos: the model shrinking them with a filter (as training's resizes do) or without.

    python benchmarks/photo_resize.py                 # the demo world's 150 val images at 5x, noise 0 / 20 / 40

The shipped demo model (trained at 128 px) detects all 14 categories on the demo world's held-out validation
images scaled up 5x (640 px, bicubic) with Gaussian pixel noise added at that resolution, as a camera's
sensor adds it. The model shrinks each image back to its 128-px test size: with ``antialias=True`` (the
filter training's resizes use), or with plain bilinear (two by two pixels per output pixel), the baseline.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import ROOT, log, write_result  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

import vild.modeling.preprocess as preprocess  # noqa: E402
from vild import Detector  # noqa: E402
from vild.synthetic.demo import DemoSettings  # noqa: E402
from vild.synthetic.world import generate_world  # noqa: E402


def box_ap(gt: dict, results: list[dict]) -> tuple[float, float]:
    """(AP, AP50) in percent by pycocotools."""
    with contextlib.redirect_stdout(io.StringIO()):
        api = COCO()
        api.dataset = gt
        api.createIndex()
        E = COCOeval(api, api.loadRes(results), "bbox") if results else None
        if E is None:
            return 0.0, 0.0
        E.evaluate(), E.accumulate(), E.summarize()
    return round(100 * E.stats[0], 2), round(100 * E.stats[1], 2)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=int, default=5)
    p.add_argument("--noise", type=lambda s: [float(v) for v in s.split(",")], default=[0.0, 20.0, 40.0])
    p.add_argument("--images", type=int, default=150, help="of the demo world's 150 validation images")
    p.add_argument("--weights", default=str(ROOT / "tests" / "assets" / "demo_model" / "model.pth"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "photo_resize_cpu.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    s = DemoSettings()
    with tempfile.TemporaryDirectory(prefix="vild_photo_") as tmp:
        # the demo's own world (same seed and sizes): the shipped model trained on its train split only
        world = generate_world(tmp, seed=s.seed, num_train=s.num_train, num_val=s.num_val, image_size=s.image_size)
        gt = json.loads(Path(world["coco_val"]).read_text())
        gt["images"] = gt["images"][:a.images]
        keep = {im["id"] for im in gt["images"]}
        gt["annotations"] = [x for x in gt["annotations"] if x["image_id"] in keep]
        sources = [cv2.imread(str(Path(world["images_val"]) / im["file_name"]))[..., ::-1] for im in gt["images"]]
    k = a.scale
    big_gt = {"images": [{**im, "height": im["height"] * k, "width": im["width"] * k} for im in gt["images"]],
              "annotations": [{**x, "bbox": [v * k for v in x["bbox"]], "area": x["area"] * k * k}
                              for x in gt["annotations"]], "categories": gt["categories"]}
    det = Detector.from_checkpoint(a.weights, vocabulary=[[c["name"]] for c in gt["categories"]],
                                   score_thresh=0.0, max_dets=100)
    cat_ids = [c["id"] for c in gt["categories"]]
    plain_module = types.SimpleNamespace(interpolate=lambda *x, **kw: F.interpolate(*x, **{**kw, "antialias": False}))

    def run(noise: float, filtered: bool) -> tuple[float, float]:
        preprocess.F = F if filtered else plain_module  # the baseline: the same code with the filter off
        try:
            results = []
            for im, src in zip(gt["images"], sources):
                img = cv2.resize(src.astype(np.float32), None, fx=k, fy=k, interpolation=cv2.INTER_CUBIC)
                img += np.random.default_rng(im["id"]).normal(0.0, noise, img.shape)
                x = torch.from_numpy(img.clip(0, 255).astype(np.uint8)).permute(2, 0, 1)
                results += det(x).to_coco_json(im["id"], cat_ids)
            return box_ap(big_gt, results)
        finally:
            preprocess.F = F

    rows = []
    for noise in a.noise:
        (ap_f, ap50_f), (ap_p, ap50_p) = run(noise, True), run(noise, False)
        rows.append({"noise_std": noise, "filtered": {"AP": ap_f, "AP50": ap50_f},
                     "plain_bilinear": {"AP": ap_p, "AP50": ap50_p}})
        log(f"noise {noise:g}: box AP {ap_f:.1f} filtered vs {ap_p:.1f} plain bilinear "
            f"(AP50 {ap50_f:.1f} vs {ap50_p:.1f})")
    result = {"what": "box AP of the demo model on its world's held-out val images scaled up, with pixel noise, "
                      "shrunk to the 128-px test size with and without antialiasing",
              "images": len(gt["images"]), "scale": k, "rows": rows}
    write_result(a.out, result, torch.device("cpu"))


if __name__ == "__main__":
    main()
