"""Checkpoints: written atomically, read with ``weights_only=True`` so loading never runs pickled code."""
from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from ..utils.atomic import atomic_save

__all__ = ["FORMAT_VERSION", "UnreadableCheckpoint", "atomic_save", "check_teacher", "checkpoints_newest_first",
           "export_checkpoint", "last_checkpoint", "load_checkpoint", "prune_checkpoints", "remove_stale_temp_files",
           "rng_state", "set_rng_state", "teacher_mismatch"]

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
