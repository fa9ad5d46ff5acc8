#!/usr/bin/env python
"""Images/s of the exported detector on onnxruntime against the same model in PyTorch, on the CPU, in one run.

    python benchmarks/onnx_speed.py                     # -> benchmarks/results/onnx_cpu.json (a few minutes on 2 cores)
    python benchmarks/onnx_speed.py --threads 1 --repeats 5

Two models: the shipped demo model (tests/assets/demo_model, 128 px) on held-out synthetic images with its
training vocabulary, and ViLD R50-FPN (configs/vild_r50.yaml, random weights: speed does not depend on them)
at 320 px with 1203 random text embeddings, 1000 proposals and 300 detections per image. Each side runs the
whole call a user makes: ``Detector.predict`` against ``OnnxDetector.predict`` for the demo model, and for
R50 ``ViLD(images)`` against ``OnnxModel(images)`` (resize and mask pasting included on both sides). Same
thread count for torch and onnxruntime; timings interleaved after a warm-up, medians of the repeats.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import (LVIS_CLASSES, ROOT, build_vild, interleaved, log, median, random_images,  # noqa: E402
                    random_text_embeddings, vild_config, write_result)

ASSET = ROOT / "tests" / "assets" / "demo_model" / "model.pth"


def _rates(times: dict[str, list[float]], n_images: int) -> dict:
    torch_s, onnx_s = median(times["torch"]), median(times["onnxruntime"])
    return {"images_per_s": {"torch": n_images / torch_s, "onnxruntime": n_images / onnx_s},
            "seconds": times, "ratio_onnx_over_torch": torch_s / onnx_s, "target": 1.0,
            "target_met": torch_s / onnx_s >= 1.0, "load_avg_after": os.getloadavg()[0]}


def demo_figure(work: Path, args) -> dict:
    """The shipped demo model: Detector vs OnnxDetector on held-out images, batch 4."""
    from vild import Detector
    from vild.deploy import OnnxDetector, export_checkpoint
    from vild.io import read_image
    from vild.synthetic.world import generate_world

    world = generate_world(str(work / "world"), seed=2028, num_train=0, num_val=args.demo_images, image_size=128)
    images = [read_image(p) for p in sorted(Path(world["images_val"]).glob("*.png"))]
    model_path, _ = export_checkpoint(ASSET, work / "demo.onnx")
    ref = Detector.from_checkpoint(ASSET, device="cpu", batch_size=4)
    det = OnnxDetector(model_path, threads=args.threads, batch_size=4)
    load = os.getloadavg()[0]
    times = interleaved({"torch": lambda: ref.predict(images), "onnxruntime": lambda: det.predict(images)},
                        torch.device("cpu"), args.demo_repeats, args.warmup, label="demo")
    # parity at the threshold users see: far below it the saturated class probabilities tie, and which tied box
    # survives NMS depends on the order candidates come in, which the two runtimes do not share
    shown = ref.display_score_thresh
    a, b = ref.predict(images[:4], score_thresh=shown), det.predict(images[:4], score_thresh=shown)
    same = all(len(x) == len(y) and torch.equal(x.labels, y.labels) and
               (not len(x) or (x.boxes - y.boxes).abs().max() <= 1.0) for x, y in zip(a, b))
    return {"model": "tests/assets/demo_model (tiny CNN-FPN, 128 px)", "images": len(images), "batch_size": 4,
            "categories": len(ref.names), "score_thresh": ref.score_thresh, "max_dets": ref.max_dets,
            "same_detections_at_display_threshold_on_4_images": same, "load_avg_before": load,
            **_rates(times, len(images))}


def r50_figure(work: Path, args) -> dict:
    """ViLD R50-FPN, random weights, 1203 categories: ViLD(images) vs OnnxModel(images), batch 1."""
    from vild.deploy import export_detector
    from vild.deploy.runner import OnnxModel
    from vild.deploy.text import open_graph, graph_metadata

    model = build_vild(args.size, torch.device("cpu"), num_classes=LVIS_CLASSES)
    cfg = vild_config(args.size)
    path = export_detector(model, work / "r50.onnx", cfg)
    log(f"exported R50 ({path.stat().st_size / 2 ** 20:.0f} MiB)")
    runtime = open_graph(path, threads=args.threads)
    onnx_model = OnnxModel(runtime, graph_metadata(runtime, path, "vild-detector-onnx-1"))
    emb = random_text_embeddings(LVIS_CLASSES, model.embed_dim)
    onnx_model.set_vocabulary(emb)
    model.set_vocabulary(emb)
    images = random_images(args.r50_images, args.size, torch.device("cpu"))

    def run_torch():
        with torch.no_grad():
            return [model([im]) for im in images]

    def run_onnx():
        return [onnx_model([im]) for im in images]

    load = os.getloadavg()[0]
    times = interleaved({"torch": run_torch, "onnxruntime": run_onnx}, torch.device("cpu"), args.repeats,
                        args.warmup, label="r50")
    a, b = run_torch(), run_onnx()
    dets = {"torch": [len(o[0]["scores"]) for o in a], "onnxruntime": [len(o[0]["scores"]) for o in b]}
    return {"model": "configs/vild_r50.yaml, random init", "size": args.size, "images": len(images), "batch_size": 1,
            "categories": LVIS_CLASSES, "proposals": cfg.MODEL.RPN.POST_NMS_TOPK_TEST,
            "max_dets": cfg.MODEL.ROI_HEADS.DETECTIONS_PER_IMAGE, "score_thresh": cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST,
            "detections_per_image": dets, "load_avg_before": load, **_rates(times, len(images))}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "onnx_cpu.json"))
    p.add_argument("--threads", type=int, default=2, help="torch threads = onnxruntime intra-op threads")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each backend on R50")
    p.add_argument("--demo-repeats", type=int, default=9, help="timed runs of each backend on the demo model")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--size", type=int, default=320, help="R50 test size")
    p.add_argument("--demo-images", type=int, default=16)
    p.add_argument("--r50-images", type=int, default=1)
    p.add_argument("--only", default="demo,r50", help="comma-separated: demo, r50")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import onnxruntime

    work = Path(tempfile.mkdtemp(prefix="vild_onnx_bench_"))
    try:
        figures = {}
        if "demo" in args.only:
            figures["demo"] = demo_figure(work, args)
        if "r50" in args.only:
            figures["r50_fpn_320_lvis"] = r50_figure(work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for name, f in figures.items():
        log(f"{name}: torch {f['images_per_s']['torch']:.2f} img/s, onnxruntime {f['images_per_s']['onnxruntime']:.2f} "
            f"img/s, ratio {f['ratio_onnx_over_torch']:.2f}")
    write_result(args.out, {"what": "onnxruntime vs PyTorch, CPU, end-to-end detector calls", "threads": args.threads,
                            "repeats": args.repeats, "demo_repeats": args.demo_repeats, "warmup": args.warmup,
                            "onnxruntime": onnxruntime.__version__,
                            "figures": figures}, torch.device("cpu"))


if __name__ == "__main__":
    main()
