"""Your own data without Python: a COCO json + image folder from the command line, novel categories by name, and
one clear error per bad json (naming the file, the id and the fix)."""
import copy
import json

import cv2
import numpy as np
import pytest

from vild.config import parse_args_with_overrides
from vild.data import build_dataset
from vild.data.validate import DatasetError
from vild.engine.launch import main as train_main
from vild.engine.launch import setup_config, train_argument_parser


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
