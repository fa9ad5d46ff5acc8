"""Shared pieces of the benchmarks: machine description, synchronised timers, model builders, inputs."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LVIS_CLASSES = 1203
LVIS_BASE_CLASSES = 866  # LVIS v1 frequent + common: the training vocabulary of ViLD on LVIS
EMBED_DIM = 512


def log(msg: str) -> None:
    """Progress line, flushed at once (the run takes minutes)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cpu_model() -> str:
    """The CPU's marketing name."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    """CPU model and cores, GPU name, library versions: what a number in the JSON was measured on."""
    import open_clip
    import torchvision
    info = {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "open_clip": open_clip.__version__,
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2 ** 30, 1)
    return info


def write_result(path: str | Path, result: dict, device: torch.device) -> None:
    """A side benchmark's JSON, with the machine and the time it was measured on."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = {**result, "machine": machine_info(device), "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    path.write_text(json.dumps(out, indent=1) + "\n")
    log(f"wrote {path}")


def sync(device: torch.device) -> None:
    """Wait for queued device work, so wall-clock timers measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable, device: torch.device):
    """Run ``fn`` once between device synchronisations: (result, seconds)."""
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def interleaved(fns: dict[str, Callable], device: torch.device, repeats: int, warmup: int = 0,
                on_result: Callable | None = None, label: str = "") -> dict[str, list[float]]:
    """Time each function ``repeats`` times, alternating A, B, A, B (shared-machine noise hits both alike).

    ``warmup`` untimed rounds come first; ``on_result(name, result)`` sees every timed result.
    """
    for w in range(warmup):
        for name, fn in fns.items():
            _, dt = timed(fn, device)
            log(f"  {label} warm-up {w + 1}/{warmup} {name}: {dt:.2f}s")
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats):
        order = list(fns.items()) if r % 2 == 0 else list(fns.items())[::-1]
        for name, fn in order:
            out, dt = timed(fn, device)
            times[name].append(dt)
            if on_result is not None:
                on_result(name, out)
            log(f"  {label} run {r + 1}/{repeats} {name}: {dt:.2f}s")
    return times


class DispatchCounter:
    """Counts the ops a piece of code dispatches (forward, backward, optimizer), and those whose output size
    depends on tensor values: on a GPU each of those makes the host wait for the device.

    Counted at the dispatcher, below autograd: but for device-specific code paths, a CPU run counts what a GPU
    run's host issues. ``tolist()`` / ``.cpu()`` copies do not dispatch on a CPU tensor and are not seen.
    """

    VALUE_SIZED = ("aten::nonzero", "aten::_local_scalar_dense", "aten::masked_select", "aten::_unique2",
                   "aten::unique_dim", "aten::unique_consecutive", "torchvision::nms", "aten::repeat_interleave")

    def __init__(self):
        self.ops = 0
        self.value_sized: dict[str, int] = {}

    def __enter__(self) -> "DispatchCounter":
        from torch.utils._python_dispatch import TorchDispatchMode
        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter._see(func, args)
                return func(*args, **(kwargs or {}))

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)

    def _see(self, func, args) -> None:
        self.ops += 1
        name = func._schema.name
        # indexing or assigning through a boolean mask runs nonzero inside the op
        if name in ("aten::index", "aten::index_put_", "aten::index_put") and len(args) > 1 and any(
                torch.is_tensor(i) and i.dtype in (torch.bool, torch.uint8) for i in (args[1] or [])):
            name = f"{name} (boolean mask)"
        elif name not in self.VALUE_SIZED:
            return
        self.value_sized[name] = self.value_sized.get(name, 0) + 1

    def result(self) -> dict:
        """{"ops": N, "value_sized_ops": N, "by_op": {...}}."""
        return {"ops": self.ops, "value_sized_ops": sum(self.value_sized.values()),
                "by_op": dict(sorted(self.value_sized.items()))}


def median(xs: list[float]) -> float:
    """Median (robust to the odd slow run on a shared machine)."""
    return float(statistics.median(xs)) if xs else float("nan")


def autocast(device: torch.device, dtype: str):
    """bf16 autocast for the "bf16" figures, nothing for "fp32"."""
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def random_text_embeddings(k: int, dim: int = EMBED_DIM, seed: int = 0) -> torch.Tensor:
    """[k, dim] random unit vectors: an LVIS-sized vocabulary for a random-weight detector."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(k, dim, generator=g), dim=-1)


def lvis_like_names(k: int) -> list[str]:
    """Synthetic LVIS-style category names ("bow_(weapon)" shape, some with synonyms)."""
    stems = ["apple", "bottle", "cup", "kite", "lamp", "sofa", "teapot", "tractor", "umbrella", "zebra",
             "bow", "bolt", "crate", "drum", "easel", "flute", "glove", "helmet", "iron", "jar"]
    kinds = ["weapon", "container", "toy", "furniture", "tool", "vehicle", "food", "animal"]
    names = []
    for i in range(k):
        name = f"{stems[i % len(stems)]}_{i}_({kinds[i % len(kinds)]})"
        names.append(f"{name}|{stems[i % len(stems)]} {i}" if i % 5 == 0 else name)
    return names


def vild_config(size: int, proposals: int | None = None, detections: int | None = None, device: str = "cpu",
                extra_opts: list[str] | None = None):
    """configs/vild_r50.yaml (the paper's R50-FPN ViLD) at a test size; proposal/detection counts as given.

    ``extra_opts`` (KEY VALUE ...) are for ablations only, e.g. the 2-fc box head of torchvision's model.
    """
    from vild.config import load_config
    opts = ["INPUT.TEST_SIZE", str(size), "INPUT.IMAGE_SIZE", str(size), "MODEL.DEVICE", device]
    if proposals is not None:
        opts += ["MODEL.RPN.POST_NMS_TOPK_TEST", str(proposals),
                 "MODEL.RPN.PRE_NMS_TOPK_TEST", str(max(proposals, 1000))]
    if detections is not None:
        opts += ["MODEL.ROI_HEADS.DETECTIONS_PER_IMAGE", str(detections)]
    return load_config("vild_r50.yaml", opts + list(extra_opts or []))


def build_vild(size: int, device: torch.device, num_classes: int = LVIS_CLASSES, proposals: int | None = None,
               detections: int | None = None, seed: int = 0, extra_opts: list[str] | None = None):
    """Random-init ViLD R50-FPN with a random ``num_classes`` vocabulary, in eval mode (BN uses running stats)."""
    from vild.modeling import build_model
    torch.manual_seed(seed)
    model = build_model(vild_config(size, proposals, detections, extra_opts=extra_opts))
    model.set_vocabulary(random_text_embeddings(num_classes, model.embed_dim, seed=seed))
    return model.to(device).eval()


def build_torchvision(size: int, device: torch.device, proposals: int | None = None, detections: int = 300,
                      seed: int = 0):
    """torchvision's Mask R-CNN R50-FPN, random init, 91 classes, score threshold 0, at the same image size."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn
    torch.manual_seed(seed)
    kw = {}
    if proposals is not None:
        kw.update(rpn_post_nms_top_n_test=proposals, rpn_pre_nms_top_n_test=max(proposals, 1000))
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91, box_score_thresh=0.0,
                                  box_detections_per_img=detections, min_size=size, max_size=size, **kw)
    return model.to(device).eval()


def random_images(n: int, size: int, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    """``n`` uint8 [3, size, size] noise images (random weights do not care what is in them)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g).to(device) for _ in range(n)]


def random_boxes(n: int, height: int, width: int, seed: int = 0, min_side: float = 8.0) -> torch.Tensor:
    """[n, 4] xyxy float boxes inside the image, each side at least ``min_side`` pixels."""
    g = torch.Generator().manual_seed(seed)
    min_side = min(min_side, height / 2, width / 2)
    wh = torch.rand(n, 2, generator=g) * torch.tensor([width - min_side, height - min_side]) * 0.6 + min_side
    xy = torch.rand(n, 2, generator=g) * (torch.tensor([width, height]) - wh)
    return torch.cat([xy, xy + wh], dim=1)


class RssSampler:
    """Resident set size of this process, sampled on a thread (torch ops release the GIL)."""

    def __init__(self, interval: float = 0.005):
        import threading
        self._page_kib = os.sysconf("SC_PAGE_SIZE") // 1024
        self.start_kib = self.max_kib = self._rss()
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page_kib

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.max_kib = max(self.max_kib, self._rss())

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        self.max_kib = max(self.max_kib, self._rss())
        return {"start_kib": self.start_kib, "max_kib": self.max_kib}
