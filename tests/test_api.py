"""The Python API (vild.Detector), image reading (vild.io), drawing and vocabulary presets."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util

from vild import Detector
from vild.io import ImageReadError, read_image, to_image_tensor
from vild.teacher import CLIPTeacher
from vild.teacher.clip_teacher import sha256_file
from vild.visualize import PALETTE, draw_detections, text_color
from vild.vocab_presets import get_preset

from helpers import TRAIN_VOCAB, make_checkpoint, scene  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture
def det(ckpt) -> Detector:
    return Detector.from_checkpoint(ckpt, device="cpu", max_dets=10)


# ---- reading images -----------------------------------------------------------------------------
def test_read_image_handles_grayscale_rgba_16bit_and_exif(images):
    gray = read_image(images["gray.png"])
    assert gray.shape == (3, 48, 64) and gray.dtype == torch.uint8
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    rgba = read_image(images["rgba.png"])
    assert rgba.shape == (3, 48, 64)
    assert rgba[:, :, :32].eq(255).all(), "transparent pixels are composited on white"
    assert rgba[:, 0, 40].tolist() == [0, 200, 0]
    deep = read_image(images["deep.png"])
    assert deep[:, 0, 0].tolist() == [255] * 3 and deep[:, 0, 40].tolist() == [100] * 3
    assert read_image(images["exif.jpg"]).shape == (3, 64, 32), "EXIF orientation 6 turns 64×32 into 32×64"


@pytest.mark.parametrize("name,reason", [("truncated.jpg", "truncated"), ("notes.jpg", "not an image"),
                                         ("missing.png", "not found")])
def test_read_image_errors_name_the_path_and_reason(images, name, reason):
    path = images["color.png"].parent / name
    with pytest.raises(ImageReadError, match=reason) as e:
        read_image(path)
    assert e.value.reason == reason and str(path) in str(e.value)


# ---- loading ------------------------------------------------------------------------------------
def test_from_checkpoint_defaults_to_the_training_vocabulary(det):
    assert det.names == ["circle", "square", "triangle"] and det.base_mask == [True] * 3
    assert det.variant == "vild" and det.score_thresh == 0.0
    r = det(scene())
    assert 0 < len(r) <= 10
    assert r.boxes.shape == (len(r), 4) and r.boxes.dtype == torch.float32
    assert r.labels.dtype == torch.int64 and r.masks.dtype == torch.bool and r.masks.shape == (len(r), 48, 64)
    assert r.names == [det.names[k] for k in r.labels.tolist()]
    assert (r.scores[:-1] >= r.scores[1:]).all()


def test_missing_and_corrupt_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Detector.from_checkpoint(tmp_path / "nope.pth", device="cpu")
    marker = tmp_path / "pwned"

    class Payload:  # unpickling this calls open(marker, "w"): code from the file would run
        def __reduce__(self):
            return open, (str(marker), "w")

    evil = tmp_path / "evil.pth"
    torch.save({"model": Payload()}, evil)
    torch.load(evil, weights_only=False)  # the unsafe way really runs it ...
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ValueError, match="cannot be read safely"):
        Detector.from_checkpoint(evil, device="cpu")
    assert not marker.exists(), "weights_only=True must not run pickled code"
    (tmp_path / "half.pth").write_bytes(evil.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt, truncated"):
        Detector.from_checkpoint(tmp_path / "half.pth", device="cpu")


def test_a_different_teacher_is_refused_naming_both(tmp_path):
    path = make_checkpoint(tmp_path)
    trained = sha256_file(tmp_path / "teacher.pt")
    torch.manual_seed(123)
    CLIPTeacher("vild-test-micro", "", templates="simple").save_weights(tmp_path / "teacher.pt")
    now = sha256_file(tmp_path / "teacher.pt")
    with pytest.raises(ValueError, match="made with teacher") as e:
        Detector.from_checkpoint(path, device="cpu")
    assert trained[:12] in str(e.value) and now[:12] in str(e.value)


def test_relative_teacher_path_is_found_beside_the_checkpoint(tmp_path, monkeypatch):
    path = make_checkpoint(tmp_path / "run", relative_teacher=True)
    monkeypatch.chdir(tmp_path)  # "teacher.pt" does not exist relative to the cwd
    assert Detector.from_checkpoint(path, device="cpu").names == ["circle", "square", "triangle"]


def test_the_teacher_file_matching_the_checkpoint_wins_over_one_in_the_cwd(tmp_path, monkeypatch):
    path = make_checkpoint(tmp_path / "run", relative_teacher=True)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(7)  # another teacher of the same name in the current folder
    CLIPTeacher("vild-test-micro", "", templates="simple").save_weights(tmp_path / "teacher.pt")
    det = Detector.from_checkpoint(path, device=torch.device("cpu"))  # a torch.device is accepted too
    assert det.teacher.identity["sha256"] == sha256_file(tmp_path / "run" / "teacher.pt")


def test_text_cache_goes_to_vild_cache_not_the_training_runs_folder(ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VILD_CACHE", str(tmp_path / "mine"))
    det = Detector.from_checkpoint(ckpt, device="cpu")
    assert det.teacher.cache_dir == tmp_path / "mine" and list((tmp_path / "mine").glob("text_*.pt"))
    other = Detector.from_checkpoint(ckpt, device="cpu", cache_dir=tmp_path / "given")
    assert other.teacher.cache_dir == tmp_path / "given"
    assert not (tmp_path / "output").exists()


def test_results_are_ordinary_tensors_and_inputs_are_checked(det):
    r = det(scene())
    r.boxes /= 2  # inference-mode tensors would refuse this
    with pytest.raises(ValueError, match="one source"):
        det.predict([to_image_tensor(scene())] * 2, ["a.png"])
    with pytest.raises(ValueError, match="distinct, non-blank"):
        det.set_vocabulary(["circle", "", "square"])
    with pytest.raises(ValueError, match="distinct, non-blank"):
        det.set_vocabulary(["circle", "Circle"])
    det.max_dets = 0
    with pytest.raises(ValueError, match="at least 1"):
        det(scene())


def test_float_images_on_0_to_1_are_scaled(det):
    a = scene()
    ref = to_image_tensor(a)
    assert torch.equal(to_image_tensor(a.astype(np.float32) / 255.0), ref)
    assert torch.equal(to_image_tensor(torch.from_numpy(a).permute(2, 0, 1).float() / 255.0), ref)
    assert torch.equal(to_image_tensor(a.astype(np.float32)), ref)  # 0..255 floats stay as they are
    ones = torch.ones(3, 4, 4, dtype=torch.int64)  # integers are never rescaled, whatever their range
    assert to_image_tensor(ones).max() == 1 and to_image_tensor(ones.numpy().transpose(1, 2, 0)).max() == 1


def test_an_oversized_image_is_a_read_error_not_a_crash(tmp_path, monkeypatch):
    Image.fromarray(scene()).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 48×64 is then a "decompression bomb"
    with pytest.raises(ImageReadError, match="too large"):
        read_image(tmp_path / "big.png")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_gpu_is_a_clear_error(ckpt):
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        Detector.from_checkpoint(ckpt, device="cuda")


# ---- vocabulary ---------------------------------------------------------------------------------
def test_vocabulary_swap_changes_names_and_base_mask(det):
    before = det(scene())
    det.set_vocabulary("kite, Circle|round , unicycle")
    assert det.names == ["kite", "Circle", "unicycle"]
    assert det.base_mask == [False, True, False], "a name matching a training name (any case) is base"
    r = det(scene())
    assert set(r.names) <= {"kite", "Circle", "unicycle"} and set(before.names) <= {"circle", "square", "triangle"}
    assert r.names == [det.names[k] for k in r.labels.tolist()]
    det.set_vocabulary([["sofa", "square"], "tv"])
    assert det.base_mask == [True, False], "a synonym matching a training name makes it base"


def test_text_embeddings_are_computed_once_per_vocabulary(det, monkeypatch):
    calls = []
    encode = det.teacher.encode_text
    monkeypatch.setattr(det.teacher, "encode_text", lambda names: calls.append(names) or encode(names))
    det.set_vocabulary("kite,unicycle")
    first = det.model.roi_heads.classifier.text_embeddings.clone()
    det.set_vocabulary("dog")
    det.set_vocabulary("kite,unicycle")
    asked = [c for c in calls if c != det.training_vocabulary]  # the hidden training names: embedded once
    assert len(asked) == 2, "the second 'kite,unicycle' must come from the in-memory cache"
    assert len(calls) - len(asked) <= 1
    assert torch.equal(det.model.roi_heads.classifier.text_embeddings, first)


def test_bad_vocabularies(det):
    for empty in ["", " , ", [], ["  "]]:
        with pytest.raises(ValueError, match='vocabulary is empty: pass --vocab "cat,dog"'):
            det.set_vocabulary(empty)
    with pytest.warns(UserWarning, match="duplicate category"):
        det.set_vocabulary("cat,dog,cat")
    assert det.names == ["cat", "dog"]
    with pytest.warns(UserWarning, match="duplicate category 'Cat'"):
        det.set_vocabulary("cat,Cat")
    assert det.names == ["cat"]
    long_name = "extraordinarily long winded name of a thing nobody could ever fit in sixteen tokens"
    with pytest.warns(UserWarning, match="truncated"):
        det.set_vocabulary(["kite", long_name])
    assert det.names == ["kite", long_name]


# ---- inference ----------------------------------------------------------------------------------
def test_input_types_give_identical_results(det, images):
    rgb = np.asarray(Image.open(images["color.png"]).convert("RGB"))
    inputs = {"path": (images["color.png"], {}), "str": (str(images["color.png"]), {}),
              "pil": (Image.open(images["color.png"]), {}), "numpy": (rgb, {}),
              "bgr": (np.ascontiguousarray(rgb[..., ::-1]), {"bgr": True}),
              "tensor": (torch.from_numpy(rgb.copy()).permute(2, 0, 1), {})}
    ref = det(rgb)
    assert len(ref) > 0
    for name, (x, kw) in inputs.items():
        r = det(x, **kw)
        assert torch.equal(r.boxes, ref.boxes) and torch.equal(r.scores, ref.scores), name
        assert torch.equal(r.labels, ref.labels) and torch.equal(r.masks, ref.masks), name
    assert det(images["color.png"]).source == str(images["color.png"])
    r = det(np.ascontiguousarray(rgb[..., ::-1]))  # BGR taken as RGB: a different picture
    assert not (len(r) == len(ref) and torch.equal(r.scores, ref.scores))


def test_a_list_is_one_forward_pass_per_batch(det):
    calls = []
    det.model.register_forward_hook(lambda m, inp, out: calls.append(len(inp[0])))
    pics = [scene(seed=s) for s in range(3)]
    out = det(pics)
    assert isinstance(out, list) and len(out) == 3 and calls == [3]
    calls.clear()
    assert len(det(pics, batch_size=2)) == 3 and calls == [2, 1]


def test_score_threshold_and_max_dets(det):
    det.max_dets = 3
    assert 0 < len(det(scene())) <= 3
    det.max_dets, det.score_thresh = 50, 0.5
    r = det(scene())
    assert (r.scores >= 0.5).all()
    det.score_thresh = 1.01
    assert len(det(scene())) == 0


def test_results_keep_the_models_masks_without_a_copy_unless_rows_are_dropped(det, monkeypatch):
    """Masks are [n, H, W] bytes (2.4 GB for 100 detections on a 24-megapixel photo): a copy that drops
    nothing would double the peak; rows below the threshold or over max_dets are still dropped."""
    n, h, w = 5, 48, 64
    out = {"boxes": torch.rand(n, 4) * 40, "scores": torch.tensor([0.9, 0.8, 0.7, 0.2, 0.1]),
           "labels": torch.zeros(n, dtype=torch.long), "masks": torch.rand(n, h, w) > 0.5}
    monkeypatch.setattr(det.model, "forward", lambda images, settings=None: [dict(out)])
    det.score_thresh, det.max_dets = 0.05, 50
    r = det(scene(h, w))
    assert r.masks.data_ptr() == out["masks"].data_ptr() and len(r) == n
    det.score_thresh = 0.5
    r = det(scene(h, w))
    assert torch.equal(r.masks, out["masks"][:3]) and torch.equal(r.scores, out["scores"][:3])
    det.score_thresh, det.max_dets = 0.05, 2
    r = det(scene(h, w))
    assert torch.equal(r.masks, out["masks"][:2]) and r.names == [det.names[0]] * 2


def test_to_coco_json_and_save(det, tmp_path):
    r = det(scene())
    dets = r.to_coco_json(image_id=7, category_ids={"circle": 11, "square": 12, "triangle": 13})
    assert len(dets) == len(r)
    for d, box, mask, name in zip(dets, r.boxes, r.masks, r.names):
        x, y, w, h = d["bbox"]
        assert np.allclose([x, y, x + w, y + h], box.tolist(), atol=0.01)
        assert d["image_id"] == 7 and d["category_name"] == name
        assert d["category_id"] == {"circle": 11, "square": 12, "triangle": 13}[name]
        assert isinstance(d["segmentation"]["counts"], str)
        assert np.array_equal(mask_util.decode(d["segmentation"]).astype(bool), mask.numpy())
    by_order = r.to_coco_json(1, [5, 6, 7])
    assert [d["category_id"] for d in by_order] == [[5, 6, 7][k] for k in r.labels.tolist()]
    assert "category_id" not in r.to_coco_json(1)[0]
    r.save(tmp_path / "out.png")
    drawn = np.asarray(Image.open(tmp_path / "out.png"))
    assert drawn.shape == (48, 64, 3) and not np.array_equal(drawn, scene())


# ---- small pieces -------------------------------------------------------------------------------
def test_drawing_blends_each_masked_pixel_once_with_the_best_covering_detections_colour():
    image = torch.full((3, 40, 60), 100, dtype=torch.uint8)
    masks = torch.zeros(2, 40, 60, dtype=torch.bool)
    masks[0, 10:30, 10:30] = True
    masks[1, 20:35, 20:50] = True
    boxes = torch.tensor([[10.0, 10, 29, 29], [20, 20, 49, 34]])
    labels, scores = torch.tensor([0, 3]), torch.tensor([0.5, 0.9])
    drawn = draw_detections(image, boxes, labels, scores, ["a", "b"], masks).astype(int)
    blend = [np.round(100 * 0.55 + np.array(PALETTE[k]) * 0.45) for k in (0, 3)]
    assert np.abs(drawn[27, 12] - blend[0]).max() <= 1  # the first mask only
    assert np.abs(drawn[25, 25] - blend[1]).max() <= 1  # both: the better detection's colour, blended once
    assert (drawn[38, 5] == 100).all() and (drawn[37, 55] == 100).all()  # outside every mask, box and label
    assert tuple(drawn[15, 10]) == PALETTE[0]  # the box outline
    # a tensor in any layout, an H×W×3 array: the same picture
    hwc = image.permute(1, 2, 0).contiguous()
    assert np.array_equal(draw_detections(hwc.permute(2, 0, 1), boxes, labels, scores, ["a", "b"], masks), drawn)
    assert np.array_equal(draw_detections(hwc.numpy(), boxes, labels, scores, ["a", "b"], masks), drawn)


def test_label_text_colour_contrasts_with_its_background():
    assert text_color((255, 221, 0)) == (0, 0, 0) and text_color((31, 40, 120)) == (255, 255, 255)


def test_vocabulary_presets():
    assert len(get_preset("coco")) == 80 and len(get_preset("coco_ovd")) == 65
    lvis = get_preset("lvis")
    assert len(lvis) == 1203 and len(set(lvis)) == 1203
    assert lvis[0] == "aerosol_can" and lvis[79] == "cow" and lvis[-1] == "zucchini"  # line i = LVIS id i
    with pytest.raises(ValueError, match="coco, coco_ovd, lvis"):
        get_preset("voc")


def test_import_vild_is_light():
    code = "import sys, vild; assert 'torch' not in sys.modules; print(vild.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
