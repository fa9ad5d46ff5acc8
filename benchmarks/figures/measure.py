"""What one step costs beyond its time: matmul and convolution FLOPs, and a torch.profiler breakdown."""
from __future__ import annotations

import time
from typing import Any, Callable

import torch
from common import DispatchCounter, sync


def profile_step(fn: Callable[[], Any], device: torch.device, top: int = 8) -> dict:
    """One call of ``fn`` under torch.profiler: where a step's time goes, and on a GPU how busy the GPU was.

    ``device_busy_ms`` sums the kernels' durations (one stream: they do not overlap); far below ``wall_ms``
    means the GPU waited for the host (Python, op dispatch, synchronisations), not for arithmetic.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    with profile(activities=acts) as prof:
        t = time.perf_counter()
        fn()
        sync(device)
        wall = time.perf_counter() - t
    events = prof.events()
    names = [e.name for e in events if e.device_type == DeviceType.CPU]
    out = {"wall_ms": round(wall * 1e3, 1), "aten_ops": sum(n.startswith("aten::") for n in names),
           # ops whose output size depends on values: on a GPU each waits for the device (a host sync)
           "sync_ops": {n: names.count(n) for n in DispatchCounter.VALUE_SIZED if n in names},
           "top_ops_self_cpu_ms": _top(prof, "self_cpu_time_total", top)}
    if cuda:
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
        busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e3
        out.update({"device_busy_ms": round(busy, 1), "device_busy_fraction": round(busy / (wall * 1e3), 3),
                    "kernels": len(kernels),
                    "runtime_sync_and_copy_calls": {n: names.count(n) for n in _SYNC_CALLS if n in names},
                    "top_ops_self_device_ms": _top(prof, "self_device_time_total", top)})
    return out


_SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
               "cudaMemcpyAsync")


def _top(prof, attr: str, n: int) -> list:
    rows = []
    for e in prof.key_averages():
        v = getattr(e, attr, None)
        if v is None and attr == "self_device_time_total":
            v = getattr(e, "self_cuda_time_total", 0)  # older torch
        if v:
            rows.append((e.key, round(v / 1e3, 2), e.count))
    return sorted(rows, key=lambda r: -r[1])[:n]


def count_flops(fn: Callable[[], Any]) -> float:
    """Matmul and convolution FLOPs of one call of ``fn`` (forward, and backward if it runs one)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())
