#!/usr/bin/env python
"""How well a tiny teacher's dense last map classifies regions (F-VLM's premise), on the synthetic world.

    python benchmarks/fvlm_probe.py                 # after fvlm_demo.py (reuses its world and teacher): ~15 min
    python benchmarks/fvlm_probe.py --no-64         # the demo's 32 px teacher only: ~2 min
    python benchmarks/fvlm_probe.py --no-64 --teacher-steps 3000 --out-dir output/demo_3000 \
        --out benchmarks/results/fvlm_dense_probe_teacher3000.json   # the teacher of vild-demo --teacher-steps 3000

Top-1 accuracy (over all 14 shapes) of the validation objects' boxes, classified against the category names by:
- ``crops``: the teacher on each box cropped at 1x and 1.5x (ViLD's distillation targets, ``embed_regions``);
- ``dense``: F-VLM's VLM scorer, i.e. RoIAlign of the box on the teacher trunk's last map of the whole image,
  then the teacher's attention pool, with the image resized to each ``--sizes`` (longest side);
- ``placed``: the dense path on the image rescaled so the object has the size it has in the teacher's crops
  (25/32 of the input side) and shifted so that its centre sits ``offset`` pixels from the centre of a
  stride-32 cell of the last map (16: a cell border). In the teacher's own crops the object's centre sits at
  a cell centre for the 32 px teacher (offset 0) and at a cell corner for the 64 px one (offset 16).
Teachers: the demo's ``vild-tiny-clip`` (32 px input, 1x1 attention grid) and ``vild-tiny-clip-64`` (64 px input,
2x2 grid), pretrained the same way on 64 px crops (seed 0, 1000 steps of 128; cached under --out-dir).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import ROOT, log, write_result  # noqa: E402

OFFSETS = (0, 8, 16)


def teacher_64(out: Path, world: dict) -> tuple[Path, dict]:
    """The 64 px tiny teacher, pretrained as the demo's (cached)."""
    from vild.synthetic.clip_pretrain import pretrain_teacher, region_zero_shot_accuracy
    path, metrics = out / "teacher64" / "vild-tiny-clip-64.pt", out / "teacher64" / "metrics.json"
    if path.is_file() and metrics.is_file():
        return path, json.loads(metrics.read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    log("pretraining vild-tiny-clip-64 (1000 steps of 128 captioned 64 px crops)")
    train = pretrain_teacher(str(path), seed=0, steps=1000, batch_size=128, threads=1,
                             model_name="vild-tiny-clip-64", crop_size=64)
    zs = region_zero_shot_accuracy(str(path), world, model_name="vild-tiny-clip-64", cache_dir=str(out / "cache"))
    m = {"train": train, "zero_shot_val_boxes": zs}
    metrics.write_text(json.dumps(m, indent=1))
    return path, m


def accuracy(emb: torch.Tensor, text: torch.Tensor, labels: torch.Tensor, novel: torch.Tensor) -> dict:
    """Top-1 accuracy in % over all, base and novel objects."""
    ok = ((emb @ text.t()).argmax(1) == labels).float()
    return {"all": round(100 * float(ok.mean()), 1), "base": round(100 * float(ok[~novel].mean()), 1),
            "novel": round(100 * float(ok[novel].mean()), 1)}


@torch.no_grad()
def probe(model_name: str, weights: Path, world: dict, sizes: list[int], max_images: int, cache: Path) -> dict:
    """Crop, dense and placed accuracies of one teacher."""
    from vild.config import load_config
    from vild.modeling import build_model
    from vild.modeling.fvlm import CLIP_FEATURES
    from vild.synthetic.clip_pretrain import _load_world_boxes
    from vild.synthetic.shapes import CATEGORIES, NOVEL_NAMES
    from vild.teacher import CLIPTeacher
    names = [list(c.synonyms) for c in CATEGORIES]
    display = [n[0] for n in names]
    teacher = CLIPTeacher(model_name, str(weights), templates="vild", cache_dir=str(cache))
    text = teacher.encode_text(names)
    images, boxes, labels = _load_world_boxes(world, "val", display, max_images)
    novel = torch.tensor([display[int(i)] in NOVEL_NAMES for i in labels])
    out = {"teacher": model_name, "objects": len(labels),
           "crops": accuracy(torch.cat(teacher.embed_regions(images, boxes)), text, labels, novel), "dense": {}}

    def model_at(size: int):
        cfg = load_config("synthetic/fvlm_demo.yaml", ["TEACHER.MODEL", model_name, "TEACHER.PRETRAINED", str(weights),
                                                        "INPUT.TEST_SIZE", str(size)])
        return build_model(cfg, teacher=teacher).eval()

    def dense(model, image: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        batch, _ = model.preprocessor([image])
        last = model.extract_features(batch.tensors)[1][CLIP_FEATURES]
        h, w = batch.image_sizes[0]
        scale = torch.tensor([w / image.shape[-1], h / image.shape[-2]] * 2)
        return model.roi_heads.vlm(last, [b * scale])

    for size in sizes:
        model = model_at(size)
        emb = torch.cat([dense(model, im, b) for im, b in zip(images, boxes)])
        out["dense"][str(size)] = accuracy(emb, text, labels, novel)
        log(f"{model_name} dense at {size} px: {out['dense'][str(size)]}")
    model = model_at(0)  # the placed images enter at their own size
    side = teacher.image_size[0] * 25 / 32
    mean = model.preprocessor.pixel_mean.view(3, 1, 1)
    out["placed"] = {}
    for offset in OFFSETS:
        embs = []
        for im, bs in zip(images, boxes):
            for b in bs:
                f = side / float(max(b[2] - b[0], b[3] - b[1]))
                h, w = round(im.shape[1] * f), round(im.shape[2] * f)
                x = F.interpolate(im[None].float(), size=(h, w), mode="bilinear", antialias=f < 1)[0]
                centre = (b[:2] + b[2:]) / 2 * f
                sx, sy = (int(round(16 + offset - float(c) % 32)) % 32 for c in centre)
                canvas = mean.expand(3, h + 64, w + 64).clone()  # padding that normalises to zero
                canvas[:, sy:sy + h, sx:sx + w] = x
                embs.append(dense(model, canvas, (b * f + torch.tensor([sx, sy, sx, sy]))[None]))
        out["placed"][str(offset)] = accuracy(torch.cat(embs), text, labels, novel)
        log(f"{model_name} placed, centre {offset} px off a cell centre: {out['placed'][str(offset)]}")
    return out


def main(argv=None) -> dict:
    from vild.synthetic.demo import DemoSettings, make_teacher, make_world
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=str(ROOT / "output" / "fvlm_demo"), help="fvlm_demo.py's stage folder")
    p.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[64, 128, 192, 256])
    p.add_argument("--max-images", type=int, default=80, help="validation images probed")
    p.add_argument("--no-64", action="store_true", help="skip the 64 px teacher (and its pretraining)")
    p.add_argument("--teacher-steps", type=int, default=0,
                   help="probe the 32 px teacher pretrained this many steps in --out-dir (vild-demo --train-teacher "
                        "--teacher-steps N; cached there) instead of the shipped one")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fvlm_dense_probe.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    out, s = Path(a.out_dir), DemoSettings()
    if a.teacher_steps:
        s.train_teacher, s.teacher_steps = True, a.teacher_steps
    world = make_world(out, s)
    t32, m32 = make_teacher(out, s, world)
    teachers = [("vild-tiny-clip", t32, m32)]
    if not a.no_64:
        teachers.append(("vild-tiny-clip-64", *teacher_64(out, world)))
    rows = []
    for name, path, metrics in teachers:
        rows.append({**probe(name, path, world, a.sizes, a.max_images, out / "cache"),
                     "zero_shot_val_boxes_all": metrics["zero_shot_val_boxes"]})
    result = {"what": "top-1 accuracy (%) of synthetic-world validation boxes: teacher crops vs F-VLM's dense "
                      "RoIAlign + attention pool on the teacher's last map", "args": vars(a), "rows": rows}
    if a.out:
        write_result(a.out, result, torch.device("cpu"))
    return result


if __name__ == "__main__":
    main()
