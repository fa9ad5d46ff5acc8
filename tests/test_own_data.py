"""Your own data without Python: a COCO json + image folder from the command line, novel categories by name, and
one clear error per bad json (naming the file, the id and the fix)."""
import copy
import json

import cv2
import numpy as np
import pytest
import torch

from vild.config import parse_args_with_overrides
from vild.data import build_dataset
from vild.data.validate import DatasetError
from vild.cli.train import run as train_main
from vild.cli.train import setup_config, train_argument_parser


def write_coco(folder, data=None):
    """Three 64x48 images and a COCO json of boxes (no segmentation) with categories cup, kettle, spoon."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    if data is None:
        data = {"images": [], "annotations": [], "categories": [
            {"id": 1, "name": "cup"}, {"id": 2, "name": "kettle"}, {"id": 5, "name": "spoon"}]}
        for i in range(1, 4):
            data["images"].append({"id": i, "file_name": f"{i}.png", "height": 48, "width": 64})
            data["annotations"] += [{"id": 10 * i + k, "image_id": i, "category_id": c, "bbox": [4 + 8 * k, 5, 20, 16],
                                     "area": 320, "iscrowd": 0} for k, c in enumerate((1, 2, 5))]
    for im in (im for im in data["images"] if "file_name" in im):
        cv2.imwrite(str(folder / "img" / im["file_name"]), np.full((48, 64, 3), 99, np.uint8))
    path = folder / "train.json"
    path.write_text(json.dumps(data))
    return path, data


def cfg_for(json_file, *extra):
    args = parse_args_with_overrides(train_argument_parser(), [
        "--config", "tiny_test.yaml", "--train-json", str(json_file), "--train-images", str(json_file.parent / "img"),
        "--test-json", str(json_file), "--test-images", str(json_file.parent / "img"), *extra])
    return setup_config(args)


def test_command_line_dataset_with_novel_names(tmp_path):
    js, _ = write_coco(tmp_path)
    cfg = cfg_for(js, "--novel", "Kettle")  # any case
    assert cfg.DATASETS.TRAIN == ["custom_train"] and cfg.DATASETS.TEST == ["custom_test"]
    train = build_dataset(cfg, "custom_train", train=True)
    assert train.category_names == [["cup"], ["spoon"]]  # the novel category is held out of training
    assert all(2 not in [train.category_ids[k] for k in train.target(i)["labels"]] for i in range(len(train)))
    test = build_dataset(cfg, "custom_test", train=False)
    assert [n[0] for n in test.category_names] == ["cup", "kettle", "spoon"] and test.base_mask == [True, False, True]
    assert not train.has_masks  # box-only
    assert build_dataset(cfg_for(js, "--novel", "none"), "custom_train", train=True).category_names == [
        ["cup"], ["kettle"], ["spoon"]]
    with pytest.raises(ValueError, match=r"\['teapot'\] are not in the dataset; its categories: cup, kettle, spoon"):
        build_dataset(cfg_for(js, "--novel", "teapot"), "custom_train", train=True)


def _bad(data, case):
    d = copy.deepcopy(data)
    if case == "missing image file":
        d["images"][1]["file_name"] = "gone.png"
    elif case == "box outside the image":
        d["annotations"][4]["bbox"] = [50, 5, 30, 16]  # to x = 80 in a 64-wide image
    elif case == "zero-size box":
        d["annotations"][4]["bbox"] = [10, 5, 0, 16]
    elif case == "unknown category id":
        d["annotations"][4]["category_id"] = 3
    elif case == "duplicate image id":
        d["images"][2]["id"] = 2
    elif case == "duplicate annotation id":
        d["annotations"][4]["id"] = d["annotations"][3]["id"]
    elif case == "missing file_name":
        del d["images"][1]["file_name"]
    return d


@pytest.mark.parametrize("case,expect", [
    ("missing image file", r"image id 2: file .*gone.png does not exist; put it there, fix file_name"),
    ("box outside the image", r"annotation id 21 \(image id 2\) has a box \[50, 5, 30, 16\].* outside its 64x48 "
                              r"image; fix the box"),
    ("zero-size box", r"annotation id 21 \(image id 2\) has a box of zero size \[10, 5, 0, 16\]; fix its width"),
    ("unknown category id", r"annotation id 21 \(image id 2\) has category id 3, which is not in categories "
                            r"\(ids 1, 2, 5\); fix its category_id"),
    ("duplicate image id", r"image id 2 is used 2 times; give each image its own id"),
    ("duplicate annotation id", r"annotation id 20 is used 2 times; give each annotation its own id"),
    ("missing file_name", r"image id 2 has no file_name; add the image's path"),
])
def test_bad_json_gives_one_clear_error(tmp_path, case, expect):
    _, good = write_coco(tmp_path / "good")
    js, _ = write_coco(tmp_path / "bad", _bad(good, case))
    if case == "missing image file":
        (tmp_path / "bad" / "img" / "gone.png").unlink(missing_ok=True)
    with pytest.raises(DatasetError, match=f"^{js}: {expect}") as e:
        build_dataset(cfg_for(js), "custom_train", train=True)
    assert "\n" not in str(e.value)


def test_bad_json_stops_train_net_with_one_line(tmp_path):
    _, good = write_coco(tmp_path / "good")
    js, _ = write_coco(tmp_path / "bad", _bad(good, "unknown category id"))
    with pytest.raises(SystemExit, match=r"^error: .*train.json: annotation id 21 .* category id 3"):
        train_main(["--config", "tiny_test.yaml", "--train-json", str(js), "--train-images", str(js.parent / "img"),
                    "OUTPUT_DIR", str(tmp_path / "out"), "MODEL.VILD.VARIANT", "text"])


def test_mask_loss_comes_only_from_annotations_with_a_segmentation(one_thread):
    """A mixed dataset: the mask of a box-only annotation (flagged by mask_valid) never reaches the loss."""
    from helpers import model_scene as scene, tiny_model, vocab
    model = tiny_model("text").train()
    model.set_vocabulary(vocab(), None)

    def loss_mask(masks, valid):
        img, t = scene()
        t = {**t, "masks": masks, **({"mask_valid": torch.tensor(valid)} if valid is not None else {})}
        torch.manual_seed(0)  # the same sampled RoIs every time
        return model([img], [t])["loss_mask"].item()

    _, t = scene()
    full = t["masks"].clone()
    changed = full.clone()
    changed[1] = 1 - changed[1]  # another mask for the second object
    assert loss_mask(full, [True, False]) == loss_mask(changed, [True, False])  # the box-only mask is not read
    assert loss_mask(full, None) != loss_mask(changed, None)  # (without the flags it would be)
    assert loss_mask(full, [True, True]) != loss_mask(changed, [True, True])
    assert loss_mask(full, [False, False]) == 0.0


def test_box_only_fine_tune_from_a_mask_model_with_another_vocabulary(ckpt, tmp_path, one_thread, capsys):
    """Box-only data trains no mask head; the model detects (API, detect.py) and is scored without masks."""
    from vild.api import Detector
    from vild.cli.detect import main as detect_main
    from vild.engine.checkpoint import load_checkpoint
    js, _ = write_coco(tmp_path)
    out = tmp_path / "out"
    old_vocab = load_checkpoint(ckpt)["vocabulary"]
    res = train_main(["--config", "tiny_test.yaml", "--train-json", str(js), "--train-images", str(tmp_path / "img"),
                      "--test-json", str(js), "--test-images", str(tmp_path / "img"), "--novel", "kettle",
                      "MODEL.WEIGHTS", str(ckpt), "TEACHER.PRETRAINED", str(ckpt.parent / "teacher.pt"),
                      "MODEL.VILD.VARIANT", "text", "SOLVER.MAX_ITER", "2", "OUTPUT_DIR", str(out)])
    assert set(res["custom_test"]) == {"bbox"} and "AP50_novel" in res["custom_test"]["bbox"]  # no mask AP
    log = (out / "log.txt").read_text()
    assert "no annotation of custom_train has a segmentation" in log and "mask weights are left out" in log
    trained = load_checkpoint(out / "model_final.pth")
    assert trained["cfg"]["MODEL"]["MASK_ON"] is False and not any(k.startswith("roi_heads.mask") for k in
                                                                    trained["model"])
    assert trained["vocabulary"] == [["cup"], ["spoon"]] and len(old_vocab) != 2  # another vocabulary, no surgery
    det = Detector.from_checkpoint(out / "model_final.pth", device="cpu", vocabulary="cup,kettle,teapot",
                                   score_thresh=0.0)
    result = det(str(tmp_path / "img" / "1.png"))
    assert not det.has_masks and result.masks is None and len(result) > 0
    assert all("segmentation" not in r for r in result.to_coco_json())
    capsys.readouterr()
    assert detect_main(["--weights", str(out / "model_final.pth"), "--vocab", "cup,kettle", "--input",
                        str(tmp_path / "img"), "--output", str(tmp_path / "det"), "--json"]) == 0
    assert "boxes only (a model trained without masks)" in capsys.readouterr().err
    assert len(list((tmp_path / "det").glob("*.png"))) == 3
