"""vild-detect over many images: file lists, resumable parts, and torchrun ranks sharing a folder."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vild.cli.detect import main

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent

# Runs the command as a torchrun worker; with $CRASH_RANK set, that rank is SIGKILLed (as the kernel's OOM killer
# would) at its third batch, once a part of the run is on disk.
WORKER = '''
import glob, os, signal, sys, time
from vild import api
from vild.cli.detect import main
predict, out, calls = api.Detector.predict, sys.argv[sys.argv.index("--output") + 1], []
def crashing(self, *args, **kwargs):
    calls.append(1)
    if os.environ.get("RANK") == os.environ.get("CRASH_RANK") and len(calls) == 3:
        while not glob.glob(f"{out}/.vild-detect-*/part-*.jsonl"):
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGKILL)
    return predict(self, *args, **kwargs)
api.Detector.predict = crashing
sys.exit(main(sys.argv[1:]))
'''


@pytest.fixture(scope="module")
def folder(world, tmp_path_factory) -> Path:
    """The synthetic world's 12 validation images and one broken file between them."""
    out = tmp_path_factory.mktemp("folder")
    for p in sorted(Path(world["images_val"]).glob("*.png")):
        shutil.copy(p, out / p.name)
    (out / Path(sorted(out.iterdir())[5].name).with_suffix(".jpg").name).write_bytes(b"not a jpeg")
    return out


def args(ckpt, inp, out) -> list[str]:
    return ["--weights", str(ckpt), "--input", str(inp), "--output", str(out), "--device", "cpu", "--vocab",
            "circle,square,star", "--max-dets", "5", "--score-thresh", "0", "--json", "--batch-size", "2",
            "--part-size", "2"]


@pytest.fixture(scope="module")
def reference(one_thread, ckpt, folder, tmp_path_factory) -> Path:
    """One process, in this one: the output folder to compare with."""
    out = tmp_path_factory.mktemp("reference")
    assert main(args(ckpt, folder, out)) == 1  # the broken file
    return out


def torchrun(cmd_args: list[str], scratch: Path, **env) -> subprocess.CompletedProcess:
    scratch.mkdir(exist_ok=True)  # torchrun's own log folders (torchelastic_*) land here, not in /tmp
    (scratch / "worker.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TMPDIR": str(scratch),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), **env}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(scratch / "worker.py"), *cmd_args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def outputs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_two_torchrun_ranks_write_what_one_process_writes(ckpt, folder, reference, tmp_path):
    out = tmp_path / "out"
    proc = torchrun(args(ckpt, folder, out), tmp_path / "scratch")
    assert proc.returncode != 0 and "processed 12 images, skipped 1 (1 not an image)" in proc.stdout, \
        proc.stdout[-3000:] + proc.stderr[-3000:]  # exit status 1: the broken file, as in one process
    # the same detections.json byte for byte (ids, order, values), the same annotated images, no parts left
    assert outputs(out) == outputs(reference)
    dets = json.loads((out / "detections.json").read_text())
    assert len({d["image_id"] for d in dets}) == 12 and max(d["image_id"] for d in dets) == 13
    assert not list(out.glob(".vild-detect-*"))


def test_a_run_killed_under_torchrun_resumes_and_ends_with_the_same_file(ckpt, folder, reference, tmp_path, capsys):
    out = tmp_path / "out"
    proc = torchrun(args(ckpt, folder, out), tmp_path / "scratch", CRASH_RANK="1")
    assert proc.returncode != 0 and not (out / "detections.json").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    parts = list(out.glob(".vild-detect-*/part-*.jsonl"))
    assert 0 < len(parts) < 7  # 13 images in parts of 2: some done, not all
    # the re-run (one process here: parts do not depend on the process count) does only what is missing
    assert main(args(ckpt, folder, out)) == 1
    assert f"resuming: {len(parts)} of 7 parts were done by an earlier run" in capsys.readouterr().err
    assert outputs(out) == outputs(reference)


def test_a_file_list_gives_ids_in_its_order_and_reports_missing_files(ckpt, folder, tmp_path, monkeypatch, capsys):
    files = sorted(p.name for p in folder.glob("*.png"))[:3]
    (tmp_path / "list.txt").write_text(f"# picked\n{files[2]}\n\n{files[0]}\nmissing.png\n{files[1]}\n")
    monkeypatch.chdir(folder)  # entries are relative to the current folder
    assert main(args(ckpt, tmp_path / "list.txt", tmp_path / "out")) == 1
    dets = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert [(d["image_id"], d["file_name"]) for d in dets[::5]] == [(1, files[2]), (2, files[0]), (4, files[1])]
    assert "processed 3 images, skipped 1 (1 not found)" in capsys.readouterr().out
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    assert main(args(ckpt, tmp_path / "empty.txt", tmp_path / "out")) == 2
    assert "names no files" in capsys.readouterr().err
