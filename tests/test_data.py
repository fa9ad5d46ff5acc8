"""Datasets, splits, transforms, catalog and loaders on the synthetic world."""
from __future__ import annotations

import itertools
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import COCO_NAME, DROPPED

from vild.config import get_cfg
from vild.data import (
    COCO_OVD_BASE,
    COCO_OVD_NOVEL,
    DetectionDataset,
    ProposalStore,
    ProposalStoreWriter,
    build_dataset,
    build_test_loader,
    build_train_loader,
    build_transforms,
    get_dataset_meta,
    register_dataset,
)
from vild.data.dataset import decode_mask
from vild.data.loader import InferenceSampler, InfiniteSampler, batch_to_device
from vild.data.transforms import DetectionTransform

REPO = Path(__file__).resolve().parent.parent


def _json(path: str) -> dict:
    return json.loads(Path(path).read_text())


def _cfg(**input_kw):
    cfg = get_cfg()
    cfg.INPUT.IMAGE_SIZE = 128
    cfg.INPUT.LSJ_SCALE = [0.5, 2.0]
    cfg.INPUT.update(input_kw)
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SOLVER.IMS_PER_BATCH = 4
    return cfg


def test_lvis_train_drops_novel_and_keeps_base_vocabulary(world):
    ds = DetectionDataset(world["lvis_train"], world["images_train"], "lvis", "lvis", train=True)
    assert [n[0] for n in ds.category_names] == world["base_names"]
    assert ds.base_mask == [True] * len(world["base_names"])
    assert ds.category_names[0] == ["circle", "disk"]  # LVIS synonyms kept
    data = _json(world["lvis_train"])
    base_ids = {c["id"] for c in data["categories"] if c["frequency"] != "r"}
    base_anns = [a for a in data["annotations"] if a["category_id"] in base_ids]
    assert len(base_anns) < len(data["annotations"])  # the world has novel objects to remove
    assert len(ds) == len({a["image_id"] for a in base_anns})  # images with only novel objects dropped
    labels = [ds.target(j)["labels"] for j in range(len(ds))]
    assert sum(len(x) for x in labels) == len(base_anns)
    assert all(int(x.max()) < len(ds.category_ids) for x in labels if len(x))


def test_lvis_test_set_keeps_all_with_base_mask_and_original_image(world):
    ds = DetectionDataset(world["lvis_val"], world["images_val"], "lvis", "lvis", train=False)
    names = [n[0] for n in ds.category_names]
    assert names == world["category_names"]
    assert [not b for b in ds.base_mask] == [n in world["novel_names"] for n in names]
    assert len(ds) == world["num_val"]
    image, t = ds[0]
    assert image.dtype == torch.uint8 and image.shape == (3, *t["orig_size"]) == (3, 128, 128)
    assert t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.int64 and t["masks"].dtype == torch.uint8
    assert t["masks"].shape == (len(t["boxes"]), 128, 128) and t["proposal_boxes"].shape == (0, 4)
    # polygons decode to masks whose extent is the json box
    for box, m in zip(t["boxes"], t["masks"]):
        ys, xs = torch.nonzero(m, as_tuple=True)
        assert torch.allclose(box, torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float())
    all_labels = torch.cat([ds.target(j)["labels"] for j in range(len(ds))])
    assert any(not ds.base_mask[k] for k in all_labels.tolist())  # novel objects are labelled at test


def test_coco_ovd_split(coco_ovd_world):
    tr = DetectionDataset(coco_ovd_world["coco_train"], coco_ovd_world["images_train"], "coco", "coco_ovd", train=True)
    te = DetectionDataset(coco_ovd_world["coco_val"], coco_ovd_world["images_val"], "coco", "coco_ovd", train=False)
    kept = [n for n in COCO_NAME.values() if n not in DROPPED]
    assert sorted(n[0] for n in tr.category_names) == sorted(n for n in kept if n in COCO_OVD_BASE)
    assert sorted(n[0] for n in te.category_names) == sorted(kept)
    assert all(len(n) == 1 for n in te.category_names)
    assert [not b for b in te.base_mask] == [n[0] in COCO_OVD_NOVEL for n in te.category_names]
    dropped_ids = {c["id"] for c in _json(coco_ovd_world["coco_val"])["categories"] if c["name"] in DROPPED}
    assert not dropped_ids & set(te.category_ids)
    labels = torch.cat([te.target(j)["labels"] for j in range(len(te))])
    assert set(labels.tolist()) <= set(range(len(te.category_ids)))
    assert {te.base_mask[k] for k in labels.tolist()} == {True, False}  # both base and novel objects at test


def test_lsj_and_flip_keep_boxes_masks_and_proposals_aligned(world, tmp_path):
    store_dir = tmp_path / "store"
    ds0 = DetectionDataset(world["lvis_train"], world["images_train"], "lvis", "lvis", train=True)
    data = _json(world["lvis_train"])
    w = ProposalStoreWriter(store_dir, 0, 1, ds0.image_ids, max_proposals=32, embed_dim=8)
    for img_id in ds0.image_ids:  # proposals = all gt boxes (novel too) + one box the crop often cuts away
        b = [[x, y, x + bw, y + bh] for x, y, bw, bh in (a["bbox"] for a in data["annotations"] if a["image_id"] == img_id)]
        b.append([0.0, 0.0, 3.0, 3.0])
        w.put(img_id, np.array(b), np.eye(len(b), 8))
    store = ProposalStore(store_dir)
    cfg = _cfg(AUG="lsj")
    ds = DetectionDataset(world["lvis_train"], world["images_train"], "lvis", "lvis", train=True,
                          transforms=build_transforms(cfg, True), proposal_store=store)
    torch.manual_seed(0)
    saw_invalid = saw_flip = 0
    for i in range(len(ds)):
        image, t = ds[i]
        assert image.shape == (3, 128, 128)
        n_props = len(store.get(t["image_id"])[0])
        assert t["proposal_boxes"].shape == (n_props, 4) and t["proposal_valid"].shape == (n_props,)
        assert len(t["boxes"]) == len(t["labels"]) == len(t["masks"])
        for box, m in zip(t["boxes"], t["masks"]):
            ys, xs = torch.nonzero(m, as_tuple=True)
            extent = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
            assert torch.equal(box, extent)  # boxes are recomputed from masks after the crop
            # the same geometry moved the object's proposal onto it (up to nearest-neighbour mask
            # resampling); a crop can only make the visible object smaller than its clipped box
            p = t["proposal_boxes"][(t["proposal_boxes"] - box).abs().max(1).values.argmin()]
            assert (p[:2] <= box[:2] + 2.5).all() and (p[2:] >= box[2:] - 2.5).all(), (p, box)
            if box[0] > 0 and box[1] > 0 and box[2] < 128 and box[3] < 128:
                assert (p - box).abs().max() <= 2.5, (p, box)
        assert torch.equal(t["proposal_embeds"][:, :8].argmax(1), torch.arange(n_props).clamp(max=7))
        saw_invalid += int((~t["proposal_valid"]).sum())
        # the corner proposal ends in the right half only after a horizontal flip
        corner = t["proposal_boxes"][-1]
        saw_flip += bool(t["proposal_valid"][-1] and corner[0] > 64)
    assert saw_invalid > 0 and saw_flip > 0


def test_transform_drops_cropped_out_gt_but_keeps_proposals():
    from torchvision.transforms import v2
    t = DetectionTransform(v2.RandomCrop((50, 50)))
    masks = torch.zeros(2, 100, 100, dtype=torch.uint8)
    masks[0, 10:20, 10:20] = 1
    masks[1, 80:90, 80:90] = 1
    target = {"boxes": torch.tensor([[10.0, 10, 20, 20], [80, 80, 90, 90]]), "labels": torch.tensor([3, 7]),
              "masks": masks, "proposal_boxes": torch.tensor([[10.0, 10, 20, 20], [80, 80, 90, 90]]),
              "proposal_valid": torch.ones(2, dtype=torch.bool)}
    torch.manual_seed(0)
    for _ in range(20):
        image, out = t(torch.zeros(3, 100, 100, dtype=torch.uint8), target)
        assert len(out["proposal_boxes"]) == 2  # paired with embeddings by index: never dropped
        kept = out["labels"].tolist()
        assert len(kept) < 2  # a 50 px crop cannot contain both boxes
        assert out["proposal_valid"].tolist() == [3 in kept, 7 in kept]
        assert out["masks"].shape[0] == len(kept) and all(int(m.sum()) > 0 for m in out["masks"])


def test_resize_mode_scales_longest_side(world):
    cfg = _cfg(AUG="resize", IMAGE_SIZE=256, RANDOM_FLIP=False)
    ds = DetectionDataset(world["coco_val"], world["images_val"], "coco", "all", train=True,
                          transforms=build_transforms(cfg, True))
    raw = DetectionDataset(world["coco_val"], world["images_val"], "coco", "all", train=True)
    (image, t), (_, t0) = ds[0], raw[0]
    assert image.shape == (3, 256, 256)
    assert torch.allclose(t["boxes"], t0["boxes"] * 2)
    assert build_transforms(cfg, train=False) is None


def test_unreadable_image_is_skipped_and_reported_in_training(world, tmp_path, caplog):
    images = tmp_path / "images"
    shutil.copytree(world["images_val"], images)
    ds = DetectionDataset(world["coco_val"], images, "coco", "all", train=True)
    bad = ds.image_path(ds._records[1][0])
    bad.write_bytes(b"not a png")
    with caplog.at_level(logging.WARNING):
        _, t = ds[1]
    assert t["image_id"] == ds.image_ids[2]
    assert ds.num_unreadable == 1 and str(bad) in caplog.text
    assert ds[1][1]["image_id"] == ds.image_ids[2] and ds.num_unreadable == 1  # remembered, not re-read


def test_unreadable_test_image_stops_evaluation_and_skip_mode_returns_none(world, tmp_path):
    """A stand-in would score its neighbour twice and the bad image's objects never."""
    images = tmp_path / "images"
    shutil.copytree(world["images_val"], images)
    ds = DetectionDataset(world["coco_val"], images, "coco", "all", train=False)
    bad = ds.image_path(ds._records[1][0])
    bad.write_bytes(b"not a png")
    with pytest.raises(RuntimeError, match=f"unreadable image {bad}.*scored on every image"):
        ds[1]
    skip = DetectionDataset(world["coco_val"], images, "coco", "all", train=False, unreadable="skip")
    assert skip[1] is None and skip[1] is None and skip[2][1]["image_id"] == skip.image_ids[2]


def test_exif_rotated_photos_load_in_the_frame_the_json_was_annotated_in(world, tmp_path):
    """A photo stored 40 x 100 with EXIF "rotate 90°": upright (100 x 40) when the json says so, as stored
    when the json gives the stored size; a size matching neither is still an error."""
    from PIL import Image
    raw = np.zeros((40, 100, 3), np.uint8)
    raw[:, :10] = 255  # a white stripe on the stored bitmap's left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    (tmp_path / "img").mkdir()
    Image.fromarray(raw).save(tmp_path / "img" / "p.jpg", exif=exif.tobytes(), quality=95)
    for (h, w), stripe_top in (((100, 40), True), ((40, 100), False)):
        js = tmp_path / f"{h}x{w}.json"
        js.write_text(json.dumps({"images": [{"id": 1, "file_name": "p.jpg", "height": h, "width": w}],
                                  "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5],
                                                   "area": 25, "iscrowd": 0, "segmentation": []}],
                                  "categories": [{"id": 1, "name": "thing"}]}))
        image, _ = DetectionDataset(js, tmp_path / "img", "coco", "all", train=False)[0]
        assert tuple(image.shape) == (3, h, w)
        # upright, the stored left edge is the top; as stored, it stays the left edge
        top, left = image[:, :5].float().mean() > 200, image[:, :, :5].float().mean() > 200
        assert top == stripe_top and left != stripe_top
    js = tmp_path / "wrong.json"
    js.write_text(json.dumps({"images": [{"id": 1, "file_name": "p.jpg", "height": 50, "width": 50}],
                              "annotations": [], "categories": [{"id": 1, "name": "thing"}]}))
    with pytest.raises(RuntimeError, match=r"is \(100, 40\) on disk but \(50, 50\) in the json"):
        DetectionDataset(js, tmp_path / "img", "coco", "all", train=False)[0]


def test_polygons_too_short_for_a_shape_fall_back_to_the_box():
    """pycocotools reads a 4-number polygon as a box and fails on fewer; detectron2 drops such polygons."""
    m = decode_mask([[1, 1, 5, 5]], [2, 3, 4, 5], 10, 12)
    assert m.sum() == 20 and m[3:8, 2:6].all()
    m = decode_mask([[]], [0, 0, 2, 2], 10, 12)
    assert m.sum() == 4
    tri = decode_mask([[1, 1, 5, 5], [0, 0, 8, 0, 8, 8]], [0, 0, 8, 8], 10, 12)
    assert 20 < tri.sum() < 64  # the valid triangle is kept, the bad polygon dropped


def test_missing_proposals_get_zero_and_are_counted(world, tmp_path):
    ids = DetectionDataset(world["coco_val"], world["images_val"], "coco", "all", train=False).image_ids
    w = ProposalStoreWriter(tmp_path, 0, 1, ids, max_proposals=4, embed_dim=6)
    w.put(ids[0], [[1, 2, 30, 40]], np.ones((1, 6)) / 6**0.5)
    ds = DetectionDataset(world["coco_val"], world["images_val"], "coco", "all", train=False,
                          proposal_store=ProposalStore(tmp_path))
    t0, t1 = ds[0][1], ds[1][1]
    assert t0["proposal_boxes"].tolist() == [[1, 2, 30, 40]] and t0["proposal_embeds"].dtype == torch.float32
    assert t1["proposal_boxes"].shape == (0, 4) and t1["proposal_embeds"].shape == (0, 6)
    assert ds.missing_proposals == 1


def test_catalog_builtin_custom_and_missing(world, tmp_path, monkeypatch):
    monkeypatch.setenv("VILD_DATASETS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"lvis_v1_val.json.*datasets/README.md"):
        get_dataset_meta("lvis_v1_val")
    meta = get_dataset_meta("coco_2017_val_ovd", check=False)
    assert meta.json_file == str(tmp_path / "coco/annotations/instances_val2017.json") and meta.split == "coco_ovd"
    cfg = _cfg()
    cfg.DATASETS.ROOT = "/elsewhere"
    assert get_dataset_meta("lvis_v1_train", cfg, check=False).image_root == "/elsewhere/coco"
    cfg.DATASETS.CUSTOM = {"shapes_val": {"JSON": world["lvis_val"], "IMAGES": world["images_val"],
                                          "TYPE": "lvis", "SPLIT": "lvis"}}
    ds = build_dataset(cfg, "shapes_val", train=False)
    assert ds.evaluator_type == "lvis" and len(ds.category_ids) == len(world["category_names"])
    register_dataset("shapes_train_coco", world["coco_train"], world["images_train"], "coco", "all")
    assert build_dataset(cfg, "shapes_train_coco", train=True).category_names[1] == ["square"]
    with pytest.raises(KeyError, match="unknown dataset"):
        get_dataset_meta("nope")


def test_train_loader_batches_infinite_and_deterministic(world):
    cfg = _cfg(AUG="lsj")
    ds = DetectionDataset(world["coco_train"], world["images_train"], "coco", "all", train=True,
                          transforms=build_transforms(cfg, True))
    def ids(loader, n):
        out = []
        for images, targets in itertools.islice(iter(loader), n):
            assert len(images) == len(targets) == 4 and all(im.shape == (3, 128, 128) for im in images)
            out += [t["image_id"] for t in targets]
        return out
    first = ids(build_train_loader(cfg, ds), 8)  # 32 images > 24 in the dataset: it wraps around
    assert len(first) == 32 and set(first) == set(ds.image_ids)
    assert ids(build_train_loader(cfg, ds), 8) == first
    assert ids(build_train_loader(cfg, ds, start_iter=5), 3) == first[20:]  # resuming continues the order
    cfg.DATALOADER.NUM_WORKERS = 2
    assert ids(build_train_loader(cfg, ds), 3) == first[:12]


def test_batch_to_device_moves_every_tensor_and_keeps_the_rest(world):
    cfg = _cfg()
    ds = DetectionDataset(world["coco_train"], world["images_train"], "coco", "all", train=True,
                          transforms=build_transforms(cfg, True))
    images, targets = next(iter(build_train_loader(cfg, ds)))
    meta = torch.device("meta")  # a device every build has, and unlike the CPU one no copy is a no-op there
    moved_images, moved_targets = batch_to_device(images, targets, meta)
    assert all(im.device == meta and im.shape == o.shape for im, o in zip(moved_images, images))
    for got, t in zip(moved_targets, targets):
        assert got.keys() == t.keys()
        for k, v in t.items():
            if torch.is_tensor(v):
                assert got[k].device == meta and got[k].shape == v.shape and got[k].dtype == v.dtype, k
            else:
                assert got[k] == v, k
    assert any(torch.is_tensor(v) for v in targets[0].values()) and any(not torch.is_tensor(v)
                                                                      for v in targets[0].values())


def test_samplers_shard_over_ranks():
    a = list(itertools.islice(InfiniteSampler(10, seed=1, rank=0, world_size=2), 5))
    b = list(itertools.islice(InfiniteSampler(10, seed=1, rank=1, world_size=2), 5))
    assert sorted(a + b) == list(range(10))
    parts = [list(InferenceSampler(10, rank=r, world_size=3)) for r in range(3)]
    assert sum(parts, []) == list(range(10)) and [len(p) for p in parts] == [4, 3, 3]


def test_test_loader_sees_every_image_once(world):
    cfg = _cfg()
    ds = DetectionDataset(world["lvis_val"], world["images_val"], "lvis", "lvis", train=False)
    seen = [t["image_id"] for _, targets in build_test_loader(cfg, ds) for t in targets]
    assert seen == ds.image_ids


def test_prepare_coco_ovd_train_file_has_base_annotations_only(coco_ovd_world):
    """Other tools read these files without the split marker: a novel box in the train file would leak."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("prepare_coco_ovd", REPO / "datasets" / "prepare_coco_ovd.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    data = _json(coco_ovd_world["coco_train"])
    names = {c["id"]: c["name"] for c in data["categories"]}
    train, val = mod.make_ovd(data, train=True), mod.make_ovd(_json(coco_ovd_world["coco_val"]), train=False)
    assert {names[a["category_id"]] for a in train["annotations"]} <= set(COCO_OVD_BASE)
    assert any(names[a["category_id"]] in COCO_OVD_NOVEL for a in data["annotations"])
    assert {c["split"] for c in train["categories"]} == {"base", "novel"}
    assert any(c["split"] == "novel" and a["category_id"] == c["id"]
               for a in val["annotations"] for c in val["categories"])
    assert not {c["name"] for c in train["categories"]} & DROPPED


def test_lsj_pads_with_the_mean_pixel_and_masks_with_zero(world):
    """Padding must normalise to 0, like the model's own batch padding; black would become about -2."""
    cfg = _cfg(AUG="lsj", IMAGE_SIZE=256, LSJ_SCALE=[0.3, 0.3], RANDOM_FLIP=False)
    ds = DetectionDataset(world["lvis_train"], world["images_train"], "lvis", "lvis", train=True,
                          transforms=build_transforms(cfg, True))
    torch.manual_seed(0)
    image, t = ds[0]
    assert image.shape == (3, 256, 256) and t["masks"].shape[-2:] == (256, 256) and len(t["masks"])
    mean = torch.tensor([round(m) for m in cfg.MODEL.PIXEL_MEAN], dtype=torch.uint8)
    pad = (image == mean[:, None, None]).all(0)
    assert pad.float().mean() > 0.8  # the image covers 0.3² of the canvas
    assert not (image == 0).all(0).any()
    assert not (t["masks"].bool() & pad).any()


def test_targets_without_masks_for_evaluation_and_the_store_writer(world):
    """Evaluation scores against the json: decoding every polygon there would be wasted work."""
    full = DetectionDataset(world["lvis_val"], world["images_val"], "lvis", "lvis", train=False)
    lean = DetectionDataset(world["lvis_val"], world["images_val"], "lvis", "lvis", train=False, masks=False)
    (image, t), (image0, t0) = lean[0], full[0]
    assert "masks" not in t and "masks" in t0
    assert torch.equal(image, image0) and torch.equal(t["boxes"], t0["boxes"])
    assert torch.equal(t["labels"], t0["labels"])
    cfg = _cfg(AUG="lsj", IMAGE_SIZE=96)  # the training transforms cope with mask-less targets too
    aug = DetectionDataset(world["lvis_train"], world["images_train"], "lvis", "lvis", train=True,
                           transforms=build_transforms(cfg, True), masks=False)
    image, t = aug[0]
    assert image.shape == (3, 96, 96) and "masks" not in t and len(t["boxes"]) == len(t["labels"])
