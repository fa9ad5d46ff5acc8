"""Shared fixtures: one small synthetic world per test session (plus a COCO-OVD-named copy)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from vild.synthetic.world import generate_world

# tests/gpu needs CUDA: it runs on GPU machines (`make test-gpu`) and is not collected elsewhere
collect_ignore = [] if torch.cuda.is_available() else ["gpu"]

# synthetic shapes → COCO names: base shapes to OVD base names, novel shapes (arrow, heart, ring,
# star) to OVD novel names, and two shapes to classes the OVD split drops
COCO_NAME = {
    "circle": "person", "square": "car", "triangle": "traffic light", "star": "cat", "heart": "dog",
    "cross": "bicycle", "crescent": "kite", "ring": "umbrella", "arrow": "bus", "diamond": "bottle",
    "ellipse": "chair", "semicircle": "stop sign", "hourglass": "tv", "bolt": "laptop",
}
DROPPED = {"traffic light", "stop sign"}


@pytest.fixture(scope="session", autouse=True)
def isolated_text_cache(tmp_path_factory):
    """Detectors cache text embeddings in $VILD_CACHE (else ~/.cache/vild): keep the tests' out of $HOME."""
    before = os.environ.get("VILD_CACHE")
    os.environ["VILD_CACHE"] = str(tmp_path_factory.mktemp("vild_cache"))
    yield os.environ["VILD_CACHE"]
    if before is None:
        os.environ.pop("VILD_CACHE", None)
    else:
        os.environ["VILD_CACHE"] = before


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> dict:
    """The synthetic world (24 train / 12 val images, 128 px), generated once per session."""
    return generate_world(str(tmp_path_factory.mktemp("world")), seed=0, num_train=24, num_val=12, image_size=128)


@pytest.fixture(scope="session")
def coco_ovd_world(world) -> dict:
    """The world's COCO files with categories renamed to COCO names, so the 48/17 split applies."""
    out = {}
    for split in ("train", "val"):
        data = json.loads(Path(world[f"coco_{split}"]).read_text())
        for c in data["categories"]:
            c["name"] = COCO_NAME[c["name"]]
        path = Path(world["out_dir"]) / f"coco_ovd_{split}.json"
        path.write_text(json.dumps(data))
        out[f"coco_{split}"] = str(path)
        out[f"images_{split}"] = world[f"images_{split}"]
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models' ops are too small to split over threads; on a busy 2-core box the thread pool's
    syncing made a forward pass ~100x slower (1.5 s vs 0.015 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny ViLD checkpoint with a saved micro teacher (see tests/test_api.py)."""
    from helpers import make_checkpoint
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict:
    """Test images of every awkward kind (see tests/test_api.py)."""
    from helpers import write_test_images
    return write_test_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """A fixed micro teacher saved to disk, so every process (and torchrun rank) loads the same weights."""
    from vild.teacher import CLIPTeacher
    d = tmp_path_factory.mktemp("train")
    torch.manual_seed(0)
    CLIPTeacher("vild-test-micro", "", templates="simple").save_weights(d / "teacher.pt")
    return d
