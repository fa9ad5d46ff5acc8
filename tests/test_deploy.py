"""ONNX deployment (vild.deploy): the exported demo model against PyTorch, the torch-free text side, bad inputs.

The demo model is exported once per module; every parity check feeds that one file other vocabularies.
"""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnxruntime", reason="install the [onnx] extra: pip install -e '.[onnx]'")
pytest.importorskip("onnx", reason="install the [onnx] extra: pip install -e '.[onnx]'")

from vild import Detector  # noqa: E402
from vild.config import load_config  # noqa: E402
from vild.cli.detect import main as detect_main  # noqa: E402
from vild.cli.embed import main as embed_main  # noqa: E402
from vild.cli.export import main as export_main  # noqa: E402
from vild.deploy import (OnnxDetector, OnnxTextEncoder, VocabEmbeddings, export_checkpoint,  # noqa: E402
                         export_detector, load_vocab, save_vocab)
from vild.deploy.runner import OnnxModel  # noqa: E402
from vild.deploy.tokenizer import BPETokenizer  # noqa: E402
from vild.io import read_image  # noqa: E402
from vild.modeling import build_model  # noqa: E402
from vild.modeling.postprocess import select_detections, select_detections_batched  # noqa: E402
from vild.synthetic.world import NOVEL_NAMES, generate_world  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ASSET = Path(__file__).resolve().parent / "assets" / "demo_model" / "model.pth"
ROOT = Path(__file__).resolve().parent.parent
# two vocabularies for the same exported file: the novel shapes, then base and novel names in another order
VOCAB_A = list(NOVEL_NAMES)
VOCAB_B = ["heart", "circle|disk", "square", "star", "crescent", "triangle", "ring", "diamond|rhombus"]
SCORE_TOL = 1e-4  # absolute, on probabilities


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("onnx") / "demo.onnx"
    model, text = export_checkpoint(ASSET, out)
    return {"model": model, "text": text}


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> list[torch.Tensor]:
    """12 synthetic images the demo model never saw, plus two resized (shrunk, enlarged; not square)."""
    world = generate_world(str(tmp_path_factory.mktemp("held_out")), seed=2027, num_train=0, num_val=12,
                           image_size=128)
    paths = sorted(Path(world["images_val"]).iterdir())
    images = [read_image(p) for p in paths]
    big = Image.open(paths[0]).resize((200, 150), Image.BILINEAR)
    small = Image.open(paths[1]).resize((90, 120), Image.BILINEAR)
    return images + [torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous() for im in (big, small)]


# far under the display threshold (0.36), over the tail where the class probabilities, saturated, clamp alike for
# every non-winning class of a proposal: which of such exact ties survives NMS depends on the order candidates
# come in, which PyTorch and onnxruntime do not share
PARITY_THRESH = 0.01


@pytest.fixture(scope="module")
def torch_detector() -> Detector:
    return Detector.from_checkpoint(ASSET, device="cpu", score_thresh=PARITY_THRESH)


def _mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))


def test_onnx_matches_pytorch_on_held_out_images_with_two_vocabularies(exported, held_out, torch_detector):
    onnx_det = OnnxDetector(exported["model"], score_thresh=PARITY_THRESH, batch_size=4)
    assert len(held_out) >= 10
    total = 0
    for vocab in (VOCAB_A, VOCAB_B):
        torch_detector.set_vocabulary(vocab)
        # the PyTorch teacher's embeddings, so that this compares the detector graphs alone
        emb = torch_detector.teacher.encode_text(torch_detector.vocabulary).numpy()
        onnx_det.set_vocabulary(VocabEmbeddings(torch_detector.vocabulary, emb, torch_detector.teacher.identity))
        assert onnx_det.names == torch_detector.names
        ref, got = torch_detector(held_out), onnx_det(held_out)
        for r, g in zip(ref, got):
            _assert_same_detections(r, g)
            assert g.names == [onnx_det.names[int(k)] for k in g.labels]
            total += len(r)
    assert total > 100
    # a batch of one (its own padded size) too
    one = torch_detector(held_out[-1])
    assert len(one) > 0
    _assert_same_detections(one, onnx_det(held_out[-1]))


def _assert_same_detections(r, g) -> None:
    assert len(r) == len(g)
    if not len(r):
        return
    assert torch.equal(r.labels, g.labels)
    assert (r.boxes - g.boxes).abs().max() <= 1.0
    assert (r.scores - g.scores).abs().max() <= SCORE_TOL
    assert g.masks.shape == r.masks.shape and g.masks.dtype == torch.bool
    assert _mask_iou(r.masks, g.masks).min() >= 0.95


@pytest.mark.parametrize("abstain", [False, True])
def test_ensemble_export_takes_base_mask(tmp_path, abstain):
    cfg = load_config("tiny_test.yaml", ["MODEL.VILD.VARIANT", "ensemble"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    # with abstention the image head's calibrated null similarity is part of the graph
    model.roi_heads.image_null.fill_(0.05)
    settings = dataclasses.replace(model.roi_heads.test_settings, abstain=abstain)
    path = export_detector(model, tmp_path / "ens.onnx", cfg, settings=settings)
    onnx_model = OnnxModel(*_session(path))
    assert onnx_model.roi_heads.test_settings.abstain == abstain
    g = torch.Generator().manual_seed(1)
    emb = torch.nn.functional.normalize(torch.randn(6, model.embed_dim, generator=g), dim=-1)
    images = [torch.randint(0, 256, (3, 128, 96), generator=g, dtype=torch.uint8),
              torch.randint(0, 256, (3, 100, 128), generator=g, dtype=torch.uint8)]
    for base in ([True, False] * 3, [False] * 6):
        model.set_vocabulary(emb, torch.tensor(base))
        onnx_model.set_vocabulary(emb, torch.tensor(base))
        with torch.no_grad():
            ref = model(images, settings=settings)
        got = onnx_model(images)
        for r, o in zip(ref, got):
            n = min(10, len(r["scores"]))  # the best ones: random weights leave near-ties further down
            assert len(r["scores"]) == len(o["scores"]) and n > 0
            assert torch.equal(r["labels"][:n], o["labels"][:n])
            assert torch.allclose(r["boxes"][:n], o["boxes"][:n], atol=1e-2)
            assert torch.allclose(r["scores"], o["scores"], atol=SCORE_TOL)


def _session(path):
    from vild.deploy.text import open_graph, graph_metadata
    s = open_graph(path)
    return s, graph_metadata(s, path, "vild-detector-onnx-1")


def test_padded_inference_path_equals_the_model_forward(torch_detector, held_out):
    """propose_padded and forward_test_padded (the exported path) against propose and forward_test, eagerly, under
    the display score ``Detector`` uses. The RPN's objectness is part of that score: the plain class probability
    of a confident model saturates at 1.0 for several proposals on one object, and which of such exact ties
    survives NMS depends on the order the candidates come in, which the two paths do not share."""
    model = torch_detector.model
    torch_detector.set_vocabulary(VOCAB_B)
    heads = model.roi_heads
    # the raw display score (no confidence map), over a floor: the class probabilities of this model saturate, so
    # under 1e-6 every non-winning class of a proposal scores alike (its clamp times the objectness)
    settings = torch_detector.display_settings(class_agnostic=False, confidence=False, score_thresh=1e-5)
    images = held_out  # 128 px images, one shrunk, one enlarged: a padded batch of mixed sizes
    with torch.no_grad():
        batch, _ = model.preprocessor(images)
        features = model.backbone(batch.tensors)
        sizes = torch.tensor(batch.image_sizes)
        proposals, scores, _ = model.rpn(batch, features)
        padded, objectness = model.rpn.propose_padded(batch.tensors, sizes, features)
        ref = heads.forward_test(features, proposals, batch.image_sizes, objectness=scores, settings=settings)
        out = heads.forward_test_padded(features, padded, sizes, settings.score_thresh, settings.max_dets,
                                        objectness=objectness, settings=settings)
    for i, (p, r) in enumerate(zip(proposals, ref)):
        assert torch.equal(padded[i, :len(p)], p) and not padded[i, len(p):].any()
        assert torch.allclose(objectness[i, :len(p)], scores[i]) and (scores[i] > 0).all()
        sel = out["batch_index"] == i
        assert torch.equal(out["labels"][sel], r["labels"])
        assert torch.allclose(out["boxes"][sel], r["boxes"], atol=1e-4)
        assert torch.allclose(out["scores"][sel], r["scores"], atol=1e-6)
        assert torch.allclose(out["mask_probs"][sel], r["mask_probs"], atol=1e-5)
    assert sum(len(r["labels"]) for r in ref) > 10


@pytest.mark.parametrize("topk,thresh,agnostic", [(0, 0.0, False), (0, 0.3, False), (200, 0.0, False),
                                                  (200, 0.05, False), (200, 0.0, True), (200, 0.05, True)])
def test_select_detections_batched_equals_select_detections(topk, thresh, agnostic):
    g = torch.Generator().manual_seed(topk + int(thresh * 100))
    b, r, k, max_dets = 3, 40, 7, 25
    xy = torch.rand(b, r, 2, generator=g) * 80
    boxes = torch.cat([xy, xy + 4 + torch.rand(b, r, 2, generator=g) * 40], dim=-1)
    boxes[1, 30:] = 0  # padding rows of an image with fewer proposals
    scores = torch.rand(b, r, k, generator=g) ** 3
    db, ds, dl, di, drow = select_detections_batched(boxes, scores, thresh, 0.5, max_dets, topk, agnostic)
    assert torch.equal(di, di.sort(stable=True).values)  # grouped by image
    for i in range(b):
        rb, rs, rl, rrow = select_detections(boxes[i], scores[i], thresh, 0.5, max_dets, topk, agnostic)
        sel = di == i
        assert torch.equal(dl[sel], rl) and torch.equal(drow[sel], rrow)
        assert torch.equal(db[sel], rb) and torch.equal(ds[sel], rs)


def test_text_tower_and_tokenizer_match_pytorch(exported, torch_detector):
    enc = OnnxTextEncoder(exported["text"])
    vocab = [["kite"], ["couch", "sofa"], ["bow_(weapon)"], ["Crème brûlée"], ["unicycle"]]
    ref = torch_detector.teacher.encode_text(vocab).numpy()
    got = enc.encode(vocab)
    assert got.shape == ref.shape
    assert (ref * got).sum(1).min() >= 0.999
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    tok = torch_detector.teacher.tokenizer
    texts = ["a photo of a kite.", "An  Embroidered sofa&amp;couch!!", "naïve café 42x", "it's the toy's",
             "a black and white photo of the very very very long hyphenated-name-of-a-thing in the scene."]
    assert isinstance(enc.tokenizer, BPETokenizer)
    assert np.array_equal(enc.tokenizer(texts), tok(texts).numpy())


def test_text_side_runs_without_torch(exported, tmp_path, torch_detector):
    expected = torch_detector.teacher.encode_text([["kite"], ["couch", "sofa"]]).numpy()
    np.save(tmp_path / "expected.npy", expected)
    code = f"""
import sys
for name in ("torch", "torchvision", "open_clip"):
    sys.modules[name] = None  # any import of them fails
import numpy as np
from vild.cli.embed import main as embed_main
from vild.deploy.text import load_vocab
rc = embed_main(["--text-model", {str(exported['text'])!r}, "--vocab", "kite,couch|sofa",
                 "--out", {str(tmp_path / 'v.npz')!r}])
assert rc == 0, rc
v = load_vocab({str(tmp_path / 'v.npz')!r})
assert v.names == [["kite"], ["couch", "sofa"]], v.names
cos = (v.embeddings * np.load({str(tmp_path / 'expected.npy')!r})).sum(1)
assert cos.min() >= 0.999, cos
print("ok", cos.min())
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "\nok " in run.stdout


def test_vocab_file_from_checkpoint_feeds_the_runner(exported, tmp_path, held_out):
    assert embed_main(["--weights", str(ASSET), "--vocab", ",".join(VOCAB_A), "--out", str(tmp_path / "v.npz")]) == 0
    vocab = load_vocab(tmp_path / "v.npz")
    assert [s[0] for s in vocab.names] == VOCAB_A and vocab.embeddings.shape == (4, 64)
    det = OnnxDetector(exported["model"], text_model=False, vocabulary=str(tmp_path / "v.npz"), score_thresh=0.001)
    assert det.names == VOCAB_A and len(det(held_out[0])) > 0
    with pytest.raises(RuntimeError, match="no text encoder"):
        det.set_vocabulary("kite,unicycle")  # names need the text tower, which this detector was not given
    other = VocabEmbeddings(vocab.names, vocab.embeddings, {**vocab.teacher, "sha256": "0" * 64})
    with pytest.raises(ValueError, match="another text tower"):
        det.set_vocabulary(other)


class _NoInference:
    def __init__(self, runtime):
        self.runtime = runtime

    def __getattr__(self, name):
        return getattr(self.runtime, name)

    def run(self, *args, **kwargs):
        raise AssertionError("inference ran on bad input")


def test_bad_inputs_are_refused_before_inference(exported, held_out):
    det = OnnxDetector(exported["model"], vocabulary="star,heart")
    det.model.runtime = _NoInference(det.model.runtime)
    with pytest.raises(ValueError, match=r"do not fit this model: it expects \[K, 64\]"):
        det.set_vocabulary(VocabEmbeddings([["kite"], ["cat"]], np.ones((2, 32), np.float32), {}))
    with pytest.raises(ValueError, match="vocabulary is empty"):
        det.set_vocabulary(" , ")
    with pytest.raises(ValueError, match="vocabulary is empty"):
        det.set_vocabulary(VocabEmbeddings([], np.zeros((0, 64), np.float32), {}))
    assert det.names == ["star", "heart"]  # a refused vocabulary leaves the current one
    with pytest.raises(ValueError, match="dtype torch.int32"):
        det.predict([held_out[0].int()])
    with pytest.raises(ValueError, match=r"shape \(4, 128, 128\)"):
        det.predict([torch.cat([held_out[0], held_out[0][:1]])])
    with pytest.raises(ValueError, match="numpy images must be"):
        det(np.zeros((8, 8, 5), np.uint8))
    with pytest.raises(ValueError, match="float32"):
        det.model.run(np.zeros((1, 3, 128, 128), np.uint8), np.array([[128, 128]]))
    with pytest.raises(ValueError, match="multiples of 32"):
        det.model.run(np.zeros((1, 3, 100, 128), np.float32), np.array([[100, 128]]))


def test_cli_detect_with_onnx_backend_and_its_errors(exported, held_out, tmp_path, capsys):
    images = tmp_path / "in"
    images.mkdir()
    for i, im in enumerate(held_out[:3]):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(images / f"{i}.png")
    (images / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    # base and novel names, with synonyms: shapes every image shows
    rc = detect_main(["--backend", "onnx", "--weights", str(exported["model"]), "--vocab", ",".join(VOCAB_B),
                      "--input", str(images), "--output", str(out), "--json", "--device", "cpu"])
    assert rc == 1  # the broken file is skipped with its reason, the others done
    assert "skipped 1 (1 not an image)" in capsys.readouterr().out
    dets = json.loads((out / "detections.json").read_text())
    shown = {d["category_name"] for d in dets}
    assert len(list(out.glob("*.png"))) == 3 and dets and shown <= {v.split("|")[0] for v in VOCAB_B}
    for argv, message in [(["--vocab", " , "], "vocabulary is empty"),
                          (["--weights", str(ASSET)], "not a readable ONNX model")]:
        base = {"--weights": str(exported["model"]), "--vocab": "star", "--input": str(images / "0.png"),
                "--output": str(tmp_path / "o2")}
        base.update(dict(zip(argv[::2], argv[1::2])))
        assert detect_main(["--backend", "onnx", *[x for kv in base.items() for x in kv]]) == 2
        assert message in capsys.readouterr().err


def test_export_refuses_a_checkpoint_that_cannot_load(tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x80\x02 definitely not a checkpoint")
    assert export_main(["--weights", str(bad), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "cannot be read safely" in capsys.readouterr().err
    assert export_main(["--weights", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def test_vocab_file_round_trip(tmp_path):
    v = VocabEmbeddings([["kite"], ["couch", "sofa"]], np.eye(2, 8, dtype=np.float32), {"model": "m", "sha256": "ab"})
    back = load_vocab(save_vocab(tmp_path / "v.npz", v))
    assert back.names == v.names and np.array_equal(back.embeddings, v.embeddings) and back.teacher == v.teacher
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a vild vocabulary file"):
        load_vocab(tmp_path / "junk.npz")
