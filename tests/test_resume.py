"""Resuming: the iteration a resumed run starts at, unreadable newest checkpoints, stale temp files, metrics.jsonl
without replayed lines, how many checkpoints stay, and flags anywhere on the command line."""
import json
import shutil

import pytest
import torch
from helpers import resumed_at, world_opts

from vild.engine.checkpoint import load_checkpoint
from vild.cli.train import run as train_main
from vild.cli.train import train_argument_parser
from vild.config import parse_args_with_overrides


def _run(world, out, *flags, **extra):
    opts = world_opts(world, out, max_iter=6, **{"DATASETS.TEST": [], **extra})
    return train_main(["--config", "tiny_test.yaml", *opts, *flags])  # flags after the overrides


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_truncated_newest_checkpoint_falls_back_with_stale_temp_removed_and_no_replayed_metrics(world,
                                                                                               teacher_file):  # noqa: F811
    """As if killed while writing model_0000006 after a cut-off model_0000004: the run goes on from iteration 2."""
    full, part = teacher_file / "resume_full", teacher_file / "resume_part"
    _run(world, full)
    assert sorted(p.name for p in full.glob("model_*.pth")) == [
        "model_0000002.pth", "model_0000004.pth", "model_final.pth"]  # SOLVER.KEEP_CHECKPOINTS 0 keeps all
    part.mkdir()
    shutil.copy(full / "metrics.jsonl", part / "metrics.jsonl")  # holds iterations 1..6: 3..6 get replayed
    with open(part / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 7, "total_lo')  # a line cut off by the kill
    shutil.copy(full / "model_0000002.pth", part / "model_0000002.pth")
    good = (full / "model_0000004.pth").read_bytes()
    (part / "model_0000004.pth").write_bytes(good[: len(good) // 2])  # truncated
    stale = part / ".model_0000006.pth.k2j4x9.tmp"
    stale.write_bytes(good[:1000])
    _run(world, part, "--resume", **{"SOLVER.KEEP_CHECKPOINTS": 1})
    log = (part / "log.txt").read_text()
    assert "model_0000004.pth cannot be read" in log and "resuming from model_0000002.pth instead" in log
    assert resumed_at(part) == [2]  # continued, not restarted
    assert not stale.exists() and ".model_0000006.pth.k2j4x9.tmp" in log
    # SOLVER.KEEP_CHECKPOINTS 1: the rewritten model_0000004 replaced model_0000002
    assert sorted(p.name for p in part.glob("model_*.pth")) == ["model_0000004.pth", "model_final.pth"]
    assert "removed model_0000002.pth (SOLVER.KEEP_CHECKPOINTS 1)" in log
    rows = [m for m in _metrics(part) if "total_loss" in m]
    assert [m["iteration"] for m in rows] == [1, 2, 3, 4, 5, 6]
    a = load_checkpoint(full / "model_final.pth")["model"]
    b = load_checkpoint(part / "model_final.pth")["model"]
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k


def test_no_readable_checkpoint_is_a_one_line_error_naming_it(world, teacher_file):  # noqa: F811
    out = teacher_file / "broken"
    out.mkdir()
    (out / "model_final.pth").write_bytes(b"PK\x03\x04 not a whole zip")
    with pytest.raises(SystemExit) as e:
        _run(world, out, "--resume")
    msg = str(e.value)
    assert "\n" not in msg and "model_final.pth" in msg and "delete it to start afresh" in msg


def test_flags_anywhere_among_the_overrides():
    p = train_argument_parser()
    a = parse_args_with_overrides(p, ["OUTPUT_DIR", "x", "--resume", "SOLVER.BASE_LR", "-1", "--config", "c.yaml",
                                      "SEED", "3", "--num-gpus=2"])
    assert a.resume and a.config == "c.yaml" and a.num_gpus == 2
    assert a.opts == ["OUTPUT_DIR", "x", "SOLVER.BASE_LR", "-1", "SEED", "3"]  # a VALUE is never a flag
    with pytest.raises(SystemExit):  # an unknown flag is argparse's one-line error, not an odd override list
        parse_args_with_overrides(p, ["OUTPUT_DIR", "x", "--frobnicate"])
