"""tools/detect.py: input forms, vocabularies, outputs, COCO results, and every way a run can go wrong."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from helpers import scene  # noqa: E402

from vild.cli.detect import main

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent
GOOD = ["color.png", "deep.png", "exif.jpg", "gray.png", "rgba.png"]
# every training name of the tiny checkpoint besides "kite", so that none competes hidden: its random weights send
# every region to one of them, which would otherwise leave nothing to show
VOCAB = "kite,circle,square|box,triangle"


def run(ckpt, inp, out, *extra) -> int:
    args = ["--input", str(inp), "--output", str(out), "--device", "cpu", "--max-dets", "5", "--score-thresh", "0"]
    return main(([] if ckpt is None else ["--weights", str(ckpt)]) + args + [str(e) for e in extra])


def test_folder_with_bad_files_processes_the_rest_and_fails_at_the_end(ckpt, images, tmp_path, capsys):
    rc = run(ckpt, images["color.png"].parent, tmp_path / "out", "--vocab", VOCAB)
    cap = capsys.readouterr()
    assert rc == 1
    assert "processed 5 images, skipped 2 (1 not an image, 1 truncated)" in cap.out.strip().splitlines()[-1]
    assert str(images["truncated.jpg"]) in cap.err and str(images["notes.jpg"]) in cap.err
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == GOOD
    with Image.open(tmp_path / "out" / "exif.jpg") as im:
        assert im.size == (32, 64), "EXIF-rotated output keeps the rotated shape"
    with Image.open(tmp_path / "out" / "deep.png") as im:
        assert im.mode == "RGB"


def test_single_file_json_round_trips_through_pycocotools(ckpt, images, tmp_path):
    gt = {"images": [], "annotations": [], "categories": [{"id": 7, "name": "circle"}, {"id": 3, "name": "Square"}]}
    for i, name in enumerate(GOOD):
        with Image.open(images[name]) as im:
            w, h = im.size
        h, w = (64, 32) if name == "exif.jpg" else (h, w)
        gt["images"].append({"id": 100 + i, "file_name": name, "height": h, "width": w})
        gt["annotations"].append({"id": i + 1, "image_id": 100 + i, "category_id": 7, "bbox": [4, 4, 20, 20],
                                  "area": 400, "iscrowd": 0, "segmentation": [[4, 4, 24, 4, 24, 24, 4, 24]]})
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    glob_input = images["color.png"].parent / "*.png"  # the glob form: only the PNGs
    rc = run(ckpt, glob_input, tmp_path / "out", "--vocab", "circle,square", "--json",
             "--coco-gt", tmp_path / "gt.json")
    assert rc == 0
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["color.png", "deep.png", "gray.png", "rgba.png"]
    coco = COCO(str(tmp_path / "gt.json"))
    res = coco.loadRes(str(tmp_path / "out" / "detections.json"))
    anns = list(res.anns.values())
    assert len(anns) == 4 * 5
    ids = {im["file_name"]: im["id"] for im in gt["images"]}
    for a in anns:
        assert a["image_id"] == ids[Path(a["file_name"]).name], "image ids come from the ground truth"
        assert a["category_id"] == {"circle": 7, "square": 3}[a["category_name"]]
        img = coco.imgs[a["image_id"]]
        assert res.annToMask(a).shape == (img["height"], img["width"])
    ev = COCOeval(coco, res, "segm")
    ev.evaluate()
    ev.accumulate()
    assert ev.eval["precision"].shape[2] == 2  # both categories evaluated


def test_single_image_and_ids_without_ground_truth(ckpt, images, tmp_path, capsys):
    vocab_file = tmp_path / "v.txt"
    vocab_file.write_text("# shapes\nsquare|box\nkite\n")
    assert run(ckpt, images["exif.jpg"], tmp_path / "out", "--vocab-file", vocab_file, "--json") == 0
    dets = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert len(dets) == 5 and {d["image_id"] for d in dets} == {1}
    assert all(d["category_id"] == ["square", "kite"].index(d["category_name"]) + 1 for d in dets)
    assert "processed 1 images, skipped 0" in capsys.readouterr().out


def test_video_in_annotated_video_out(ckpt, tmp_path):
    src = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(src), cv2.VideoWriter_fourcc(*"mp4v"), 5, (64, 48))
    for i in range(5):
        writer.write(scene(seed=i)[..., ::-1].copy())
    writer.release()
    assert run(ckpt, src, tmp_path / "out", "--vocab-preset", "coco_ovd", "--json", "--batch-size", "2") == 0
    cap = cv2.VideoCapture(str(tmp_path / "out" / "clip.mp4"))
    frames = []
    while (f := cap.read())[0]:
        frames.append(f[1])
    assert len(frames) == 5 and frames[0].shape == (48, 64, 3)
    dets = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert sorted({d["frame"] for d in dets}) == [0, 1, 2, 3, 4]
    # written behind the model by a thread, recorded in frame order, one image id per frame
    assert [d["frame"] for d in dets] == sorted(d["frame"] for d in dets)
    assert len({d["image_id"] - d["frame"] for d in dets}) == 1


def test_weights_omitted_takes_the_newest_checkpoint(ckpt, images, tmp_path, monkeypatch, capsys):
    root = tmp_path / "runs"
    old, new = root / "a" / "model_0000010.pth", root / "b" / "deep" / "model_final.pth"
    for p in (old, new):
        p.parent.mkdir(parents=True)
        p.write_bytes(ckpt.read_bytes())
    os.utime(new, (time.time() - 100, time.time() - 100))  # model_final is older: mtime decides, not the name
    monkeypatch.setenv("VILD_OUTPUT", str(root))
    assert run(None, images["color.png"], tmp_path / "out") == 0
    assert f"using the newest checkpoint under {root}: {old}" in capsys.readouterr().err


def test_no_trained_model_says_how_to_get_one(images, tmp_path):
    env = {**os.environ, "VILD_OUTPUT": str(tmp_path / "empty"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(REPO / "tools" / "detect.py"), "--input", str(images["color.png"]),
                          "--output", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 2
    assert "make demo" in out.stderr and "tools/train_net.py" in out.stderr


def test_missing_and_corrupt_checkpoints(images, tmp_path, capsys):
    assert run(tmp_path / "none.pth", images["color.png"], tmp_path / "out") == 2
    assert "does not exist" in capsys.readouterr().err
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    torch.save({"model": Payload()}, tmp_path / "evil.pth")
    assert run(tmp_path / "evil.pth", images["color.png"], tmp_path / "out") == 2
    assert "cannot be read safely" in capsys.readouterr().err and not marker.exists()


def test_unwritable_output_fails_before_any_work(images, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    # the weights do not exist either: the output check must come first
    assert run(tmp_path / "none.pth", images["color.png"], tmp_path / "file" / "out") == 2
    err = capsys.readouterr().err
    assert "cannot be written" in err and "does not exist" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_gpu(ckpt, images, tmp_path, capsys):
    assert main(["--weights", str(ckpt), "--input", str(images["color.png"]), "--output", str(tmp_path),
                 "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.parametrize("vocab", ["", " , | "])
def test_empty_vocabulary(ckpt, images, tmp_path, capsys, vocab):
    assert run(ckpt, images["color.png"], tmp_path / "out", "--vocab", vocab) == 2
    assert 'vocabulary is empty: pass --vocab "cat,dog"' in capsys.readouterr().err


def test_missing_input(ckpt, tmp_path, capsys):
    assert run(ckpt, tmp_path / "nothing.png", tmp_path / "out") == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert run(ckpt, tmp_path / "empty", tmp_path / "out") == 2
    assert "no image or video files" in capsys.readouterr().err


def test_default_score_threshold_depends_on_the_variant(ckpt, images, tmp_path, capsys):
    args = ["--weights", str(ckpt), "--input", str(images["color.png"]), "--output", str(tmp_path), "--json"]
    assert main(args) == 0
    assert "score threshold 0.5" in capsys.readouterr().err  # an uncalibrated ViLD checkpoint
    assert all(d["score"] >= 0.5 for d in json.loads((tmp_path / "detections.json").read_text()))
    with Image.open(tmp_path / "color.png") as im:
        assert im.size == (64, 48)


def test_lvis_ground_truth_ids_and_inputs_it_does_not_list(ckpt, images, tmp_path, capsys):
    """LVIS images carry coco_url, not file_name; inputs the ground truth lacks are counted, not silently lost."""
    gt = {"images": [{"id": 42, "coco_url": "http://images.cocodataset.org/val2017/color.png",
                      "height": 48, "width": 64}],
          "annotations": [], "categories": [{"id": 9, "name": "circle", "frequency": "f"},
                                            {"id": 10, "name": "square", "frequency": "f"},
                                            {"id": 11, "name": "triangle", "frequency": "f"}]}
    (tmp_path / "lvis.json").write_text(json.dumps(gt))
    src = tmp_path / "in"
    src.mkdir()
    for name in ("color.png", "gray.png"):
        shutil.copy(images[name], src / name)
    (src / "notes.txt").write_text("not an input")
    rc = run(ckpt, src / "*", tmp_path / "out", "--vocab", "circle,square,triangle", "--json", "--coco-gt",
             tmp_path / "lvis.json")
    out = capsys.readouterr().out
    assert rc == 0, out  # the glob takes the images only, like a folder would
    dets = json.loads((tmp_path / "out" / "detections.json").read_text())
    gt_ids = {"circle": 9, "square": 10, "triangle": 11}
    assert dets and {(d["image_id"], d["category_id"]) for d in dets} == {(42, gt_ids[d["category_name"]]) for d in dets}
    assert "1 not in --coco-gt" in out


@pytest.mark.parametrize("flag", ["--max-dets", "--batch-size"])
def test_counts_must_be_positive(ckpt, images, tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as e:
        main(["--weights", str(ckpt), "--input", str(images["color.png"]), "--output", str(tmp_path), flag, "0"])
    assert e.value.code == 2 and "at least 1" in capsys.readouterr().err


def test_a_repeated_name_on_the_command_line_is_dropped_with_a_warning(ckpt, images, tmp_path):
    with pytest.warns(UserWarning, match="duplicate category 'Circle'"):
        assert run(ckpt, images["color.png"], tmp_path / "out", "--vocab", "circle,Circle,square", "--json") == 0
    names = {d["category_name"] for d in json.loads((tmp_path / "out" / "detections.json").read_text())}
    assert names <= {"circle", "square"}


def test_pipelined_folder_run_equals_the_serial_detector_in_input_order(ckpt, images, tmp_path):
    """Reading ahead and writing behind the model (I/O threads, parts, windowed RLE, cached labels) changes
    nothing: the same detections, ids and annotated image files as one Detector call per batch of input positions
    in file order, saved one by one, with the unreadable files between them skipped."""
    from vild import Detector
    from vild.io import read_image
    rc = run(ckpt, images["color.png"].parent, tmp_path / "out", "--vocab", VOCAB, "--json",
             "--batch-size", "2", "--part-size", "3")  # parts of 4 images: 2 batches each
    assert rc == 1
    got = json.loads((tmp_path / "out" / "detections.json").read_text())
    det = Detector.from_checkpoint(ckpt, device="cpu", vocabulary=VOCAB, max_dets=5, score_thresh=0.0)
    files = sorted(p for p in images["color.png"].parent.iterdir() if p.is_file())
    want = []
    for k in range(0, len(files), 2):  # batches of two input positions, as the command forms them
        good = [(i, f) for i, f in enumerate(files[k:k + 2], start=k) if f.name in GOOD]
        for (i, f), r in zip(good, det([read_image(f) for _, f in good])):
            # ids handed out in file order (from 1, the skipped files' included); vocabulary order, from 1
            want += [{**d, "file_name": str(f)} for d in r.to_coco_json(i + 1, [1, 2, 3, 4])]
            r.save(tmp_path / "serial" / f.name)
            assert (tmp_path / "out" / f.name).read_bytes() == (tmp_path / "serial" / f.name).read_bytes()
    assert len(got) > len(GOOD) and got == want
    assert not list((tmp_path / "out").glob(".vild-detect-*")), "the parts are removed after the merge"


def test_results_stream_to_a_hidden_file_that_replaces_detections_json_only_at_the_end(ckpt, images, tmp_path,
                                                                                      monkeypatch):
    """An interrupted run leaves the previous detections.json as it was and no temporary file behind."""
    from vild.api import Detector
    out = tmp_path / "out"
    assert run(ckpt, images["color.png"].parent, out, "--vocab", VOCAB, "--json", "--batch-size", "2") == 1
    before = (out / "detections.json").read_text()
    assert json.loads(before)
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "detections.json").stat().st_mode & 0o777 == 0o666 & ~umask  # as any written file, not 0600
    calls = {"n": 0}
    predict = Detector.predict

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the user's Ctrl-C in the middle of a folder
        return predict(self, *args, **kwargs)
    monkeypatch.setattr(Detector, "predict", failing)
    with pytest.raises(KeyboardInterrupt):
        run(ckpt, images["color.png"].parent, out, "--vocab", VOCAB, "--json", "--batch-size", "2")
    assert (out / "detections.json").read_text() == before
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
