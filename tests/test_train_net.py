"""End to end through tools/train_net.py: train, checkpoint, resume, evaluate, 2-process torchrun, store precompute."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import torch

from vild.engine.checkpoint import load_checkpoint
from vild.engine.curves import PANEL_H, panels, read_metrics
from vild.cli.train import run as train_main
from vild.cli.precompute import run as precompute_main


from helpers import resumed_at, world_opts  # noqa: E402,F401


def test_train_eval_and_outputs(world, teacher_file):
    out = teacher_file / "text"
    results = train_main(["--config", "tiny_test.yaml", *world_opts(world, out)])
    assert (out / "model_final.pth").is_file() and (out / "model_0000002.pth").is_file()
    assert (out / "config.yaml").is_file() and list((out / "tensorboard").glob("events.*"))
    lines = [json.loads(l, parse_constant=_no_nan) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["iteration"] for l in lines if "total_loss" in l] == [1, 2, 3, 4]
    metrics = results["synth_val"]
    assert {"bbox", "segm"} <= set(metrics) and "APr" in metrics["bbox"]
    assert (out / "inference" / "synth_val" / "metrics.json").is_file()
    curves = cv2.imread(str(out / "training_curves.png"))  # losses, lr and the final evaluation, drawn
    assert curves is not None and curves.shape[0] >= 2 * PANEL_H
    assert {"total_loss", "lr", "synth_val/bbox", "synth_val/segm"} <= {t for t, _ in panels(read_metrics(
        out / "metrics.jsonl"))}
    ckpt = load_checkpoint(out / "model_final.pth")
    assert ckpt["iteration"] == 4 and ckpt["teacher"]["sha256"] and ckpt["cfg"]["MODEL"]["VILD"]["VARIANT"] == "text"
    assert len(ckpt["vocabulary"]) == len(world["base_names"])  # novel categories are not in training
    # --eval-only on the saved weights gives the same numbers
    again = train_main(["--config", "tiny_test.yaml", "--eval-only",
                        *world_opts(world, teacher_file / "eval", **{"MODEL.WEIGHTS": str(out / "model_final.pth")})])
    assert again["synth_val"]["bbox"]["AP"] == pytest.approx(metrics["bbox"]["AP"], nan_ok=True)
    # without MODEL.WEIGHTS: the newest checkpoint of OUTPUT_DIR, as the help says; none there is an error
    latest = train_main(["--config", "tiny_test.yaml", "--eval-only", *world_opts(world, out)])
    assert latest["synth_val"]["bbox"]["AP"] == pytest.approx(metrics["bbox"]["AP"], nan_ok=True)
    with pytest.raises(SystemExit, match="nothing to evaluate"):
        train_main(["--config", "tiny_test.yaml", "--eval-only", *world_opts(world, teacher_file / "empty")])
    # weights distilled from one CLIP are not evaluated against another's text embeddings
    from vild.teacher import CLIPTeacher
    torch.manual_seed(1)
    other = teacher_file / "other_teacher.pt"
    CLIPTeacher("vild-test-micro", "", templates="simple").save_weights(other)
    with pytest.raises(ValueError, match="made with teacher.*TEACHER.PRETRAINED"):
        train_main(["--config", "tiny_test.yaml", "--eval-only", *world_opts(
            world, teacher_file / "eval2", **{"MODEL.WEIGHTS": str(out / "model_final.pth"),
                                              "TEACHER.PRETRAINED": str(other)})])


def _no_nan(name):
    raise ValueError(f"metrics.jsonl holds {name}, which is not JSON")


def test_precompute_store_then_distill_and_resume_matches_uninterrupted(world, teacher_file):
    store = teacher_file / "store"
    base_opts = world_opts(world, teacher_file / "unused")
    stats = precompute_main(["--config", "tiny_test.yaml", "--weights", str(teacher_file / "text" / "model_final.pth"),
                             "--output", str(store), "--max-proposals", "20", *base_opts])
    assert stats["written"] == world["num_train"]
    again = precompute_main(["--config", "tiny_test.yaml", "--weights", str(teacher_file / "text" / "model_final.pth"),
                             "--output", str(store), "--max-proposals", "20", *base_opts])
    assert again["written"] == 0  # everything was committed: a re-run resumes with nothing to do

    def run(out, resume=False):
        args = ["--config", "tiny_test.yaml", *world_opts(world, out, "vild", max_iter=4, **{
            "DATASETS.PROPOSAL_STORE": str(store), "DATASETS.TEST": []})]
        return train_main(args + [] if not resume else ["--resume", *args])

    full, part = teacher_file / "full", teacher_file / "part"
    run(full)
    part.mkdir()
    shutil.copy(full / "model_0000002.pth", part / "model_0000002.pth")  # as if killed after iteration 2
    run(part, resume=True)
    assert resumed_at(part) == [2]  # continued from the checkpoint: a silent restart from 0 would also match weights
    assert [m["iteration"] for m in map(json.loads, (part / "metrics.jsonl").read_text().splitlines())] == [3, 4]
    a = load_checkpoint(full / "model_final.pth")["model"]
    b = load_checkpoint(part / "model_final.pth")["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
    lines = [json.loads(l) for l in (full / "metrics.jsonl").read_text().splitlines()]
    assert all(l["loss_distill"] > 0 for l in lines if "loss_distill" in l) and lines


def test_precompute_leaves_an_unreadable_image_pending_in_its_own_shard(world, teacher_file, tmp_path):
    """Shard 0's first image is unreadable; the next image belongs to shard 1 and must not stand in for it."""
    images = tmp_path / "images"
    shutil.copytree(world["images_train"], images)
    first = sorted(json.loads(Path(world["lvis_train"]).read_text())["images"], key=lambda im: im["id"])[0]
    bad = images / Path(first.get("file_name") or first["coco_url"]).name
    good = bad.read_bytes()
    bad.write_bytes(b"not an image")
    custom = {"synth_train": {"JSON": world["lvis_train"], "IMAGES": str(images), "TYPE": "lvis", "SPLIT": "lvis"}}
    args = ["--config", "tiny_test.yaml", "--weights", str(teacher_file / "text" / "model_final.pth"),
            "--output", str(tmp_path / "store"), "--max-proposals", "20", "--shard", "0", "--num-shards", "2",
            # loader workers: an unreadable image crosses the process boundary as None, one image per task
            *world_opts(world, teacher_file / "unused", **{"DATASETS.CUSTOM": custom, "DATALOADER.NUM_WORKERS": 2})]
    stats = precompute_main(args)
    shard0 = (world["num_train"] + 1) // 2
    assert (stats["written"], stats["unreadable"]) == (shard0 - 1, 1)
    assert precompute_main(args)["unreadable"] == 1  # still pending on a re-run
    bad.write_bytes(good)
    assert precompute_main(args)["written"] == 1


def test_torchrun_two_processes_on_cpu(world, teacher_file):
    """``--num-gpus 2`` re-launches training under ``torchrun --standalone``: DDP over gloo on the CPU. Started
    as ``main(argv)`` from Python, whose own command line says nothing of training."""
    out = teacher_file / "ddp"
    scratch = teacher_file / "ddp_tmp"  # torchrun's own log folders (torchelastic_*) land here, not in /tmp
    scratch.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TMPDIR": str(scratch)}
    argv = ["--num-gpus", "2", "--config", "tiny_test.yaml",
            *world_opts(world, out, max_iter=3, **{"SOLVER.CHECKPOINT_PERIOD": 100, "SOLVER.IMS_PER_BATCH": 4,
                                                    "MODEL.BACKBONE.NORM": "SyncBN"})]  # CUDA-only: plain BN here
    cmd = [sys.executable, "-c", f"from vild.cli.train import run; run({argv!r})", "--unrelated-flag"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout and "SyncBN runs on CUDA only" in proc.stdout + proc.stderr
    assert sorted(p.name for p in out.glob("model_*.pth")) == ["model_final.pth"]
    ckpt = load_checkpoint(out / "model_final.pth")
    assert ckpt["iteration"] == 3
    # each rank's own random stream is saved, so a resumed run does not give every rank rank 0's
    assert len(ckpt["rng"]) == 2 and not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])
    metrics = json.loads((out / "inference" / "synth_val" / "metrics.json").read_text())
    assert "bbox" in metrics
    # both ranks' predictions reached rank 0: every val image has results
    res = json.loads((out / "inference" / "synth_val" / "results_bbox.json").read_text())
    assert len({r["image_id"] for r in res}) == world["num_val"]


def test_bf16_autocast_and_non_finite_loss_stop(world, teacher_file, monkeypatch):
    out = teacher_file / "bf16"
    train_main(["--config", "tiny_test.yaml", *world_opts(world, out, max_iter=2, **{
        "SOLVER.AMP": "bf16", "DATASETS.TEST": []})])
    assert load_checkpoint(out / "model_final.pth")["iteration"] == 2
    with pytest.raises(FloatingPointError, match="non-finite.*BASE_LR"):
        train_main(["--config", "tiny_test.yaml", *world_opts(world, teacher_file / "nan", max_iter=2, **{
            "SOLVER.BASE_LR": 1e30, "SOLVER.WARMUP_ITERS": 0, "DATASETS.TEST": []})])
    # checked on a step that only checkpoints too: the step whose loss is non-finite saves nothing
    out = teacher_file / "nan_ckpt"
    with pytest.raises(FloatingPointError, match="non-finite") as e:
        train_main(["--config", "tiny_test.yaml", *world_opts(world, out, max_iter=4, **{
            "SOLVER.BASE_LR": 1e30, "SOLVER.WARMUP_ITERS": 0, "DATASETS.TEST": [], "SOLVER.LOG_PERIOD": 100,
            "SOLVER.CHECKPOINT_PERIOD": 1})])
    failed_at = int(str(e.value).split("by iteration ")[1].split(":")[0])
    assert failed_at < 4 and [load_checkpoint(p)["iteration"] for p in sorted(out.glob("model_*.pth"))] == list(
        range(1, failed_at))


def test_atomic_save_leaves_no_temp_file_and_normal_permissions(tmp_path):
    from vild.engine.checkpoint import atomic_save
    atomic_save({"model": {"w": torch.ones(2)}}, tmp_path / "m.pth")
    assert [p.name for p in tmp_path.iterdir()] == ["m.pth"]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "m.pth").stat().st_mode & 0o777 == 0o666 & ~umask
    assert torch.equal(load_checkpoint(tmp_path / "m.pth")["model"]["w"], torch.ones(2))


def test_build_optimizer_sgd_adamw_and_unknown():
    from vild.config import load_config
    from vild.engine.trainer import build_optimizer
    from vild.modeling import build_model
    model = build_model(load_config("tiny_test.yaml"))
    for name, cls in (("SGD", torch.optim.SGD), ("AdamW", torch.optim.AdamW)):
        cfg = load_config("tiny_test.yaml", ["SOLVER.OPTIMIZER", name, "SOLVER.BASE_LR", "0.001"])
        opt = build_optimizer(cfg, model)
        assert isinstance(opt, cls) and opt.param_groups[0]["lr"] == 0.001
        assert opt.param_groups[1]["weight_decay"] == 0.0  # norms and biases are not decayed
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER"):
        build_optimizer(load_config("tiny_test.yaml", ["SOLVER.OPTIMIZER", "Lion"]), model)


def test_datasets_over_the_same_images_share_one_inference_pass(world, teacher_file, monkeypatch):
    import vild.data
    calls = []
    real = vild.data.build_test_loader
    monkeypatch.setattr(vild.data, "build_test_loader", lambda cfg, ds: calls.append(ds.name) or real(cfg, ds))
    weights = str(teacher_file / "text" / "model_final.pth")
    opts = world_opts(world, teacher_file / "shared_eval", **{"MODEL.WEIGHTS": weights})
    i = opts.index("DATASETS.CUSTOM")
    custom = eval(opts[i + 1])
    custom["synth_val_coco"] = {**custom["synth_val"], "TYPE": "coco"}  # the same JSON, scored by pycocotools
    opts[i + 1] = repr(custom)
    opts[opts.index("DATASETS.TEST") + 1] = repr(["synth_val", "synth_val_coco"])
    both = train_main(["--config", "tiny_test.yaml", "--eval-only", *opts])
    assert len(calls) == 1 and list(both) == ["synth_val", "synth_val_coco"]
    assert "APr" in both["synth_val"]["bbox"] and "AP50_novel" in both["synth_val_coco"]["bbox"]
    # the same numbers as a pass of its own
    opts[opts.index("DATASETS.TEST") + 1] = repr(["synth_val_coco"])
    alone = train_main(["--config", "tiny_test.yaml", "--eval-only", *opts])
    for kind in ("bbox", "segm"):  # (NaN-aware: APl is NaN on 128-pixel images)
        assert alone["synth_val_coco"][kind] == pytest.approx(both["synth_val_coco"][kind], nan_ok=True)


def test_vild_text_with_a_store_in_its_config_opens_no_store(world, teacher_file, monkeypatch):
    """Only a distilling variant reads CLIP proposals: ViLD-text with DATASETS.PROPOSAL_STORE set opens nothing."""
    import vild.data.proposal_store as store_mod
    from vild.config import load_config
    from vild.engine.trainer import Trainer
    opened = []
    monkeypatch.setattr(store_mod.ProposalStore, "__init__", lambda self, *a, **k: opened.append(a))
    cfg = load_config("tiny_test.yaml", world_opts(world, teacher_file / "text_store", variant="text",
                                                   **{"DATASETS.PROPOSAL_STORE": str(teacher_file / "no_store")}))
    ds = Trainer(cfg).train_dataset()
    assert not opened and ds.proposal_store is None
    item = ds[0][1]
    assert len(item.get("proposal_boxes", [])) == 0


def test_evaluation_during_training_passes_each_datasets_vocabulary_and_leaves_the_installed_one(world, teacher_file,
                                                                                                  monkeypatch):
    """The training vocabulary stays installed (the same tensors, the same values) through the evaluations, which
    score each test set's own categories, novel ones too, passed per call."""
    import torch.nn.functional as F

    import vild.engine.inference as inference
    from vild.config import load_config
    from vild.data import build_dataset
    from vild.engine.trainer import Trainer
    seen = []
    real = inference.inference_on_dataset

    def spy(model, loader, evaluators, device, autocast, settings=None, vocabulary=None):
        installed = model.roi_heads.classifier.installed_vocabulary
        values = [t.clone() for t in installed]
        out = real(model, loader, evaluators, device, autocast, settings, vocabulary)
        seen.append((vocabulary, installed, values, model.roi_heads.classifier.installed_vocabulary))
        return out
    monkeypatch.setattr(inference, "inference_on_dataset", spy)
    cfg = load_config("tiny_test.yaml", world_opts(world, teacher_file / "eval_vocab", max_iter=2,
                                                   **{"TEST.EVAL_PERIOD": 1}))
    trainer = Trainer(cfg)
    results = trainer.train()
    assert len(seen) == 2 and "APr" in results["synth_val"]["bbox"]  # after iteration 1, and the final one
    val = build_dataset(cfg, "synth_val", train=False, masks=False)
    want = F.normalize(trainer.teacher.encode_text(val.category_names).float(), dim=-1)
    for vocabulary, installed, values, after in seen:
        assert all(a is b for a, b in zip(after, installed)) and all(map(torch.equal, after, values))
        assert len(installed.text_embeddings) == len(trainer.vocabulary) < len(val.category_names)
        assert torch.allclose(vocabulary.text_embeddings, want) and vocabulary.base_mask.tolist() == val.base_mask
        assert not all(val.base_mask)  # the novel categories are scored too
    assert all(a is b for a, b in zip(seen[0][1], seen[1][1]))  # nothing was installed between the evaluations
