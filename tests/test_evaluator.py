"""Evaluators: perfect predictions score 100, numbers equal the official tools called directly."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from lvis import LVISEval, LVISResults
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval

from vild.data import DetectionDataset
from vild.evaluation import COCOEvaluator, LVISEvaluator, build_evaluator
from vild.evaluation.lvis_evaluator import _numpy_float_alias
from vild.utils import comm


@pytest.fixture(scope="module")
def lvis_val(world):
    return DetectionDataset(world["lvis_val"], world["images_val"], "lvis", "lvis", train=False)


@pytest.fixture(scope="module")
def coco_ovd_val(coco_ovd_world):
    return DetectionDataset(coco_ovd_world["coco_val"], coco_ovd_world["images_val"], "coco", "coco_ovd", train=False)


def _perfect(ds):
    return [{"boxes": t["boxes"], "scores": torch.ones(len(t["boxes"])), "labels": t["labels"],
             "masks": t["masks"].bool()} for t in (ds.target(j) for j in range(len(ds)))]


def _noisy(ds, seed=0):
    """Shifted boxes and masks, random scores, some wrong labels, dropped objects and extra boxes."""
    rng = np.random.default_rng(seed)
    outs = []
    for j in range(len(ds)):
        t = ds.target(j)
        n, k = len(t["boxes"]), len(ds.category_ids)
        shift = rng.integers(-3, 4, size=(n, 2))
        boxes = t["boxes"] + torch.from_numpy(np.concatenate([shift, shift], 1)).float()
        masks = torch.stack([torch.roll(m, (int(dy), int(dx)), (0, 1)) for m, (dx, dy) in zip(t["masks"], shift)]) \
            if n else t["masks"]
        labels = torch.where(torch.from_numpy(rng.random(n) < 0.2), torch.from_numpy(rng.integers(0, k, n)), t["labels"])
        keep = torch.from_numpy(rng.random(n) > 0.15)
        extra = torch.tensor([[10.0, 10, 60, 60]])
        outs.append({"boxes": torch.cat([boxes[keep], extra]), "scores": torch.from_numpy(rng.random(int(keep.sum()) + 1)),
                     "labels": torch.cat([labels[keep], torch.tensor([int(rng.integers(k))])]),
                     "masks": torch.cat([masks[keep].bool(), torch.zeros(1, *masks.shape[1:], dtype=torch.bool)])})
    return outs


def _official_results(ds, outputs):
    """COCO-format results written independently of vild.evaluation: (bbox, segm)."""
    bbox, segm = [], []
    for img_id, o in zip(ds.image_ids, outputs):
        for b, s, l, m in zip(o["boxes"].tolist(), o["scores"].tolist(), o["labels"].tolist(), o["masks"].numpy()):
            c = ds.category_ids[l]
            bbox.append({"image_id": img_id, "category_id": c, "score": s, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]})
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode()
            segm.append({"image_id": img_id, "category_id": c, "score": s, "segmentation": rle})
    return {"bbox": bbox, "segm": segm}


def _run(evaluator, ds, outputs):
    evaluator.reset()
    evaluator.process(ds.image_ids[:3], outputs[:3])  # ids or targets
    evaluator.process([{"image_id": i} for i in ds.image_ids[3:]], outputs[3:])
    return evaluator.evaluate()


def test_lvis_perfect_predictions_score_100(lvis_val, tmp_path):
    m = _run(build_evaluator(lvis_val, tmp_path), lvis_val, _perfect(lvis_val))
    for iou in ("bbox", "segm"):
        for k in ("AP", "AP50", "AP75", "APr", "APc", "APf"):
            assert m[iou][k] == pytest.approx(100.0), (iou, k)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["segm"]["APr"] == pytest.approx(100.0)
    assert len(json.loads((tmp_path / "results_segm.json").read_text())) == sum(
        len(lvis_val.target(j)["boxes"]) for j in range(len(lvis_val)))


def test_coco_ovd_perfect_predictions_score_100(coco_ovd_val, tmp_path):
    m = _run(build_evaluator(coco_ovd_val, tmp_path), coco_ovd_val, _perfect(coco_ovd_val))
    for iou in ("bbox", "segm"):
        for k in ("AP", "AP50", "AP50_novel", "AP50_base", "AP50_all"):
            assert m[iou][k] == pytest.approx(100.0), (iou, k)


def test_lvis_equals_official(lvis_val, tmp_path):
    outs = _noisy(lvis_val)
    m = _run(LVISEvaluator(lvis_val, tmp_path), lvis_val, outs)
    res = _official_results(lvis_val, outs)
    for iou in ("bbox", "segm"):
        E = LVISEval(lvis_val.api, LVISResults(lvis_val.api, res[iou], max_dets=300), iou)
        with contextlib.redirect_stdout(io.StringIO()), _numpy_float_alias():
            E.run()
        ref = E.get_results()
        for k in ("AP", "AP50", "AP75", "APr", "APc", "APf"):
            assert m[iou][k] == pytest.approx(100 * ref[k], abs=1e-9), (iou, k)
        assert 5 < m[iou]["AP"] < 95  # the noise matters: not a trivial 0 or 100
    _assert_results_unmodified(tmp_path)


def _assert_results_unmodified(folder):
    """The official loaders add area, id, iscrowd (and a box or polygon) to each result dict: not to ours."""
    common = {"image_id", "category_id", "score"}
    for iou, key in (("bbox", "bbox"), ("segm", "segmentation")):
        saved = json.loads((folder / f"results_{iou}.json").read_text())
        assert saved and all(set(r) == common | {key} for r in saved), (iou, saved[0])


def test_coco_ovd_equals_official(coco_ovd_val, tmp_path):
    ds, outs = coco_ovd_val, _noisy(coco_ovd_val, seed=1)
    m = _run(COCOEvaluator(ds, tmp_path, per_category=True), ds, outs)
    res = _official_results(ds, outs)
    novel = [c for c, b in zip(ds.category_ids, ds.base_mask) if not b]
    base = [c for c, b in zip(ds.category_ids, ds.base_mask) if b]
    for iou in ("bbox", "segm"):
        with contextlib.redirect_stdout(io.StringIO()):
            dt = ds.api.loadRes(json.loads(json.dumps(res[iou])))
        for name, cats in (("novel", novel), ("base", base), ("all", ds.category_ids)):
            E = COCOeval(ds.api, dt, iou)
            E.params.catIds = cats
            with contextlib.redirect_stdout(io.StringIO()):
                E.evaluate(), E.accumulate(), E.summarize()
            assert m[iou][f"AP50_{name}"] == pytest.approx(100 * E.stats[1], abs=1e-9), (iou, name)
            assert m[iou][f"AP_{name}"] == pytest.approx(100 * E.stats[0], abs=1e-9), (iou, name)
        assert m[iou]["AP"] == m[iou]["AP_all"] and 5 < m[iou]["AP50_all"] < 95
        assert set(m[iou]["per_category"]) == {n[0] for n in ds.category_names}
    _assert_results_unmodified(tmp_path)


def test_empty_predictions_score_zero(lvis_val, coco_ovd_val, tmp_path):
    for ds in (lvis_val, coco_ovd_val):
        ev = build_evaluator(ds, tmp_path / ds.evaluator_type)
        empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
        m = _run(ev, ds, [empty] * len(ds))
        assert set(m) == {"bbox"} and m["bbox"]["AP"] == 0.0 and m["bbox"]["AP50"] == 0.0
        assert json.loads((tmp_path / ds.evaluator_type / "results_bbox.json").read_text()) == []
    ev.reset()
    assert ev.evaluate() == {}  # nothing processed: no numbers, no crash


def test_comm_single_process():
    assert (comm.get_rank(), comm.get_world_size()) == (0, 1)
    assert comm.is_main_process() and comm.all_gather_object({"a": 1}) == [{"a": 1}]
    assert comm.broadcast_object([3]) == [3]
    comm.synchronize()


def _whole_mask_rles(masks: np.ndarray) -> list[dict]:
    """pycocotools' encode of the whole masks: the reference the windowed encoder must equal."""
    f = np.asfortranarray(masks.astype(np.uint8).transpose(1, 2, 0))
    return [{"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")} for r in mask_utils.encode(f)]


def test_rle_inside_each_masks_bounds_equals_pycocotools_on_the_whole_mask():
    """Runs counted only in a mask's covered rows and columns, with the zeros around them added, give the very
    RLE of the whole mask: at image borders, full columns, full images, single pixels and empty masks."""
    from vild.evaluation.results import encode_masks
    from vild.utils.mask_bounds import mask_bounds
    rng = np.random.default_rng(0)
    cases = []
    for _ in range(400):
        h, w = (int(v) for v in rng.integers(1, 14, 2))
        m = rng.random((4, h, w)) < rng.random()
        m[1] = False  # empty
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        m[2] = False
        m[2, y0:, x0:] = rng.random((h - y0, w - x0)) < 0.7  # a blob touching the bottom-right corner
        m[3] = True if rng.random() < 0.2 else m[3]  # the whole image
        cases.append(m)
    photo = np.zeros((3, 480, 640), dtype=bool)
    photo[0, 100:300, 50:90] = True  # full columns of the window, runs joined across them
    photo[1, 0:480, 600:640] = True  # full image height: no zeros between its columns
    photo[2, 479, 639] = True  # the last pixel
    cases.append(photo)
    for m in cases:
        want = _whole_mask_rles(m)
        assert encode_masks(m) == want
        assert encode_masks(torch.from_numpy(m), mask_bounds(m)) == want
        assert encode_masks(torch.from_numpy(m)[:, None]) == want  # [n, 1, H, W]
    assert encode_masks(np.zeros((0, 5, 5), dtype=bool)) == []
    assert mask_bounds(photo).tolist() == [[100, 300, 50, 90], [0, 480, 600, 640], [479, 480, 639, 640]]
