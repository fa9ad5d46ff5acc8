"""Throughput of ``vild-detect`` over a folder of photos, and the host's time per image around the model.

    python benchmarks/detect_folder.py                       # 200 JPEGs of 640x480, the shipped demo model
    python benchmarks/detect_folder.py --device cuda --images 400 --batch-size 8

Four runs, interleaved in one process: the model alone (``Detector.predict`` on images already in memory); the
serial loop with the host steps as vild-detect ran them before (``baseline``: PIL decoding, each mask blended
through boolean indexing, labels rendered per detection, RLE of whole masks; the code is kept below); the serial
loop with today's steps (``read_image``, ``DetectionResult.save``, ``to_coco_json``); and the command's pipeline
(``vild.cli.detect``: parts of the folder, I/O threads reading ahead of the model and writing behind it, the
merge into detections.json). The serial loops time the model's calls apart from the rest, so the host's time
per image (reading, drawing, writing, RLE, JSON) is measured directly, as wall and as CPU time. With a model as
fast as a GPU makes the R50 one, the host work decides the rate; the demo model (tiny, fast on a CPU) puts a CPU
in the same position.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TQDM_DISABLE", "1")  # the command's progress bar, once per timed run

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import ROOT, interleaved, log, median, write_result  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402
from pycocotools import mask as mask_utils  # noqa: E402

from vild import Detector  # noqa: E402
from vild.cli.detect import DetectionRun, IdMapper, run_settings  # noqa: E402
from vild.detect_parts import PartStore  # noqa: E402
from vild.io import pil_to_tensor, read_image  # noqa: E402
from vild.synthetic.world import generate_world  # noqa: E402
from vild.visualize import _label_mask, color_for, text_color  # noqa: E402


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


# ---- the host steps as vild-detect ran them before: the baseline ------------------------------------------------
def baseline_read(path: Path) -> torch.Tensor:
    """PIL decoding into a contiguous [3, H, W] tensor."""
    with Image.open(path) as img:
        img.load()
        return pil_to_tensor(img)


def baseline_draw(image: torch.Tensor, boxes, labels, scores, names, masks, mask_alpha: float = 0.45) -> np.ndarray:
    """Each mask blended in its window through boolean indexing, each label measured and rendered anew."""
    canvas = image.permute(1, 2, 0).numpy().astype(np.uint8).copy()
    h, w = canvas.shape[:2]
    order = torch.argsort(scores).tolist() if len(scores) else []
    if masks is not None and len(masks):
        u = masks.view(torch.uint8)
        rows, cols = u.amax(dim=2).numpy(), u.amax(dim=1).numpy()
        m = masks.numpy()
        for i in order:
            ys, xs = np.flatnonzero(rows[i]), np.flatnonzero(cols[i])
            if not len(ys):
                continue
            win = (slice(ys[0], ys[-1] + 1), slice(xs[0], xs[-1] + 1))
            sub, mi = canvas[win], m[i][win]
            c = np.array(color_for(labels[i]), dtype=np.float32)
            sub[mi] = (sub[mi] * (1 - mask_alpha) + c * mask_alpha).astype(np.uint8)
    pil = Image.fromarray(canvas)
    draw = ImageDraw.Draw(pil)
    width = max(1, round(max(h, w) / 400))
    font = ImageFont.load_default(size=max(10, round(max(h, w) / 60)))
    for i in order:
        x0, y0, x1, y1 = [float(v) for v in boxes[i]]
        color = color_for(labels[i])
        draw.rectangle([x0, y0, x1, y1], outline=color, width=width)
        text = f"{names[i]} {float(scores[i]):.2f}"
        l, t, r, b = draw.textbbox((0, 0), text, font=font)
        tw, th = r - l + 4, b - t + 4
        ty = y0 - th if y0 - th >= 0 else min(y0, h - th)
        tx = min(max(x0, 0), max(w - tw, 0))
        draw.rectangle([tx, ty, tx + tw, ty + th], fill=color)
        draw.text((tx + 2 - l, ty + 2 - t), text, fill=text_color(color), font=font)
    return np.asarray(pil)


def baseline_coco(r, image_id: int, category_ids: list[int]) -> list[dict]:
    """RLE of the whole masks (one transposing copy, one pycocotools call); one tensor read per value."""
    m = r.masks.numpy()
    f = np.ascontiguousarray(np.swapaxes(m, 1, 2), dtype=np.uint8).transpose(2, 1, 0)
    rles = [{"size": [int(v) for v in q["size"]], "counts": q["counts"].decode("ascii")} for q in mask_utils.encode(f)]
    out = []
    for i in range(len(r)):
        x0, y0, x1, y1 = (float(v) for v in r.boxes[i])
        out.append({"image_id": image_id, "category_name": r.names[i],
                    "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                    "score": round(float(r.scores[i]), 5), "category_id": int(category_ids[int(r.labels[i])]),
                    "segmentation": rles[i]})
    return out


def baseline_write(r, dst: Path, image_id: int, category_ids: list[int]) -> list[str]:
    Image.fromarray(baseline_draw(r.image, r.boxes, r.labels, r.scores, r.names, r.masks)).save(dst)
    return [json.dumps(d) for d in baseline_coco(r, image_id, category_ids)]


def current_write(r, dst: Path, image_id: int, category_ids: list[int]) -> list[str]:
    r.save(dst)
    return [json.dumps(d) for d in r.to_coco_json(image_id, category_ids)]


def serial(det: Detector, paths: list[Path], out_dir: Path, read, write) -> dict:
    """Each batch read, detected, then drawn, written and encoded, in turn; the model's calls timed apart."""
    dets, model_wall, host_cpu = 0, 0.0, 0.0
    cats = list(range(1, len(det.names) + 1))
    for i in range(0, len(paths), det.batch_size):
        batch = paths[i:i + det.batch_size]
        c = time.thread_time()
        images = [read(p) for p in batch]
        host_cpu += time.thread_time() - c
        t = time.perf_counter()
        results = det.predict(images, [str(p) for p in batch])
        model_wall += time.perf_counter() - t
        c = time.thread_time()
        for k, (p, r) in enumerate(zip(batch, results)):
            dets += len(write(r, out_dir / p.name, i + k + 1, cats))
        host_cpu += time.thread_time() - c
    return {"detections": dets, "model_wall": model_wall, "host_cpu": host_cpu}


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
        load = [round(os.getloadavg()[0], 2)]  # a shared machine's other work slows wall-clock figures
        paths = make_photos(tmp, a.images, width, height)
        det = Detector.from_checkpoint(a.weights, device=a.device, vocabulary=a.vocab, batch_size=a.batch_size,
                                       score_thresh=a.score_thresh)
        images = [read_image(q) for q in paths]
        counter = iter(range(10 ** 6))

        def model_only():
            return {"detections": sum(len(r) for i in range(0, len(images), a.batch_size)
                                      for r in det.predict(images[i:i + a.batch_size]))}

        def run_serial(read, write):
            out = tmp / f"serial_{next(counter)}"
            out.mkdir()
            _label_mask.cache_clear()  # as in a fresh process
            return serial(det, paths, out, read, write)

        def run_pipeline():
            out = tmp / f"pipeline_{next(counter)}"
            out.mkdir()
            _label_mask.cache_clear()
            args = argparse.Namespace(json=True, coco_gt=None)
            run = DetectionRun(det, out, IdMapper(None, det.names), taken=set(paths))
            store = PartStore(out, run_settings(args, det, Path(a.weights), paths, 256), len(paths), 256)
            run.images(paths, store)
            store.wait_for_all()
            with open(out / "detections.json", "w") as f:
                run.merge(store, f)
                run.finish()
            store.remove()
            return {"detections": run.num_detections}

        runs = {"model_only": model_only,
                "serial_baseline": lambda: run_serial(baseline_read, baseline_write),
                "serial": lambda: run_serial(read_image, current_write),
                "pipeline": run_pipeline}
        stats: dict[str, list] = {k: [] for k in runs}
        times = interleaved(runs, dev, repeats=a.repeats, warmup=1, label="detect",
                            on_result=lambda name, r: stats[name].append(r))
        counts = {k: {r["detections"] for r in v} for k, v in stats.items()}
        if len(set().union(*counts.values())) != 1:
            raise RuntimeError(f"the runs found different detections: {counts}")
        n = len(paths)
        rate = {k: n / median(v) for k, v in times.items()}
        # the round least disturbed by the shared machine's other jobs: a best-case rate, beside the median
        best = {k: n / min(v) for k, v in times.items()}

        def host_ms(name: str) -> dict:
            wall = [(t - r["model_wall"]) / n * 1000 for t, r in zip(times[name], stats[name])]
            cpu = [r["host_cpu"] / n * 1000 for r in stats[name]]
            return {"wall": round(median(wall), 2), "wall_best": round(min(wall), 2), "cpu": round(median(cpu), 2),
                    "wall_runs": [round(v, 2) for v in wall], "cpu_runs": [round(v, 2) for v in cpu]}

        host = {"baseline": host_ms("serial_baseline"), "current": host_ms("serial")}
        exposed = (median(times["pipeline"]) - median(times["model_only"])) / n * 1000
        result = {
            "what": "detection over a folder: images/s of the model alone, the serial loops (previous and current "
                    "host steps) and vild-detect's pipeline; the host's ms per image around the model",
            "images": n, "size": [width, height], "batch_size": a.batch_size, "torch_threads": a.threads,
            "score_thresh": a.score_thresh, "weights": Path(a.weights).name,
            "detections_per_image": round(next(iter(counts["pipeline"])) / n, 2),
            "images_per_s": {k: round(v, 2) for k, v in rate.items()},
            "images_per_s_best_round": {k: round(v, 2) for k, v in best.items()},
            "seconds": {k: [round(t, 3) for t in v] for k, v in times.items()},
            "host_ms_per_image": host,
            "ratio_host_baseline_over_current": round(host["baseline"]["wall"] / host["current"]["wall"], 2),
            "pipeline_ms_per_image_beyond_model": round(exposed, 2),
            "ratio_pipeline_over_serial_baseline": round(rate["pipeline"] / rate["serial_baseline"], 3),
            "ratio_pipeline_over_model_only": round(rate["pipeline"] / rate["model_only"], 3),
            "ratio_pipeline_over_model_only_best_rounds": round(best["pipeline"] / best["model_only"], 3),
            "load_average_1m_before_after": load + [round(os.getloadavg()[0], 2)],
        }
        log(f"host ms/image: baseline {host['baseline']['wall']:.1f} (cpu {host['baseline']['cpu']:.1f}), current "
            f"{host['current']['wall']:.1f} (cpu {host['current']['cpu']:.1f}); img/s: model alone "
            f"{rate['model_only']:.1f}, serial baseline {rate['serial_baseline']:.1f}, serial {rate['serial']:.1f}, "
            f"pipeline {rate['pipeline']:.1f} ({result['ratio_pipeline_over_model_only']:.2f}x the model alone)")
        write_result(a.out, result, dev)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
