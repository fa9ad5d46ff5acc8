#!/usr/bin/env python
"""Memory of an LVIS-v1-train-sized training set: in the rank's process, and copied into each forked loader worker.

    python benchmarks/loader_memory.py                      # 100k images, 1.27M polygon annotations (~1 GB json)
    python benchmarks/loader_memory.py --images 2000 --annotations 25000 --out /tmp/x.json   # quick

Writes a json of LVIS v1 train's size and shape (random boxes and 40-point polygons; cached under --cache), builds
``DetectionDataset(train=True)`` from it, then forks a child that reads every record as a loader worker does, and
reports the child's private memory growth. Baseline in the same run: the same records held as Python objects (how
the dataset kept them before ``vild/data/records.py``), read by a child forked the same way.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import ROOT, log, write_result  # noqa: E402

from vild.data import DetectionDataset  # noqa: E402
from vild.data.loader import _worker_init  # noqa: E402


def make_json(path: Path, images: int, annotations: int, points: int, seed: int = 0) -> None:
    """An LVIS-format json with LVIS v1's categories count and random boxes with ``points``-point polygons."""
    rng = random.Random(seed)
    # LVIS v1's 405 frequent, 461 common and 337 rare categories; rare ones have few annotations (~0.5 %)
    freq = ["f"] * 405 + ["c"] * 461 + ["r"] * 337
    cats = [{"id": i + 1, "name": f"category_{i}", "synonyms": [f"category_{i}"], "frequency": freq[i],
             "synset": f"category_{i}.n.01", "def": "a thing", "image_count": 1, "instance_count": 1}
            for i in range(1203)]
    imgs = [{"id": i + 1, "width": 640, "height": 480, "license": 1, "date_captured": "2013-11-14 16:28:13",
             "coco_url": f"http://images.cocodataset.org/train2017/{i + 1:012d}.jpg",
             "flickr_url": f"http://farm4.staticflickr.com/{i}.jpg", "not_exhaustive_category_ids": [],
             "neg_category_ids": [rng.randint(1, 1203) for _ in range(3)]} for i in range(images)]
    anns = []
    for j in range(annotations):
        x, y, w, h = rng.uniform(0, 500), rng.uniform(0, 350), rng.uniform(4, 140), rng.uniform(4, 130)
        poly = [round(v, 2) for _ in range(points) for v in (x + rng.uniform(0, w), y + rng.uniform(0, h))]
        u = rng.random()
        cat = rng.randint(1, 405) if u < 0.88 else rng.randint(406, 866) if u < 0.995 else rng.randint(867, 1203)
        anns.append({"id": j + 1, "image_id": rng.randint(1, images), "category_id": cat,
                     "bbox": [round(x, 2), round(y, 2), round(w, 2), round(h, 2)], "area": round(w * h * 0.6, 2),
                     "segmentation": [poly]})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"info": {}, "licenses": [], "images": imgs, "annotations": anns,
                               "categories": cats}))
    os.replace(tmp, path)


def smaps(field: str) -> int:
    """A /proc/self/smaps_rollup field of this process, KiB."""
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/smaps_rollup")


def child_growth_mib(store) -> tuple[float, float]:
    """(private memory gained, seconds) by a forked child reading every record of ``store`` like a loader worker."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            _worker_init(0)
            before, t = smaps("Private_Dirty"), time.perf_counter()
            for i in range(len(store)):
                img, anns = store[i]
                for a in anns:
                    a["bbox"], a["category_id"], a["segmentation"]
            gc.collect()
            os.write(w, json.dumps([(smaps("Private_Dirty") - before) / 1024, time.perf_counter() - t]).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        out = json.loads(f.read())
    os.waitpid(pid, 0)
    return out[0], out[1]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=100_170, help="LVIS v1 train: 100,170 images")
    p.add_argument("--annotations", type=int, default=1_270_141, help="LVIS v1 train: 1,270,141 annotations")
    p.add_argument("--points", type=int, default=40, help="polygon points per annotation")
    p.add_argument("--cache", default="/tmp/vild_bench", help="folder for the generated json")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "loader_memory_lvis_train.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    path = Path(a.cache) / f"lvis_like_{a.images}_{a.annotations}_{a.points}.json"
    if not path.exists():
        log(f"writing {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        make_json(path, a.images, a.annotations, a.points)
    log(f"{path}: {path.stat().st_size / 2 ** 20:.0f} MiB")
    gc.collect()
    rss0, t = smaps("Rss"), time.perf_counter()
    ds = DetectionDataset(path, "/nonexistent", "lvis", "lvis", train=True)
    gc.collect()
    built_s, held_mib = time.perf_counter() - t, (smaps("Rss") - rss0) / 1024
    log(f"dataset: {len(ds)} images in {built_s:.1f} s; RSS +{held_mib:.0f} MiB, "
        f"records {ds._records.nbytes / 2 ** 20:.0f} MiB")
    buf_mib, buf_s = child_growth_mib(ds._records)
    log(f"worker reading every record (RecordList): +{buf_mib:.1f} MiB in {buf_s:.1f} s")
    objects = [ds._records[i] for i in range(len(ds))]  # the records as the dataset held them before
    gc.collect()
    obj_mib, obj_s = child_growth_mib(objects)
    log(f"worker reading every record (Python objects): +{obj_mib:.1f} MiB in {obj_s:.1f} s")
    n_anns = sum(len(r[1]) for r in objects)
    del objects
    gc.collect()
    rss1 = smaps("Rss")
    api = ds.api  # what each rank also held before: the json's official API object
    api_mib = (smaps("Rss") - rss1) / 1024
    log(f"the json's API object, kept by the dataset before: RSS +{api_mib:.0f} MiB")
    del api
    result = {
        "what": "private memory a forked data-loader worker gains by reading every record of a training set once",
        "json": {"images": a.images, "annotations": a.annotations, "polygon_points": a.points,
                 "mib": round(path.stat().st_size / 2 ** 20, 1)},
        "dataset": {"images": len(ds), "annotations": n_anns, "build_seconds": round(built_s, 1),
                    "process_rss_increase_mib": round(held_mib, 1),
                    "records_mib": round(ds._records.nbytes / 2 ** 20, 1),
                    "api_object_rss_mib_no_longer_held": round(api_mib, 1)},
        "worker_growth_mib": {"record_list": round(buf_mib, 1), "python_objects_baseline": round(obj_mib, 1)},
        "worker_pass_seconds": {"record_list": round(buf_s, 1), "python_objects_baseline": round(obj_s, 1)},
    }
    write_result(a.out, result, torch.device("cpu"))


if __name__ == "__main__":
    main()
