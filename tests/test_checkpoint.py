"""One loader (``ModelCheckpoint``) puts a checkpoint's weights into every model that needs them: the Detector's,
the proposal model's and the trainer's (MODEL.WEIGHTS), with the same errors."""
import pytest
import torch

from vild.api import Detector
from vild.config import load_config
from vild.engine.checkpoint import ModelCheckpoint, atomic_save, load_checkpoint
from vild.engine.precompute import load_proposal_model
from vild.engine.trainer import ResumeState, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _trainer(ckpt, out, *opts):
    return Trainer(load_config("tiny_test.yaml", ["MODEL.WEIGHTS", str(ckpt), "TEACHER.PRETRAINED",
                                                  str(ckpt.parent / "teacher.pt"), "OUTPUT_DIR", str(out),
                                                  "TEACHER.CACHE_DIR", str(out / "cache"), *opts]))


def test_detector_proposal_model_and_trainer_load_through_one_loader(ckpt, tmp_path, monkeypatch):
    loads = []
    real = ModelCheckpoint.load_into
    monkeypatch.setattr(ModelCheckpoint, "load_into",
                        lambda self, model, *a, **k: loads.append(self.path) or real(self, model, *a, **k))
    det = Detector.from_checkpoint(ckpt, device="cpu")
    proposer = load_proposal_model(str(ckpt), torch.device("cpu"))
    trainer = _trainer(ckpt, tmp_path / "out")
    trainer.set_vocabulary(["kite", "cup"], None)  # another vocabulary size than the checkpoint's three names
    assert trainer.resume_or_load(resume=False) == ResumeState(0, None)  # weights only: a fresh schedule
    assert loads == [ckpt] * 3
    want = load_checkpoint(ckpt)["model"]
    for model in (det.model, proposer, trainer.model):
        got = model.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not proposer.training and trainer.model.roi_heads.classifier.num_classes == 2


def test_weights_that_do_not_fit_are_one_clear_error_for_every_caller(ckpt, tmp_path):
    ensemble = _trainer(ckpt, tmp_path / "ens", "MODEL.VILD.VARIANT", "ensemble")  # has an image head too
    with pytest.raises(ValueError, match=r"model of this config: \d+ missing \(roi_heads.image_head.*MODEL\.\*"):
        ensemble.resume_or_load(resume=False)
    broken = load_checkpoint(ckpt)
    del broken["model"]["roi_heads.classifier.background"]
    atomic_save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"model its own config builds: 1 missing \(roi_heads.classifier.background\)"):
        load_proposal_model(str(tmp_path / "broken.pth"), torch.device("cpu"))
    del broken["cfg"]
    atomic_save(broken, tmp_path / "no_cfg.pth")
    with pytest.raises(ValueError, match="holds no 'cfg'"):
        load_proposal_model(str(tmp_path / "no_cfg.pth"), torch.device("cpu"))
