"""The demo's trained ViLD, shipped in tests/assets/demo_model, finds novel categories it never saw a box of.

The model was trained by ``make demo`` on base shapes only, calibrated by it (region mean, display
threshold) and exported with ``python tools/demo.py --export tests/assets/demo_model``; these images
come from a world with another seed, so the model has seen none of them.
"""
import json
from pathlib import Path

import pytest

from vild.cli.detect import main as detect_main
from vild.engine.checkpoint import load_checkpoint
from vild.evaluation.matching import match_coco
from vild.synthetic.world import NOVEL_NAMES, generate_world

pytestmark = pytest.mark.usefixtures("one_thread")

ASSET = Path(__file__).resolve().parent / "assets" / "demo_model"
# Bounds under what the asset measured on these 40 images at vild-detect's defaults (benchmarks/trust.py
# measures the same on a larger world): what it shows must stay mostly real, and find a share of each shape.
MIN_PRECISION, MIN_RECALL = 0.2, 0.3
MIN_CATEGORY_PRECISION, MIN_CATEGORY_RECALL = 0.1, 0.1
MAX_ABSENT_PER_IMAGE = 2.0


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> dict:
    return generate_world(str(tmp_path_factory.mktemp("held_out")), seed=2026, num_train=0, num_val=40,
                          image_size=128)


def test_detect_py_finds_novel_categories_on_held_out_images(held_out, tmp_path):
    ckpt = load_checkpoint(ASSET / "model.pth")
    trained_on = {s for syns in ckpt["vocabulary"] for s in syns}
    assert trained_on.isdisjoint(NOVEL_NAMES)  # not one novel box in training
    assert "score_thresh" in ckpt["calibration"]  # the demo calibrated it
    out = tmp_path / "det"
    rc = detect_main(["--weights", str(ASSET / "model.pth"), "--vocab", ",".join(NOVEL_NAMES),
                      "--input", held_out["images_val"], "--output", str(out), "--json",
                      "--coco-gt", held_out["coco_val"], "--device", "cpu"])
    assert rc == 0
    gt = json.loads(Path(held_out["coco_val"]).read_text())
    dets = json.loads((out / "detections.json").read_text())
    counts = match_coco(gt, dets, list(NOVEL_NAMES))
    summary = json.dumps(counts.summary(), indent=1)
    assert counts.precision() >= MIN_PRECISION and counts.recall() >= MIN_RECALL, summary
    assert counts.absent_per_image() <= MAX_ABSENT_PER_IMAGE, summary
    for name in NOVEL_NAMES:  # no single name carries the totals
        assert counts.precision(name) >= MIN_CATEGORY_PRECISION, summary
        assert counts.recall(name) >= MIN_CATEGORY_RECALL, summary
    assert len(list(out.glob("*.png"))) == len(gt["images"])  # one annotated picture per input
