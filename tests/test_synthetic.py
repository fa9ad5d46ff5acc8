"""The synthetic world: determinism, mask/box consistency, occlusion, COCO and LVIS loading."""
import filecmp
import json
import os
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from lvis import LVIS, LVISEval, LVISResults
from pycocotools.coco import COCO

from vild.synthetic.shapes import CATEGORY_NAMES, NOVEL_NAMES
from vild.synthetic.world import generate_world, mask_to_polygons, render_scene

_FILES = ["coco_train.json", "coco_val.json", "lvis_train.json", "lvis_val.json",
          "world_info.json", "images/train/000001.png", "images/train/000012.png",
          "images/val/000005.png"]


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    root = tmp_path_factory.mktemp("worlds")
    return {name: generate_world(str(root / name), seed=seed, num_train=12, num_val=8)
            for name, seed in (("a", 0), ("b", 0), ("c", 1))}


def test_same_seed_byte_identical_other_seed_differs(worlds):
    a, b, c = (worlds[k]["out_dir"] for k in "abc")
    for f in _FILES:
        assert filecmp.cmp(os.path.join(a, f), os.path.join(b, f), shallow=False), f
    assert not filecmp.cmp(os.path.join(a, "lvis_train.json"), os.path.join(c, "lvis_train.json"),
                           shallow=False)
    assert not filecmp.cmp(os.path.join(a, "images/train/000001.png"),
                           os.path.join(c, "images/train/000001.png"), shallow=False)


def test_split_and_frequencies(worlds):
    w = worlds["a"]
    assert len(CATEGORY_NAMES) >= 12 and set(w["novel_names"]) == set(NOVEL_NAMES)
    assert set(w["base_names"]) | set(w["novel_names"]) == set(CATEGORY_NAMES)
    freq = {c["name"]: c["frequency"] for c in json.loads(Path(w["lvis_train"]).read_text())["categories"]}
    assert {n for n, f in freq.items() if f == "r"} == set(NOVEL_NAMES)
    assert {freq[n] for n in w["base_names"]} == {"c", "f"}


def test_boxes_are_mask_extents_and_polygons_exact(worlds):
    w = worlds["a"]
    coco, lv = COCO(w["coco_train"]), LVIS(w["lvis_train"])
    assert coco.getAnnIds() and sorted(coco.getAnnIds()) == sorted(lv.get_ann_ids())
    novel_ids = {c["id"] for c in lv.dataset["categories"] if c["frequency"] == "r"}
    assert any(a["category_id"] in novel_ids for a in lv.dataset["annotations"])
    for ann_id in coco.getAnnIds():
        a = coco.anns[ann_id]
        m = coco.annToMask(a)
        ys, xs = np.nonzero(m)
        assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert a["area"] == m.sum() and a["iscrowd"] == 0
        assert np.array_equal(lv.ann_to_mask(lv.anns[ann_id]), m)  # polygons rasterise exactly


def test_polygon_with_hole_round_trips():
    m = np.zeros((40, 40), np.uint8)
    m[5:30, 5:30] = 1
    m[12:20, 12:22] = 0
    m[33:36, 2:8] = 1
    rle = mask_utils.merge(mask_utils.frPyObjects(mask_to_polygons(m), 40, 40))
    assert np.array_equal(mask_utils.decode(rle), m)


def test_occlusion_masks_disjoint_and_mostly_visible():
    for k in range(20):
        img, insts = render_scene(np.random.default_rng([7, k]), 96, min_objects=6, max_objects=8)
        assert img.shape == (96, 96, 3) and img.dtype == np.uint8
        if len(insts) > 1:
            total = np.stack([i.mask for i in insts]).astype(int).sum(0)
            assert total.max() == 1  # a pixel belongs to at most one (the front) object
        assert all(i.mask.sum() >= 20 for i in insts)


def test_lvis_eval_perfect_predictions(worlds, monkeypatch):
    monkeypatch.setattr(np, "float", float, raising=False)  # lvis 0.5.3 uses the removed alias
    gt = LVIS(worlds["a"]["lvis_val"])
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
             "score": 1.0, "segmentation": gt.ann_to_rle(a)} for a in gt.dataset["annotations"]]
    for a in dets:
        a["segmentation"]["counts"] = a["segmentation"]["counts"].decode("ascii")
    for iou_type in ("bbox", "segm"):
        ev = LVISEval(gt, LVISResults(gt, [dict(d) for d in dets]), iou_type)
        ev.run()
        assert ev.results["AP"] == pytest.approx(1.0), iou_type
    wrong = [{**d, "bbox": [d["bbox"][0] + 40, d["bbox"][1] + 40, 5, 5]} for d in dets]
    ev = LVISEval(gt, LVISResults(gt, wrong), "bbox")
    ev.run()
    assert ev.results["AP"] < 0.1
