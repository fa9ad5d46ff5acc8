#!/usr/bin/env python
"""What ``TEACHER.TEMPLATES simple`` trades for speed: the cold text embedding's rate, and a model's accuracy.

    python benchmarks/vocab_templates.py

1. Speed: CLIP ViT-B/32's text tower (open_clip's architecture with random weights: the time does not depend on
   them) embeds ``--names`` LVIS names cold with the ``vild`` set (63 templates) and with ``simple`` (1), on one
   torch thread and on every usable core, interleaved. Prompts/s scale to LVIS's 1203 names.
2. Accuracy: the shipped demo model (trained with ``vild``) embeds its vocabulary with each set and is evaluated
   on the synthetic world's validation images (box AP50 by pycocotools, all 14 shapes, base and novel).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from common import ROOT, log, median, write_result  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from vild import Detector  # noqa: E402
from vild.synthetic.world import generate_world  # noqa: E402
from vild.teacher import CLIPTeacher, get_templates  # noqa: E402

LVIS_NAMES = ROOT / "vild" / "data" / "lvis_v1_names.txt"


def embedding_rates(names: list[str], k: int, repeats: int, scratch: Path, clip_model: str = "ViT-B-32") -> dict:
    """Prompts/s of cold text embeddings per template set and thread count (``clip_model``'s text tower): ``k``
    names with vild's 63 templates, and as many prompts with simple's one (63 k names)."""
    teacher = CLIPTeacher(clip_model, "", device="cpu", cache_dir=str(scratch))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    times: dict[str, list[float]] = {}
    prompts = {}
    for _ in range(repeats):
        for templates in ("vild", "simple"):
            teacher.templates = get_templates(templates)
            subset = names[:k * 63 // len(teacher.templates)]
            prompts[templates] = len(subset) * len(teacher.templates)
            for threads in sorted({1, cores}):
                torch.set_num_threads(threads)
                t = time.perf_counter()
                teacher._encode_vocab([[n] for n in subset])  # the cold path, without the cache
                times.setdefault(f"{templates}_threads{threads}", []).append(time.perf_counter() - t)
    out = {}
    for key, ts in times.items():
        templates = key.split("_")[0]
        rate = prompts[templates] / median(ts)
        lvis = 1203 * len(get_templates(templates))
        out[key] = {"prompts": prompts[templates], "prompts_per_s": round(rate, 1),
                    "seconds": [round(t, 3) for t in ts], "lvis_1203_names_s": round(lvis / rate, 1)}
        log(f"  {key}: {rate:.1f} prompts/s, 1203 names in ~{lvis / rate:.0f} s")
    return {"usable_cores": cores, "rates": out}


def demo_accuracy(weights: Path, num_val: int, scratch: Path) -> dict:
    """Box AP50 (all, base, novel) of the demo model on the synthetic world with each template set."""
    world = generate_world(str(scratch / "world"), seed=1, num_train=1, num_val=num_val, image_size=128)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(world["coco_val"])
    cats = sorted(gt.cats.values(), key=lambda c: c["id"])
    names = [c["name"] for c in cats]
    torch.set_num_threads(1)
    det = Detector.from_checkpoint(weights, device="cpu", vocabulary=names, cache_dir=scratch / "cache")
    base = [c["id"] for c, b in zip(cats, det.base_mask) if b]
    novel = [c["id"] for c, b in zip(cats, det.base_mask) if not b]
    images = [(im["id"], Path(world["images_val"]) / im["file_name"]) for im in gt.dataset["images"]]
    out = {"model_templates": det.cfg.TEACHER.TEMPLATES, "images": len(images), "base": len(base),
           "novel": len(novel)}
    for templates in ("vild", "simple"):
        det.teacher.templates = get_templates(templates)
        det._emb_cache.clear()  # the detector's in-memory copy; the teacher's disk cache keys on the templates
        det.set_vocabulary(names)
        results = []
        for image_id, path in images:
            results += det(path).to_coco_json(image_id, [c["id"] for c in cats])
        ap = {}
        for group, ids in (("all", [c["id"] for c in cats]), ("base", base), ("novel", novel)):
            with contextlib.redirect_stdout(io.StringIO()):
                ev = COCOeval(gt, gt.loadRes(results), "bbox")
                ev.params.catIds = ids
                ev.evaluate()
                ev.accumulate()
                ev.summarize()
            ap[group] = round(float(ev.stats[1]) * 100, 2)
        out[templates] = {"box_ap50": ap}
        log(f"  demo model, {templates} templates: box AP50 {ap}")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--names", type=int, default=8,
                   help="LVIS names embedded cold with vild's templates per timing (63x as many with simple)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--clip-model", default="ViT-B-32", help="open_clip architecture timed (random weights)")
    p.add_argument("--val-images", type=int, default=100)
    p.add_argument("--weights", default=str(ROOT / "tests" / "assets" / "demo_model" / "model.pth"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vocab_templates_cpu.json"))
    a = p.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="vild_vocab_bench_"))
    try:
        load = [round(os.getloadavg()[0], 2)]
        names = [n.replace("_", " ") for n in LVIS_NAMES.read_text().splitlines()]
        log(f"cold text embeddings, {a.clip_model} text tower")
        speed = embedding_rates(names, a.names, a.repeats, scratch / "cache_speed", a.clip_model)
        log("demo model accuracy per template set")
        accuracy = demo_accuracy(Path(a.weights), a.val_images, scratch)
        load.append(round(os.getloadavg()[0], 2))
        result = {"what": "TEACHER.TEMPLATES vild (63 prompts per name) vs simple (1): cold text-embedding rate "
                          "and the demo model's box AP50 with each",
                  "clip_model": a.clip_model, "speed": speed, "accuracy": accuracy, "load_average_1m_before_after": load}
        write_result(a.out, result, torch.device("cpu"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
