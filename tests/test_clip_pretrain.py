"""Tiny-teacher pretraining: loss goes down, weights round-trip through open_clip, accuracy plumbing."""
import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from vild.synthetic.captions import make_caption_dataset
from vild.synthetic.clip_pretrain import (MODEL_NAME, clip_loss, pretrain_teacher,
                                          region_zero_shot_accuracy, register_model_configs,
                                          zero_shot_accuracy)
from vild.synthetic.shapes import CATEGORY_NAMES, NOVEL_NAMES
from vild.synthetic.world import generate_world


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("teacher")
    kw = dict(seed=3, steps=25, batch_size=16, lr=2e-3, warmup=3, num_pairs=16, eval_samples=0)
    return d, pretrain_teacher(str(d / "a.pt"), **kw), pretrain_teacher(str(d / "b.pt"), **kw)


def test_loss_decreases(trained):
    _, m, _ = trained
    assert m["loss_last"] < 0.7 * m["loss_first"], m


def test_weights_load_by_path_and_are_deterministic(trained):
    d, _, _ = trained
    register_model_configs()
    a = open_clip.create_model(MODEL_NAME, pretrained=str(d / "a.pt")).eval()
    b = open_clip.create_model(MODEL_NAME, pretrained=str(d / "b.pt")).eval()
    rand = open_clip.create_model(MODEL_NAME, pretrained=None).eval()
    sd = torch.load(d / "a.pt", weights_only=True)
    assert all(torch.equal(sd[k], v) for k, v in a.state_dict().items())
    x = torch.rand(4, 3, 32, 32)
    tok = open_clip.get_tokenizer(MODEL_NAME)(["a photo of a star.", "a red ring."])
    with torch.no_grad():
        assert torch.equal(a.encode_image(x), b.encode_image(x))  # same seed, same weights
        assert torch.equal(a.encode_text(tok), b.encode_text(tok))
        assert not torch.allclose(a.encode_image(x), rand.encode_image(x))


def test_clip_loss_prefers_matching_pairs():
    f = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    scale = torch.tensor(20.0)
    assert clip_loss(f, f, scale) < clip_loss(f, f.roll(1, 0), scale)


def test_caption_dataset_is_deterministic_and_names_the_shape():
    a_img, a_cap, a_lab = make_caption_dataset(30, seed=5)
    b_img, b_cap, b_lab = make_caption_dataset(30, seed=5)
    assert np.array_equal(a_img, b_img) and a_cap == b_cap and np.array_equal(a_lab, b_lab)
    assert a_img.shape == (30, 32, 32, 3) and a_img.dtype == np.uint8
    from vild.synthetic.shapes import CATEGORIES
    for cap, lab in zip(a_cap, a_lab):
        assert any(s in cap for s in CATEGORIES[lab].synonyms), cap
    assert not np.array_equal(a_img, make_caption_dataset(30, seed=6)[0])


class _OracleTeacher:
    """Embeds each world box as the one-hot of its true (or shifted) category."""

    def __init__(self, lvis_json, shift=0):
        data = json.loads(Path(lvis_json).read_text())
        names = {c["id"]: c["name"] for c in data["categories"]}
        self.label = {tuple(a["bbox"][:2] + [a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]):
                      CATEGORY_NAMES.index(names[a["category_id"]]) for a in data["annotations"]}
        self.shift, self.k = shift, len(CATEGORY_NAMES)

    def encode_text(self, names):
        return torch.eye(self.k)[: len(names)]

    def embed_regions(self, images, boxes_list):
        return [torch.eye(self.k)[[(self.label[tuple(b.tolist())] + self.shift) % self.k
                                   for b in boxes]] for boxes in boxes_list]


def test_zero_shot_accuracy_on_world_boxes(tmp_path, trained):
    world = generate_world(str(tmp_path / "w"), seed=2, num_train=2, num_val=6)
    perfect = zero_shot_accuracy(_OracleTeacher(world["lvis_val"]), world)
    assert perfect["all"] == perfect["base"] == perfect["novel"] == 1.0
    assert perfect["n"] == len(json.loads(Path(world["lvis_val"]).read_text())["annotations"])
    assert zero_shot_accuracy(_OracleTeacher(world["lvis_val"], shift=1), world)["all"] == 0.0
    d, _, _ = trained  # the real CLIPTeacher path runs end to end on saved weights
    real = region_zero_shot_accuracy(str(d / "a.pt"), world, cache_dir=str(tmp_path / "cache"))
    assert real["n"] == perfect["n"] and 0.0 <= real["all"] <= 1.0
    assert set(NOVEL_NAMES) < set(CATEGORY_NAMES)


def test_train_clip_scores_an_existing_teacher_on_any_novel_group(world, tmp_path, monkeypatch):
    """vild-train-clip --teacher: no pretraining; novel group from the JSON's frequency, or by name."""
    from vild.cli.train_clip import run as train_clip
    monkeypatch.setenv("VILD_CACHE", str(tmp_path / "cache"))
    teacher = str(Path(__file__).parent / "assets" / "demo_model" / "vild-tiny-clip.pt")
    out = tmp_path / "never_written.pt"
    default = train_clip(["--teacher", teacher, "--world", world["world_info"], "--out", str(out)])
    assert sorted(default["novel_names"]) == sorted(NOVEL_NAMES) and not out.exists()
    chosen = train_clip(["--teacher", teacher, "--world", world["lvis_val"], "--novel", "circle,square"])
    assert chosen["novel_names"] == ["circle", "square"]
    assert chosen["region_acc_all"] == default["region_acc_all"]  # the same boxes, grouped otherwise
    assert chosen["region_acc_novel"] != default["region_acc_novel"]
    n_novel = sum(a["category_id"] in (1, 2) for a in json.loads(Path(world["lvis_val"]).read_text())["annotations"])
    n = chosen["region_acc_n"]
    mixed = (chosen["region_acc_novel"] * n_novel + chosen["region_acc_base"] * (n - n_novel)) / n
    assert mixed == pytest.approx(chosen["region_acc_all"])
    with pytest.raises(ValueError, match="not categories"):
        train_clip(["--teacher", teacher, "--world", world["lvis_val"], "--novel", "unicorn"])
