"""The demo's trained ViLD and ViLD-ensemble, shipped in tests/assets/demo_model, find novel categories they
never saw a box of, and what they show at vild-detect's defaults is mostly real.

The models were trained on base shapes only by ``vild-demo --iters 6000 --train-teacher --teacher-steps 3000``,
calibrated by it (region mean, confidence, display threshold, and the ensemble's image-head null) and exported with
``--export tests/assets/demo_model``. The images here come from a world with another seed, so the models have seen
none of them; benchmarks/trust.py measures the same on 60-image worlds of seeds 11, 5 and this one (2026).
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


# What each shipped model must show at vild-detect's defaults with the novel names only, on these 40 images: the goal
# of trustworthy output, precision 0.6, recall 0.7, at most 0.1 boxes per image on names absent from it, and
# precision 0.5 per category. ViLD measured 0.91 / 0.88 / 0.05 and finds every arrow, heart and ring but half the
# stars (6 of 12), so its recall per category is held to 0.4; ViLD-ensemble,
# its image head abstaining under its calibrated null, 0.85 / 0.73 / 0.10, its weakest categories arrow and star
# (7 of 12 each) and its weakest precision arrow's (7 of 9)
BOUNDS = {
    "model.pth": {"precision": 0.6, "recall": 0.7, "absent": 0.1, "category_precision": 0.5, "category_recall": 0.4},
    "model_ensemble.pth": {"precision": 0.6, "recall": 0.7, "absent": 0.1, "category_precision": 0.5,
                           "category_recall": 0.5},
}


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> dict:
    return generate_world(str(tmp_path_factory.mktemp("held_out")), seed=2026, num_train=0, num_val=40,
                          image_size=128)


def _detect(weights: Path, names: list[str], world: dict, out: Path) -> list[dict]:
    rc = detect_main(["--weights", str(weights), "--vocab", ",".join(names), "--input", world["images_val"],
                      "--output", str(out), "--json", "--coco-gt", world["coco_val"], "--device", "cpu"])
    assert rc == 0
    return json.loads((out / "detections.json").read_text())


@pytest.mark.parametrize("model", list(BOUNDS))
def test_detect_py_shows_novel_categories_on_held_out_images_and_little_else(held_out, tmp_path, model):
    ckpt = load_checkpoint(ASSET / model)
    trained_on = {s for syns in ckpt["vocabulary"] for s in syns}
    assert trained_on.isdisjoint(NOVEL_NAMES)  # not one novel box in training
    assert {"score_thresh", "confidence"} <= set(ckpt["calibration"])  # the demo calibrated it
    assert ("image_null" in ckpt["calibration"]) == (ckpt["cfg"]["MODEL"]["VILD"]["VARIANT"] == "ensemble")
    gt = json.loads(Path(held_out["coco_val"]).read_text())
    counts = match_coco(gt, _detect(ASSET / model, list(NOVEL_NAMES), held_out, tmp_path / "novel"), list(NOVEL_NAMES))
    summary, bounds = json.dumps(counts.summary(), indent=1), BOUNDS[model]
    assert counts.precision() >= bounds["precision"] and counts.recall() >= bounds["recall"], summary
    assert counts.absent_per_image() <= bounds["absent"], summary
    for name in NOVEL_NAMES:  # no name carries the totals (12 objects of each)
        assert counts.precision(name) >= bounds["category_precision"], summary
        assert counts.recall(name) >= bounds["category_recall"], summary
    assert len(list((tmp_path / "novel").glob("*.png"))) == len(gt["images"])  # one annotated picture per input
    # with every name asked for, the novel objects are found as well and as cleanly: a subset of the names
    # shows what all of them show, restricted to the subset
    every_name = list(NOVEL_NAMES) + ["|".join(syns) for syns in ckpt["vocabulary"]]  # the training synonyms too
    every = match_coco(gt, _detect(ASSET / model, every_name, held_out, tmp_path / "all"), list(NOVEL_NAMES))
    assert (every.precision(), every.recall()) == (counts.precision(), counts.recall()), \
        json.dumps(every.summary(), indent=1)
