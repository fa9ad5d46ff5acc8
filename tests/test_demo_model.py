"""The demo's trained ViLD, shipped in tests/assets/demo_model, finds novel categories it never saw a box of.

The model was trained by ``make demo`` on base shapes only and exported with
``python tools/demo.py --export tests/assets/demo_model``; these images come from a world with
another seed, so the model has seen none of them.
"""
import json
from pathlib import Path

import pytest
import torch
from torchvision.ops import box_iou

from vild.detect_cli import main as detect_main
from vild.engine.checkpoint import load_checkpoint
from vild.synthetic.world import NOVEL_NAMES, generate_world

pytestmark = pytest.mark.usefixtures("one_thread")

ASSET = Path(__file__).resolve().parent / "assets" / "demo_model"
# measured when the asset was made: 0.875 (42 of 48 novel objects); the same demo run's ViLD-text finds 0.35
MIN_NOVEL_RECALL = 0.7


def _xyxy(b):
    x, y, w, h = b
    return [x, y, x + w, y + h]


def _recall(gt: dict, dets: list[dict], cat_ids: set[int], iou: float = 0.5) -> float:
    found = total = 0
    for im in gt["images"]:
        truth = [a for a in gt["annotations"] if a["image_id"] == im["id"] and a["category_id"] in cat_ids]
        for cid in cat_ids:
            g = [_xyxy(a["bbox"]) for a in truth if a["category_id"] == cid]
            d = [_xyxy(x["bbox"]) for x in dets if x["image_id"] == im["id"] and x["category_id"] == cid]
            total += len(g)
            if g and d:
                found += int((box_iou(torch.tensor(g), torch.tensor(d)).max(dim=1).values >= iou).sum())
    return found / max(1, total)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> dict:
    return generate_world(str(tmp_path_factory.mktemp("held_out")), seed=2026, num_train=0, num_val=40,
                          image_size=128)


def test_detect_py_finds_novel_categories_on_held_out_images(held_out, tmp_path):
    ckpt = load_checkpoint(ASSET / "model.pth")
    trained_on = {s for syns in ckpt["vocabulary"] for s in syns}
    assert trained_on.isdisjoint(NOVEL_NAMES)  # not one novel box in training
    out = tmp_path / "det"
    rc = detect_main(["--weights", str(ASSET / "model.pth"), "--vocab", ",".join(NOVEL_NAMES),
                      "--input", held_out["images_val"], "--output", str(out), "--json",
                      "--coco-gt", held_out["coco_val"], "--device", "cpu"])
    assert rc == 0
    gt = json.loads(Path(held_out["coco_val"]).read_text())
    dets = json.loads((out / "detections.json").read_text())
    novel_ids = {c["id"] for c in gt["categories"] if c["name"] in NOVEL_NAMES}
    recall = _recall(gt, dets, novel_ids)
    assert recall >= MIN_NOVEL_RECALL, f"novel recall {recall:.2f} at IoU 0.5"
    assert len(list(out.glob("*.png"))) == len(gt["images"])  # one annotated picture per input
