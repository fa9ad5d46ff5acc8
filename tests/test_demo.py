"""The demo's fast variant as an end-to-end smoke test: every stage runs and writes its outputs."""
import json

import torch

from vild.engine.checkpoint import load_checkpoint
from vild import Detector
from vild.synthetic.demo import (SHIPPED_TEACHER, SHIPPED_TEACHER_KEY, VARIANTS, DemoSettings, export_demo_model,
                                 export_backbone, make_teacher, make_world, run_demo)


def test_fast_demo_runs_every_stage(tmp_path):
    out, results = tmp_path / "demo", tmp_path / "results"
    summary = run_demo(out, DemoSettings.fast(), results_dir=results, picture=tmp_path / "novel.png")
    assert (out / "world" / "lvis_train.json").is_file() and (out / "world" / "coco_val.json").is_file()
    assert (out / "teacher" / "vild-tiny-clip.pt").is_file()
    assert (out / "clip_proposals" / "meta.json").is_file()
    for folder in ("vild_text", "vild", "vild_ensemble", "oracle"):
        ckpt = load_checkpoint(out / folder / "model_final.pth")
        assert ckpt["iteration"] == DemoSettings.fast().detector_iters
        # calibrated after training; only ViLD-ensemble's image head has no background and may get a null
        assert "image_null" not in ckpt["calibration"] or folder == "vild_ensemble"
    assert len(load_checkpoint(out / "oracle" / "model_final.pth")["vocabulary"]) > \
        len(load_checkpoint(out / "vild" / "model_final.pth")["vocabulary"])  # the oracle also sees novel boxes
    assert set(summary["rows"]) == set(VARIANTS)
    saved = json.loads((results / "demo_synthetic.json").read_text())
    assert saved["rows"] == summary["rows"] and "APr_mask" in saved["rows"]["ViLD"]
    assert "| ViLD-ensemble |" in (results / "demo_synthetic.md").read_text()
    assert (tmp_path / "novel.png").stat().st_size > 1000
    # a second run reuses every cached stage
    again = run_demo(out, DemoSettings.fast(), results_dir=results)
    assert again["rows"] == summary["rows"] and again["seconds"]["total"] < summary["seconds"]["total"]
    assert all(r["train_seconds"] > 0 for r in summary["rows"].values())
    # the store's cost is part of ViLD's: its training seconds exceed the step time alone
    assert summary["rows"]["ViLD"]["train_seconds"] > json.loads(
        (out / "vild" / "demo_metrics.json").read_text())["train_seconds"]

    # F-VLM is one more row: the cached stages stay, only F-VLM trains, and its table goes beside the default one
    with_fvlm = DemoSettings.fast()
    with_fvlm.fvlm = True
    more = run_demo(out, with_fvlm, results_dir=results)
    assert list(more["rows"]) == [*VARIANTS, "F-VLM"]
    assert {k: v for k, v in more["rows"].items() if k != "F-VLM"} == summary["rows"]
    assert load_checkpoint(out / "fvlm" / "model_final.pth")["iteration"] == with_fvlm.detector_iters
    assert "| F-VLM |" in (results / "demo_synthetic_fvlm.md").read_text()
    assert set(more["checks"]) >= {"fvlm_novel_ap50_above_vild", "fvlm_training_at_most_half_of_vild"}
    assert json.loads((results / "demo_synthetic.json").read_text())["rows"] == summary["rows"]  # left as it was

    # a trained detector's backbone body is what a new detector starts from
    body = export_backbone(out / "vild_text" / "model_final.pth", tmp_path / "body.pt")
    trained = load_checkpoint(out / "vild_text" / "model_final.pth")["model"]
    assert {f"backbone.body.{k}" for k in torch.load(body, weights_only=True)} == \
        {k for k in trained if k.startswith("backbone.body.")}

    # the exported model (weights-only, fp16) loads from its own folder alone and detects like the original
    exported = export_demo_model(out, tmp_path / "export")
    assert export_demo_model(out, tmp_path / "export", "vild_ensemble") == tmp_path / "export" / "model_ensemble.pth"
    ensemble = tmp_path / "export" / "model_ensemble.pth"
    assert Detector.from_checkpoint(ensemble, device="cpu").abstain == ("image_null" in
                                                                        load_checkpoint(ensemble)["calibration"])
    ckpt = load_checkpoint(exported)
    assert "optimizer" not in ckpt and "rng" not in ckpt
    assert all(v.dtype.is_floating_point is False or v.dtype == torch.float16 for v in ckpt["model"].values())
    (out / "teacher" / "vild-tiny-clip.pt").rename(tmp_path / "moved.pt")  # only the exported copy remains
    img = str(next((out / "world" / "images" / "val").glob("*.png")))
    a = Detector.from_checkpoint(exported, device="cpu", score_thresh=0.0)(img)
    assert len(a.boxes) > 0 and a.masks.shape[0] == len(a.boxes)


def test_demo_starts_from_the_shipped_teacher_and_reuses_it(tmp_path):
    s = DemoSettings.fast()
    s.train_teacher = False
    world = make_world(tmp_path, s)
    path, metrics = make_teacher(tmp_path, s, world)
    assert path.read_bytes() == SHIPPED_TEACHER.read_bytes()
    assert metrics["train"] == {"shipped": SHIPPED_TEACHER_KEY}
    assert 0.0 <= metrics["zero_shot_val_boxes"]["all"] <= 1.0 and metrics["zero_shot_val_boxes"]["n"] > 0
    stamp = path.stat().st_mtime_ns
    assert make_teacher(tmp_path, s, world) == (path, metrics) and path.stat().st_mtime_ns == stamp


def test_a_demo_folder_refuses_a_run_of_other_settings(tmp_path):
    import pytest

    from vild.synthetic.demo import _check_settings
    _check_settings(tmp_path, DemoSettings.fast())
    _check_settings(tmp_path, DemoSettings.fast())  # the same settings reuse the folder
    with pytest.raises(ValueError, match="--recompute"):
        _check_settings(tmp_path, DemoSettings.full())
    older = tmp_path / "older"  # trained detectors but no record of their settings
    (older / "vild").mkdir(parents=True)
    (older / "vild" / "model_final.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown settings"):
        _check_settings(older, DemoSettings())
