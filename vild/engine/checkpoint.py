"""Checkpoints: written atomically, read with ``weights_only=True`` so loading never runs pickled code."""
from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..config import CfgNode, cfg_from_dict
from ..utils.atomic import atomic_save

if TYPE_CHECKING:
    from ..modeling import ViLD

__all__ = ["FORMAT_VERSION", "ModelCheckpoint", "UnreadableCheckpoint", "atomic_save", "check_teacher",
           "checkpoints_newest_first", "export_checkpoint", "last_checkpoint", "load_checkpoint", "prune_checkpoints",
           "remove_stale_temp_files", "rng_state", "set_rng_state", "teacher_mismatch"]

FORMAT_VERSION = 2  # 2: "rng" holds every rank's state, by rank (1: rank 0's only)


class UnreadableCheckpoint(ValueError):
    """A checkpoint file that cannot be read: truncated, corrupt, or not a vild checkpoint."""


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a vild checkpoint safely, with errors that say what is wrong with the file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p} does not exist: train one with tools/train_net.py or pass --weights")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated files, pickles with code, other formats
        raise UnreadableCheckpoint(f"checkpoint {p} cannot be read safely ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                         f"it is corrupt, truncated or not a vild checkpoint") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise UnreadableCheckpoint(f"checkpoint {p} holds no 'model' entry: not a vild checkpoint")
    return ckpt


MASK_HEAD_PREFIX = "roi_heads.mask_"  # the state-dict keys of the mask head (pooler has none)
# torch's line for a weight of another shape: its key, the file's shape, the model's
_SIZE_MISMATCH = re.compile(r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[.*?\])\) "
                            r"from checkpoint, the shape in current model is torch\.Size\((\[.*?\])\)")


class ModelCheckpoint:
    """A vild checkpoint read for its model: the one way weights get from a file into a ViLD, for training
    (MODEL.WEIGHTS, ``--resume``), evaluation, the proposal store's model and ``Detector``.

    Read once, with ``load_checkpoint`` (``weights_only=True``); ``data`` is the whole dict. A model's
    vocabulary is no part of its weights (the text embeddings are not saved), so weights trained on one
    vocabulary load for fine-tuning on another as they are; F-VLM's frozen trunk is not saved either (it is
    the teacher's file's), and the fp16 weights of an exported checkpoint load into the fp32 model.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.data = load_checkpoint(path)

    @property
    def cfg(self) -> CfgNode:
        """The config it was trained with."""
        if not isinstance(self.data.get("cfg"), dict):
            raise ValueError(f"checkpoint {self.path} holds no 'cfg': not a vild training checkpoint")
        return cfg_from_dict(self.data["cfg"])

    @property
    def teacher(self) -> dict:
        """The identity of the CLIP teacher it was trained with ({} when unknown)."""
        return self.data.get("teacher") or {}

    @property
    def has_mask_head(self) -> bool:
        """False when its config says it was trained on boxes only (MODEL.MASK_ON False)."""
        return ((self.data.get("cfg") or {}).get("MODEL") or {}).get("MASK_ON") is not False

    def check_teacher(self, identity: dict, fix: str) -> None:
        """Refuse it for a teacher other than ``identity`` (``fix``: what to do about it)."""
        check_teacher(self.teacher, identity, self.path, fix)

    def load_into(self, model: ViLD, logger: logging.Logger | None = None, mask_head_may_differ: bool = False,
                  own_config: bool = False) -> None:
        """Put the weights into ``model``; a mismatch is a ``ValueError`` naming the keys.

        ``mask_head_may_differ``: a mask head present on one side only (masks vs. box-only training) is logged
        to ``logger`` and left out, not an error. ``own_config``: ``model`` was built from its own config.
        """
        state = self.data["model"]
        own = model.state_dict()  # F-VLM's trunk has no keys here, as in the file
        extra, missing = [k for k in state if k not in own], [k for k in own if k not in state]
        lenient = mask_head_may_differ and bool(extra or missing) and all(
            k.startswith(MASK_HEAD_PREFIX) for k in extra + missing)
        if lenient:
            log = logger or logging.getLogger("vild")
            if extra:
                log.info("%s has a mask head, this model none (MODEL.MASK_ON False): its mask weights are left out",
                         self.path)
            if missing:
                log.info("%s has no mask head: this model's mask head starts untrained", self.path)
            state = {k: v for k, v in state.items() if k in own}
        try:
            model.load_state_dict(state, strict=not lenient)
        except RuntimeError as e:
            shapes = [f"{k}: {a} in the file vs {b} here" for k, a, b in _SIZE_MISMATCH.findall(str(e))]
            why = "; ".join(f"{len(keys)} {what} ({', '.join(keys[:3])}{', …' if len(keys) > 3 else ''})"
                            for what, keys in (("missing", missing), ("unexpected", extra),
                                               ("of another shape", shapes)) if keys) or str(e)[:300]
            fix = "" if own_config else ": build the model with the MODEL.* settings it was trained with"
            raise ValueError(f"checkpoint {self.path}: weights do not fit the model "
                             f"{'its own config builds' if own_config else 'of this config'}: {why}{fix}") from None

    def build_model(self, teacher: torch.nn.Module | None = None, device: str | torch.device = "cpu") -> ViLD:
        """The model of its own config with these weights and calibration, in eval mode on ``device``.

        ``teacher``: a loaded ``CLIPTeacher`` whose image trunk F-VLM copies (default: read from TEACHER.*).
        """
        from ..modeling import build_model
        from .calibration import apply_calibration
        # the file has every trained weight: the ImageNet backbone file need not be on this machine
        model = build_model(self.cfg, load_pretrained=False, teacher=teacher)
        self.load_into(model, own_config=True)
        apply_calibration(model, self.data.get("calibration"))
        return model.to(device).eval()


def export_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, half: bool = True,
                      teacher_weights: str | None = None) -> Path:
    """Write a deployable copy of a training checkpoint: config, teacher identity, vocabulary and weights only.

    Optimizer, scheduler and RNG states are dropped (they are for ``--resume``); ``half`` stores floating
    weights as fp16 (they load back into the fp32 model). ``teacher_weights`` replaces TEACHER.PRETRAINED,
    e.g. with a bare file name that ``Detector.from_checkpoint`` looks up beside the checkpoint.
    """
    ckpt = load_checkpoint(src)
    weights = {k: v.half() if half and v.is_floating_point() else v for k, v in ckpt["model"].items()}
    out = {k: ckpt[k] for k in ("format_version", "cfg", "teacher", "vocabulary", "iteration", "calibration")
           if k in ckpt}
    out["model"] = weights
    if teacher_weights is not None and isinstance(out.get("cfg"), dict):
        out["cfg"] = {**out["cfg"], "TEACHER": {**out["cfg"]["TEACHER"], "PRETRAINED": teacher_weights}}
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(out, dst)
    return dst


def teacher_mismatch(trained_with: dict, identity: dict) -> str:
    """Why embeddings made by teacher ``trained_with`` do not match ``identity``'s ('' when they do, or unknown)."""
    want, have = trained_with.get("sha256"), identity.get("sha256")
    if want and have and want != have:
        return (f"was made with teacher {trained_with.get('model')} weights "
                f"{trained_with.get('pretrained') or '(random init)'} (sha256 {want[:12]}…), but TEACHER.PRETRAINED "
                f"now gives {identity.get('pretrained') or '(random init)'} (sha256 {have[:12]}…)")
    # the same weights under GELU and QuickGELU embed differently (open_clip 3.x built openai tags with GELU)
    q_want, q_have = trained_with.get("quick_gelu"), identity.get("quick_gelu")
    if q_want is not None and q_have is not None and q_want != q_have:
        return (f"was made with teacher {trained_with.get('model')} / {trained_with.get('pretrained')} using "
                f"{'QuickGELU' if q_want else 'GELU'}, but the teacher now uses {'QuickGELU' if q_have else 'GELU'}")
    return ""


def check_teacher(trained_with: dict, identity: dict, path: str | os.PathLike, fix: str) -> None:
    """Refuse a checkpoint trained with another CLIP teacher than ``identity``: its embeddings would not match."""
    why = teacher_mismatch(trained_with, identity)
    if why:
        raise ValueError(f"checkpoint {path} {why}: its text embeddings would not match the detector; {fix}")


def rng_state() -> dict:
    """All RNG states as tensors and plain types (loadable under weights_only)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore states saved by :func:`rng_state`."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


_CKPT_RE = re.compile(r"model_(\d+)\.pth$")
# atomic_open's temp files of checkpoints: ".model_0000100.pth.<random>.tmp", ".model_final.pth.<random>.tmp"
_TEMP_GLOB = ".model_*.pth.*.tmp"


def _numbered(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Periodic checkpoints ``model_NNNNNNN.pth`` by iteration, oldest first."""
    return sorted((int(m.group(1)), p) for p in Path(output_dir).glob("model_*.pth") if (m := _CKPT_RE.search(p.name)))


def checkpoints_newest_first(output_dir: str | os.PathLike) -> list[Path]:
    """``model_final.pth`` (if any), then ``model_NNNNNNN.pth`` from the highest iteration down."""
    final = Path(output_dir) / "model_final.pth"
    return ([final] if final.is_file() else []) + [p for _, p in reversed(_numbered(output_dir))]


def last_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """Newest ``model_NNNNNNN.pth`` (or ``model_final.pth``) in a training folder."""
    found = checkpoints_newest_first(output_dir)
    return found[0] if found else None


def prune_checkpoints(output_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest periodic checkpoints (``keep`` 0: delete none); return the deleted."""
    if keep <= 0:
        return []
    old = [p for _, p in _numbered(output_dir)[:-keep]]
    for p in old:
        p.unlink(missing_ok=True)
    return old


def remove_stale_temp_files(output_dir: str | os.PathLike) -> list[Path]:
    """Delete the hidden temp files of checkpoint writes that a killed process left behind; return them."""
    stale = sorted(Path(output_dir).glob(_TEMP_GLOB))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
