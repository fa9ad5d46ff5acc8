"""Process-group setup for ``torchrun`` (single- and multi-node) and device choice."""
from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


def launched_by_torchrun() -> bool:
    """True inside a process started by ``torchrun`` (it sets these variables)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def resolve_device(name: str) -> torch.device:
    """Turn MODEL.DEVICE (auto | cpu | cuda | cuda:N) into a device, with a clear error when CUDA is absent."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} requested but CUDA is not available here: use --device cpu "
                               f"(or MODEL.DEVICE cpu)")
        if ":" in name:
            return torch.device(name)
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"process with LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) "
                               f"visible: start at most that many processes per node (--nproc_per_node / "
                               f"--num-gpus), or name a device (MODEL.DEVICE cuda:0)")
        return torch.device(f"cuda:{local_rank}")
    return torch.device(name)


def init_distributed(device: torch.device) -> None:
    """Join the process group torchrun described (NCCL on GPUs, gloo on CPUs); no-op for one process.

    $VILD_DIST_BACKEND overrides the backend (e.g. gloo for several ranks sharing one GPU, which NCCL refuses).
    """
    if not launched_by_torchrun() or dist.is_initialized() or int(os.environ["WORLD_SIZE"]) == 1:
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = os.environ.get("VILD_DIST_BACKEND") or ("nccl" if device.type == "cuda" else "gloo")
    dist.init_process_group(backend, timeout=timedelta(minutes=30))


def relaunch_with_torchrun(num_procs: int, args: list[str]) -> None:
    """Replace this process by ``torchrun --standalone`` running training with ``args`` in ``num_procs`` processes.

    The children run ``vild.cli.train`` as a module, so this works however training was started:
    ``tools/train_net.py``, ``vild-train``, or ``main(argv)`` from Python.
    """
    args = [a for i, a in enumerate(args) if not _is_num_gpus_arg(args, i)]
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ)
    if (root / "pyproject.toml").is_file():  # a checkout: its vild, importable without installing
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={num_procs}",
           "-m", "vild.cli.train", *args]
    os.execve(sys.executable, cmd, env)


def _is_num_gpus_arg(argv: list[str], i: int) -> bool:
    a = argv[i]
    return a == "--num-gpus" or a.startswith("--num-gpus=") or (i > 0 and argv[i - 1] == "--num-gpus")


def cleanup() -> None:
    """Leave the process group if one was joined."""
    if dist.is_initialized():
        dist.destroy_process_group()
