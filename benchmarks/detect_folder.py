#!/usr/bin/env python
"""Throughput of ``vild-detect`` over a folder of photos, against the same steps run one after another.

    python benchmarks/detect_folder.py                       # 200 JPEGs of 640x480, the shipped demo model
    python benchmarks/detect_folder.py --device cuda --images 400 --batch-size 8

Three rates, measured interleaved in one process: the model alone (``Detector.predict`` on images already in
memory), the serial loop (read a batch, predict, then draw + write + RLE-encode each image), and the command's
pipeline (``vild.detect_cli._Run.images``: I/O threads read ahead and write behind the model). With a model
as fast as a GPU makes the R50 one, reading, drawing and encoding decide the rate; the demo model (tiny, fast
on a CPU) puts a CPU in the same position.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TQDM_DISABLE", "1")  # the command's progress bar, once per timed run

import cv2  # noqa: E402
import torch  # noqa: E402
from common import ROOT, interleaved, log, median, write_result  # noqa: E402

from vild import Detector  # noqa: E402
from vild.detect_cli import _IdMapper, _Run  # noqa: E402
from vild.io import read_image  # noqa: E402
from vild.synthetic.world import generate_world  # noqa: E402


def make_photos(folder: Path, n: int, width: int, height: int, seed: int = 0) -> list[Path]:
    """``n`` JPEGs: the synthetic world's validation images (shapes of every category), scaled up."""
    world = generate_world(str(folder / "world"), seed=seed, num_train=1, num_val=min(n, 100), image_size=128)
    sources = sorted(Path(world["images_val"]).glob("*.png"))
    out = folder / "photos"
    out.mkdir()
    paths = []
    for i in range(n):
        img = cv2.resize(cv2.imread(str(sources[i % len(sources)])), (width, height), interpolation=cv2.INTER_LINEAR)
        paths.append(out / f"{i:05d}.jpg")
        cv2.imwrite(str(paths[-1]), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return paths


def serial(det: Detector, paths: list[Path], out_dir: Path) -> int:
    """The straightforward loop: each batch read, detected, then drawn, written and encoded, in turn."""
    dets = 0
    for i in range(0, len(paths), det.batch_size):
        batch = paths[i:i + det.batch_size]
        results = det.predict([read_image(p) for p in batch], [str(p) for p in batch])
        for k, (p, r) in enumerate(zip(batch, results)):
            r.save(out_dir / p.name)
            dets += len(r.to_coco_json(i + k + 1, list(range(len(det.names)))))
    return dets


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=str(ROOT / "tests" / "assets" / "demo_model" / "model.pth"))
    p.add_argument("--vocab", default="star,heart,ring,arrow,circle,square,triangle")
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--size", default="640x480", help="WIDTHxHEIGHT of the photos")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--score-thresh", type=float, default=0.3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for the model (default 1: on the 2-core CPU the other core is the I/O "
                        "threads', as a GPU leaves the CPU to them; 0 = torch's choice)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "detect_folder_cpu.json"))
    a = p.parse_args(argv)
    width, height = (int(v) for v in a.size.split("x"))
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    tmp = Path(tempfile.mkdtemp(prefix="vild_detect_bench_"))
    try:
        paths = make_photos(tmp, a.images, width, height)
        det = Detector.from_checkpoint(a.weights, device=a.device, vocabulary=a.vocab, batch_size=a.batch_size,
                                       score_thresh=a.score_thresh)
        images = [read_image(q) for q in paths]
        counter = iter(range(10 ** 6))

        def model_only():
            return sum(len(r) for i in range(0, len(images), a.batch_size)
                       for r in det.predict(images[i:i + a.batch_size]))

        def run_serial():
            out = tmp / f"serial_{next(counter)}"
            out.mkdir()
            return serial(det, paths, out)

        def run_pipeline():
            out = tmp / f"pipeline_{next(counter)}"
            out.mkdir()
            run = _Run(det, out, _IdMapper(None, det.names), taken=set(paths))
            run.images(paths)
            return run.num_detections

        counts: dict[str, set] = {}
        times = interleaved({"model_only": model_only, "serial": run_serial, "pipeline": run_pipeline}, dev,
                            repeats=a.repeats, warmup=1,
                            on_result=lambda name, n: counts.setdefault(name, set()).add(n), label="detect")
        if len(counts["serial"] | counts["pipeline"]) != 1:
            raise RuntimeError(f"serial and pipelined runs found different detections: {counts}")
        rate = {k: len(paths) / median(v) for k, v in times.items()}
        result = {
            "what": "images/s of detection over a folder: model alone, serial loop, vild-detect's pipeline",
            "images": len(paths), "size": [width, height], "batch_size": a.batch_size, "torch_threads": a.threads,
            "score_thresh": a.score_thresh, "weights": Path(a.weights).name,
            "detections_per_image": round(next(iter(counts["pipeline"])) / len(paths), 2),
            "images_per_s": {k: round(v, 2) for k, v in rate.items()},
            "seconds": {k: [round(t, 3) for t in v] for k, v in times.items()},
            "ratio_pipeline_over_serial": round(rate["pipeline"] / rate["serial"], 3),
            "ratio_pipeline_over_model_only": round(rate["pipeline"] / rate["model_only"], 3),
        }
        log(f"model alone {rate['model_only']:.1f} img/s, serial {rate['serial']:.1f}, pipeline "
            f"{rate['pipeline']:.1f} ({result['ratio_pipeline_over_serial']:.2f}x serial)")
        write_result(a.out, result, dev)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
