"""The one command: ViLD from nothing on a box-only COCO dataset (proposal model → store → distillation → evaluation),
reused when run again, and picked up at its stage and iteration after a SIGKILL."""
import json
import os
import signal
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import resumed_at

from vild.data import ProposalStore
from vild.engine.checkpoint import load_checkpoint
from vild.cli.train import run as train_main

pytestmark = pytest.mark.usefixtures("one_thread")
NOVEL = "star,ring"  # two of the world's shapes, held out by name


@pytest.fixture(scope="module")
def box_only(world, tmp_path_factory):
    """The session world's COCO files without any segmentation, and a saved micro teacher."""
    from vild.teacher import CLIPTeacher
    d = tmp_path_factory.mktemp("box_only")
    out = {}
    for split in ("train", "val"):
        data = json.loads(Path(world[f"coco_{split}"]).read_text())
        for a in data["annotations"]:
            del a["segmentation"]
        out[split] = d / f"{split}.json"
        out[split].write_text(json.dumps(data))
    torch.manual_seed(0)
    CLIPTeacher("vild-test-micro", "", templates="simple").save_weights(d / "teacher.pt")
    out["teacher"], out["dir"] = d / "teacher.pt", d
    return out


def command(world, box_only, out, *extra):
    return ["--config", "tiny_test.yaml", "--train-json", str(box_only["train"]), "--train-images",
            world["images_train"], "--test-json", str(box_only["val"]), "--test-images", world["images_val"],
            "--novel", NOVEL, "MODEL.VILD.VARIANT", "vild", "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2",
            "SOLVER.LOG_PERIOD", "1", "TEACHER.PRETRAINED", str(box_only["teacher"]), "OUTPUT_DIR", str(out), *extra]


@pytest.fixture(scope="module")
def from_nothing(world, box_only):
    out = box_only["dir"] / "run"
    return out, train_main(command(world, box_only, out))


def test_one_command_from_nothing_to_metrics_and_detect(world, box_only, from_nothing, tmp_path, capsys):
    out, results = from_nothing
    assert set(results) == {"custom_test"} and set(results["custom_test"]) == {"bbox"}  # box-only: no mask AP
    assert {"AP50_novel", "AP50_base"} <= set(results["custom_test"]["bbox"])
    records = json.loads((out / "pipeline.json").read_text())["stages"]
    assert list(records) == ["proposal_model", "store", "distill", "evaluate"] and all(
        r["done"] for r in records.values())
    text = load_checkpoint(out / "proposal_model" / "model_final.pth")
    assert text["cfg"]["MODEL"]["VILD"]["VARIANT"] == "text" and {"star", "ring"}.isdisjoint(
        n[0] for n in text["vocabulary"])  # trained on the base categories only
    store = ProposalStore(out / "clip_proposals")
    assert len(store) == world["num_train"]
    final = load_checkpoint(out / "model_final.pth")
    assert final["cfg"]["MODEL"]["VILD"]["VARIANT"] == "vild" and final["cfg"]["MODEL"]["MASK_ON"] is False
    # calibrated for display before the evaluation: region mean of both heads, a threshold vild-detect uses
    cal = final["calibration"]
    assert len(cal["region_mean"]) == 2 and any(v != 0 for v in cal["region_mean"][0])
    assert 0.0 <= cal["score_thresh"] <= 1.0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["store"] + ["distill"] * 4 + ["evaluate"]
    assert all(r["loss_distill"] > 0 for r in rows if r["stage"] == "distill")
    assert {json.loads(line)["stage"] for line in (out / "proposal_model" / "metrics.jsonl").read_text().splitlines()
            } == {"proposal_model"}
    log = (out / "log.txt").read_text()
    assert all(f"stage {i}/4 {name}" in log for i, name in ((2, "store"), (3, "distill"), (4, "evaluate")))
    from vild.cli.detect import main as detect_main
    capsys.readouterr()
    assert detect_main(["--weights", str(out / "model_final.pth"), "--vocab", "star,ring,moon", "--input",
                        world["images_val"], "--output", str(tmp_path / "det"), "--json", "--score-thresh", "0"]) == 0
    assert "boxes only" in capsys.readouterr().err
    assert isinstance(json.loads((tmp_path / "det" / "detections.json").read_text()), list)
    assert len(list((tmp_path / "det").glob("*.png"))) == world["num_val"]  # every image drawn


def test_running_the_command_again_redoes_no_stage(world, box_only, from_nothing):
    out, results = from_nothing
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name not in ("log.txt",)}
    again = train_main(command(world, box_only, out))
    assert json.dumps(again, sort_keys=True) == json.dumps(results, sort_keys=True)
    log = (out / "log.txt").read_text().split("stage 1/4")[-1]
    assert all(f"{name}: reusing" in log for name in ("store", "distill", "evaluate"))
    assert "proposal_model: reusing" in (out / "log.txt").read_text()
    changed = [p.name for p, t in files.items() if p.stat().st_mtime_ns != t and p.name != "pipeline.json"]
    assert not changed, changed
    # killed during the evaluation: only the evaluation runs again, on the box-only weights, with the same numbers
    records = json.loads((out / "pipeline.json").read_text())
    del records["stages"]["evaluate"]
    (out / "pipeline.json").write_text(json.dumps(records))
    assert json.dumps(train_main(command(world, box_only, out)), sort_keys=True) == json.dumps(results, sort_keys=True)
    assert "stage 4/4 evaluate: " + str(out / "model_final.pth") in (out / "log.txt").read_text().split("stage 1/4")[-1]
    # a setting of the distillation only: the proposal model and the store are still those of this run
    with pytest.raises(SystemExit, match=r"stage distill .* other inputs .*MODEL.VILD.DISTILL_WEIGHT: 0.5 -> 1.0.*"
                                         r"delete the checkpoints"):
        train_main(command(world, box_only, out, "MODEL.VILD.DISTILL_WEIGHT", "1.0"))


def run_until_killed(args: list[str], when: str) -> None:
    """Run the command in a forked child that SIGKILLs itself during the store or the final checkpoint's write."""
    pid = os.fork()
    if pid == 0:  # the child: a copy of this process, so no interpreter start-up and imports
        try:
            import vild.data.proposal_store as ps
            import vild.engine.trainer as trainer
            from vild.utils.atomic import atomic_open
            if when == "store":  # after the first batch of records is committed
                put = ps.ProposalStoreWriter.put_many

                def put_then_die(self, items):
                    put(self, items)
                    os.kill(os.getpid(), signal.SIGKILL)
                ps.ProposalStoreWriter.put_many = put_then_die
            else:  # half-way through writing model_final.pth, after model_0000002.pth
                save = trainer.atomic_save

                def save_then_die(obj, path):
                    if path.name != "model_final.pth":
                        return save(obj, path)
                    with atomic_open(path, "wb") as f:
                        f.write(b"PK" + os.urandom(4096))
                        f.flush()
                        os.kill(os.getpid(), signal.SIGKILL)
                trainer.atomic_save = save_then_die
            train_main(args)
        finally:
            traceback.print_exc()
            os._exit(3)  # never reached when the kill came
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"child ended with status {status}"


def test_sigkill_during_store_and_distillation_resumes_to_the_same_weights(world, box_only, from_nothing):
    text = str(from_nothing[0] / "proposal_model" / "model_final.pth")
    full, killed = box_only["dir"] / "uninterrupted", box_only["dir"] / "killed"
    args = command(world, box_only, full, "PIPELINE.PROPOSAL_MODEL", text, "DATASETS.TEST", "[]")
    train_main(args)
    args = [a if a != str(full) else str(killed) for a in args]
    run_until_killed(args, "store")
    assert 0 < len(ProposalStore(killed / "clip_proposals")) < world["num_train"]
    assert not (killed / "model_0000002.pth").exists()
    run_until_killed(args, "distill")
    assert (killed / "model_0000002.pth").exists() and list(killed.glob(".model_final.pth.*.tmp"))
    train_main(args)
    log = (killed / "log.txt").read_text()
    assert "stage 2/4 store: continuing" in log and resumed_at(killed) == [2]
    assert not list(killed.glob(".*.tmp"))
    a, b = (load_checkpoint(d / "model_final.pth")["model"] for d in (full, killed))
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
    sa, sb = ProposalStore(full / "clip_proposals"), ProposalStore(killed / "clip_proposals")
    ids = json.loads(box_only["train"].read_text())["images"]
    for image_id in (im["id"] for im in ids):
        (ba, ea), (bb, eb) = sa.get(image_id), sb.get(image_id)
        assert np.array_equal(ba, bb) and np.array_equal(ea, eb), image_id


def test_proposals_given_as_a_coco_json(world, box_only):
    """PIPELINE.PROPOSAL_MODEL as COCO-results boxes: no proposal model is trained, the store holds those boxes."""
    data = json.loads(box_only["train"].read_text())
    props = box_only["dir"] / "proposals.json"
    props.write_text(json.dumps([{"image_id": a["image_id"], "bbox": a["bbox"], "score": 1.0}
                                 for a in data["annotations"]]))
    out = box_only["dir"] / "from_json"
    train_main(command(world, box_only, out, "PIPELINE.PROPOSAL_MODEL", str(props), "DATASETS.TEST", "[]",
                       "SOLVER.MAX_ITER", "2"))
    assert not (out / "proposal_model").exists() and (out / "model_final.pth").is_file()
    store = ProposalStore(out / "clip_proposals")
    first = data["annotations"][0]
    x, y, w, h = first["bbox"]
    assert [x, y, x + w, y + h] in store.get(first["image_id"])[0].tolist()
