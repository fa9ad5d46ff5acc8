"""Are the boxes shown at the default settings real? Precision and recall of demo models on an unseen world.

For each checkpoint: a world generated with a seed the model never saw; ``Detector`` at the settings
``vild-detect`` uses by default (its score threshold, one label per box, 100 detections), once with the
novel names only and once with all names; precision and recall at IoU 0.5 (same category), per
category, and the boxes per image naming a category absent from that image. Beside it, novel AP50
under the evaluation protocol (per-class NMS, threshold 0, the config's detection count, official
pycocotools) for the model's scoring and for the plain class probability. The defaults with the novel
names only are measured on worlds of two more seeds as well (``--other-seeds``).

    python benchmarks/trust.py   # the shipped demo models, tests/assets/demo_model/model{,_ensemble}.pth
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vild import Detector  # noqa: E402
from vild.api import DISPLAY_CENTERING, DISPLAY_OBJECTNESS_WEIGHT, default_score_thresh  # noqa: E402
from vild.evaluation.matching import match_coco  # noqa: E402
from vild.synthetic.demo_picture import save_novel_picture  # noqa: E402
from vild.synthetic.world import CATEGORY_NAMES, NOVEL_NAMES, generate_world  # noqa: E402


def detect_world(det: Detector, world: dict, names: list[str]) -> list[dict]:
    """COCO-results detections of ``det`` with vocabulary ``names`` on the world's validation images."""
    gt = json.loads(Path(world["coco_val"]).read_text())
    ids = {c["name"]: c["id"] for c in gt["categories"]}
    det.set_vocabulary(names)
    out = []
    for im in gt["images"]:
        r = det(str(Path(world["images_val"]) / im["file_name"]))
        out += [{k: v for k, v in d.items() if k != "segmentation"} for d in r.to_coco_json(im["id"], ids)]
    return out


def protocol_ap50(det: Detector, world: dict, objectness_weight: float, centering: float, abstain: bool) -> dict:
    """Box AP50 on novel / base / all categories through the evaluation's own data path (per-class NMS,
    threshold 0, the config's detection count), scored with the given objectness weight, centering and (for
    ViLD-ensemble with a calibrated null) abstention."""
    from contextlib import nullcontext

    from vild.data import build_dataset, build_test_loader
    from vild.engine.inference import inference_on_dataset
    from vild.evaluation import build_evaluator
    cfg = det.cfg.clone()
    cfg.DATASETS.CUSTOM.merge({"trust_val": {"JSON": world["lvis_val"], "IMAGES": world["images_val"],
                                             "TYPE": "coco", "SPLIT": "lvis"}}, allow_new=True)
    ds = build_dataset(cfg, "trust_val", train=False, masks=False)
    det.reference_vocabulary = False  # every category is named: nothing to hide
    det.set_vocabulary(ds.category_names)
    settings = dataclasses.replace(det.model.roi_heads.test_settings, objectness_weight=objectness_weight,
                                   centering=centering, abstain=abstain)
    m = inference_on_dataset(det.model, build_test_loader(cfg, ds), build_evaluator(ds, None), det.device,
                             nullcontext(), settings)
    return {k: m["bbox"][k] for k in ("AP50_novel", "AP50_base", "AP50_all")}


# the plain settings, for comparison: per-class NMS and the class probability alone (no objectness, centering,
# abstention, hidden training names or confidence), at a fixed 0.3 (0.05 for ViLD-ensemble, whose products are small)
PLAIN = {"per_class_nms": True, "objectness_weight": 0.0, "centering": 0.0, "reference_vocabulary": False,
         "confidence": False, "abstain": False}
PLAIN_THRESH = {"text": 0.3, "vild": 0.3, "ensemble": 0.05}


def shown(det: Detector, world: dict, gt: dict, all_names: bool = True) -> dict:
    """Precision / recall of what ``det`` shows with the novel names only and (``all_names``) with every name."""
    out = {"score_thresh": det.score_thresh}
    vocabularies = (("novel_names", list(NOVEL_NAMES)),) + ((("all_names", list(CATEGORY_NAMES)),) if all_names else ())
    for key, names in vocabularies:
        dets = detect_world(det, world, names)
        out[key] = match_coco(gt, dets, names).summary()
        if key == "all_names":  # the novel objects alone, when every name competes
            out[key]["novel_objects"] = match_coco(gt, dets, list(NOVEL_NAMES)).summary()
    return out


def measure(weights: str, world: dict, other_worlds: dict[int, dict]) -> dict:
    """Every figure for one checkpoint: the defaults, the plain settings, and AP under the protocol; the defaults
    with the novel names only on each of ``other_worlds`` (seed → world) too."""
    gt = json.loads(Path(world["coco_val"]).read_text())
    det = Detector.from_checkpoint(weights, device="cpu", max_dets=100)
    det.score_thresh = det.display_score_thresh
    abstains = bool(det.abstain)  # the display scoring's, before the plain settings below turn it off
    row = {"weights": weights, "variant": det.variant, "abstains": abstains,
           "calibrated": det.display_score_thresh != default_score_thresh(det.variant),
           "defaults": shown(det, world, gt), "defaults_other_worlds": {}}
    for seed, other in other_worlds.items():
        other_gt = json.loads(Path(other["coco_val"]).read_text())
        row["defaults_other_worlds"][str(seed)] = shown(det, other, other_gt, all_names=False)
    for k, v in PLAIN.items():
        setattr(det, k, v)
    det.score_thresh = PLAIN_THRESH[det.variant]
    row["plain"] = shown(det, world, gt)
    row["protocol"] = {"model_scoring": protocol_ap50(det, world, DISPLAY_OBJECTNESS_WEIGHT, DISPLAY_CENTERING,
                                                      abstains),
                       "class_probability_only": protocol_ap50(det, world, 0.0, 0.0, False)}
    return row


def main(argv: list[str] | None = None) -> dict:
    """Parse arguments, measure each checkpoint, write the result file."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", nargs="+", default=["tests/assets/demo_model/model.pth",
                                                    "tests/assets/demo_model/model_ensemble.pth"])
    p.add_argument("--seed", type=int, default=11, help="world seed (the demo trains on seed 0)")
    p.add_argument("--other-seeds", type=int, nargs="*", default=[5, 2026],
                   help="more worlds, measured at the defaults with the novel names only")
    p.add_argument("--num-val", type=int, default=60)
    p.add_argument("--out", default="benchmarks/results/trust_synthetic.json")
    p.add_argument("--picture", default="docs/demo_novel_detections.png",
                   help="the first model's detections of the novel names at the defaults on the unseen world's "
                        "images with the most novel objects ('' = none)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    scratch = Path(tempfile.mkdtemp(prefix="vild_trust_"))
    try:
        world = generate_world(str(scratch / "world"), seed=a.seed, num_train=0, num_val=a.num_val, image_size=128)
        others = {seed: generate_world(str(scratch / f"world_{seed}"), seed=seed, num_train=0, num_val=a.num_val,
                                       image_size=128) for seed in a.other_seeds}
        rows = [measure(w, world, others) for w in a.weights]
        if a.picture:
            save_novel_picture(a.weights[0], world, a.picture)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = {"what": "precision / recall at the CLI's default settings on a world of an unseen seed",
              "world": {"seed": a.seed, "num_val": a.num_val, "other_seeds": a.other_seeds}, "iou": 0.5, "rows": rows,
              "machine": {"platform": platform.platform(), "torch": torch.__version__}}
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=1))
    for r in rows:
        for key in ("plain", "defaults"):
            d = r[key]
            n, al = d["novel_names"], d["all_names"]
            print(f"{r['variant']:9s} {key:8s} thr {d['score_thresh']:.3f}: novel names P {n['precision']:.2f} "
                  f"R {n['recall']:.2f} absent/img {n['absent_per_image']:.2f} | all names P {al['precision']:.2f} "
                  f"R {al['recall']:.2f}")
        for seed, o in r["defaults_other_worlds"].items():
            n = o["novel_names"]
            print(f"{r['variant']:9s} defaults seed {seed}: novel names P {n['precision']:.2f} R {n['recall']:.2f} "
                  f"absent/img {n['absent_per_image']:.2f}")
        print(f"{r['variant']:9s} protocol AP50 novel: scoring {r['protocol']['model_scoring']['AP50_novel']:.1f}, "
              f"class probability only {r['protocol']['class_probability_only']['AP50_novel']:.1f}")
    return result


if __name__ == "__main__":
    main()
