#!/usr/bin/env python
"""vild-serve under load on 127.0.0.1: throughput and latency with dynamic batching, against one-at-a-time requests.

    python benchmarks/serve_load.py            # the shipped demo model on the CPU -> results/serve_load_cpu.json

``tools/serve.py`` runs in subprocesses on 127.0.0.1 (torch threads 1): one server batches (``--max-batch 8
--max-wait-ms 10``), one does not (``--max-batch 1``), one has a small queue (``--max-queue 8``). Clients are
threads of this process, each with a keep-alive HTTP/1.1 connection, posting multipart uploads of 128-px
synthetic-world PNGs with a fixed vocabulary; none retries. Phases, interleaved and repeated; the figures are
medians over repeats, and ratios are taken within each repeat (phases next to each other in time, which matters
on a shared machine) before their median is taken:

- ``one_at_a_time``: 1 client, the non-batching server: each request waits for the previous answer.
- ``one_at_a_time_batching``: 1 client, the batching server (a lone request should not wait for company).
- ``unbatched_16``: 16 clients, the non-batching server: concurrency alone (decoding and encoding overlap
  the model, but each forward pass takes one image).
- ``batched_16``, ``batched_64``: 16 and 64 clients, the batching server (64 clients stay under its default
  queue bound of 64, so every request must get a 200).
- ``overload`` (once): 64 clients against a queue bound of 8: the excess gets 503 with Retry-After; every
  request gets an answer.

Every phase is bounded: a fixed number of requests and ``--phase-timeout`` seconds.
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, log, write_result  # noqa: E402

BOUNDARY = "vild-serve-load"


_GIVEN_PORTS: set[int] = set()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, and not given out before by this process."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN_PORTS:
            _GIVEN_PORTS.add(port)
            return port


class ServerProcess:
    """``tools/serve.py`` in a subprocess on 127.0.0.1, its log in ``folder``; a context manager."""

    def __init__(self, weights: str, folder: Path, args: tuple = (), startup_timeout: float = 180.0):
        self.port = free_port()
        self.folder, self.args, self.startup_timeout = folder, list(args), startup_timeout
        self.weights = str(Path(weights).resolve())  # the server runs in `folder`
        self.log_path = folder / f"server_{self.port}.log"
        self.proc: Optional[subprocess.Popen] = None
        self._started: list[subprocess.Popen] = []  # every process launched, retries too: all are stopped

    @property
    def url(self) -> str:
        """The server's base URL."""
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "ServerProcess":
        if self.proc is None:
            self.start()
        return self.wait()

    def start(self) -> "ServerProcess":
        """Launch the server; ``wait`` for it to answer."""
        env = {**os.environ, "VILD_CACHE": str(self.folder / "cache"), "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, str(ROOT / "tools" / "serve.py"), "--weights", self.weights, "--host", "127.0.0.1",
               "--port", str(self.port), "--device", "cpu", "--log-level", "warning", *self.args]
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=str(self.folder))
        self._started.append(self.proc)
        return self

    def wait(self) -> "ServerProcess":
        """Poll ``/healthz`` until the server answers; raise with its log if it exits or takes too long."""
        end = time.monotonic() + self.startup_timeout
        retries = 3
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                if "address already in use" in self.log() and retries:  # taken since free_port saw it free
                    retries -= 1
                    self.port = free_port()
                    self.start()
                    continue
                raise RuntimeError(f"vild-serve exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if self.get("/healthz")["status"] == "ok":
                    return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"vild-serve did not answer within {self.startup_timeout:g} s:\n{self.log()[-3000:]}")

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """End every process this object started (uvicorn shuts down gracefully on SIGTERM)."""
        for proc in self._started:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._started:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def get(self, path: str) -> dict:
        """GET a JSON endpoint."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", path)
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def cpu_seconds(self) -> float:
        """CPU time the server process has used so far (user + system, all its threads)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def log(self) -> str:
        """What the server printed."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def multipart(image: bytes, vocabulary: str) -> bytes:
    """A multipart/form-data body with the fields ``vocabulary`` and ``image``."""
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"vocabulary\"\r\n\r\n{vocabulary}\r\n"
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"scene.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + image + f"\r\n--{BOUNDARY}--\r\n".encode()


def run_phase(port: int, clients: int, requests: int, bodies: list[bytes], timeout: float) -> dict:
    """``clients`` threads send ``requests`` uploads in all; statuses, latencies and failures counted."""
    lock = threading.Lock()
    sent = iter(range(requests))
    latencies: list[float] = []
    statuses: Counter = Counter()
    retry_after: list[int] = []
    failures: list[str] = []
    detections = [0]
    deadline = time.monotonic() + timeout

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        while time.monotonic() < deadline:
            with lock:
                i = next(sent, None)
            if i is None:
                break
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/detect", body=bodies[i % len(bodies)],
                             headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
                resp = conn.getresponse()
                data = resp.read()
                n = len(json.loads(data)["detections"]) if resp.status == 200 else 0
            except (OSError, http.client.HTTPException, ValueError, KeyError) as e:
                with lock:
                    failures.append(f"{type(e).__name__}: {e}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
                continue
            dt = time.perf_counter() - t0
            with lock:
                statuses[resp.status] += 1
                detections[0] += n
                if resp.status == 200:
                    latencies.append(dt)
                elif resp.status == 503 and (resp.getheader("Retry-After") or "").isdigit():
                    retry_after.append(int(resp.getheader("Retry-After")))
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    answered = sum(statuses.values())
    ok = statuses.get(200, 0)
    lat = sorted(latencies)
    return {
        "clients": clients, "requests": requests, "seconds": round(wall, 3),
        "answered": answered, "ok": ok, "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "failures": len(failures), "failure_examples": failures[:3],
        "lost": requests - answered - len(failures),  # never sent (phase timeout) or no answer at all
        "503_with_retry_after": len(retry_after),
        "requests_per_s": round(ok / wall, 2),
        "latency_ms": {"p50": round(1000 * _quantile(lat, 0.5), 1), "p99": round(1000 * _quantile(lat, 0.99), 1),
                       "max": round(1000 * lat[-1], 1)} if lat else None,
        "detections_per_image": round(detections[0] / ok, 2) if ok else 0.0,
    }


def _quantile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _batches(server: ServerProcess, before: dict, cpu_before: float) -> dict:
    after = server.get("/healthz")
    batches, images = after["batches"] - before["batches"], after["images"] - before["images"]
    return {"forward_passes": batches, "mean_batch": round(images / batches, 2) if batches else 0.0,
            "server_cpu_ms_per_image": round(1000 * (server.cpu_seconds() - cpu_before) / images, 2) if images else 0.0}


def make_images(folder: Path, n: int, seed: int = 0) -> list[bytes]:
    """``n`` 128-px PNG scenes of the synthetic world (every shape among them)."""
    from vild.synthetic.world import generate_world
    world = generate_world(str(folder / "world"), seed=seed, num_train=0, num_val=n, image_size=128)
    return [p.read_bytes() for p in sorted(Path(world["images_val"]).glob("*.png"))]


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=str(ROOT / "tests" / "assets" / "demo_model" / "model.pth"))
    p.add_argument("--vocab", default="star,heart,ring,arrow,circle,square,triangle")
    p.add_argument("--images", type=int, default=32, help="distinct images, sent in turn")
    p.add_argument("--requests", type=int, default=160, help="requests per phase")
    p.add_argument("--clients", default="16,64", help="concurrent clients of the batched phases")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--overload-queue", type=int, default=8, help="queue bound of the overload phase's server")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    p.add_argument("--phase-timeout", type=float, default=300.0, help="seconds a phase may take")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load_cpu.json"))
    a = p.parse_args(argv)
    counts = [int(c) for c in a.clients.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="vild_serve_bench_"))
    try:
        bodies = [multipart(img, a.vocab) for img in make_images(tmp, a.images)]
        common = ("--threads", str(a.threads), "--max-wait-ms", str(a.max_wait_ms))
        with contextlib.ExitStack() as stack:
            servers = [ServerProcess(a.weights, tmp, args) for args in (
                ("--max-batch", "1", *common), ("--max-batch", str(a.max_batch), *common),
                ("--max-batch", str(a.max_batch), "--max-queue", str(a.overload_queue), *common))]
            for server in servers:  # all three start at once, then each is waited for
                server.start()
                stack.callback(server.stop)
            single, batched, small = (server.wait() for server in servers)
            for server in servers:  # warm-up: first passes allocate, the vocabulary gets embedded
                run_phase(server.port, 4, 16, bodies, a.phase_timeout)
            phases = [("one_at_a_time", single, 1), ("one_at_a_time_batching", batched, 1),
                      (f"unbatched_{counts[0]}", single, counts[0])]
            phases += [(f"batched_{c}", batched, c) for c in counts]
            runs: dict[str, list[dict]] = {name: [] for name, _, _ in phases}
            for r in range(a.repeats):
                for name, server, clients in phases:
                    before, load, cpu = server.get("/healthz"), os.getloadavg()[0], server.cpu_seconds()
                    res = run_phase(server.port, clients, a.requests, bodies, a.phase_timeout)
                    res.update(_batches(server, before, cpu), loadavg_1min_before=round(load, 2))
                    runs[name].append(res)
                    log(f"{name} (repeat {r + 1}): {res['requests_per_s']} req/s, p50 "
                        f"{res['latency_ms']['p50'] if res['latency_ms'] else '-'} ms, mean batch {res['mean_batch']}, "
                        f"server CPU {res['server_cpu_ms_per_image']} ms/image"
                        f", statuses {res['statuses']}, failures {res['failures']}")
            before, cpu = small.get("/healthz"), small.cpu_seconds()
            overload = run_phase(small.port, max(counts), a.requests, bodies, a.phase_timeout)
            overload.update(_batches(small, before, cpu), max_queue=a.overload_queue)
            log(f"overload: statuses {overload['statuses']}, failures {overload['failures']}, lost {overload['lost']}")
        result = summarize(a, runs, overload)
        write_result(a.out, result, _cpu())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def summarize(a: argparse.Namespace, runs: dict[str, list[dict]], overload: dict) -> dict:
    """Medians over repeats, ratios against one-at-a-time within each repeat, and the checks the goal names."""
    rate = {name: statistics.median(r["requests_per_s"] for r in rs) for name, rs in runs.items()}

    def ratios(num: str, den: str) -> list[float]:
        return [round(x["requests_per_s"] / y["requests_per_s"], 3) for x, y in zip(runs[num], runs[den])]

    over_single = {k: ratios(k, "one_at_a_time") for k in rate if k != "one_at_a_time"}
    batched = [n for n in rate if n.startswith("batched_")]
    over_unbatched = {k: ratios(k, f"unbatched_{k.split('_')[1]}") for k in batched
                      if f"unbatched_{k.split('_')[1]}" in rate}
    med = {k: round(statistics.median(v), 3) for k, v in over_single.items()}
    cpu = {k: statistics.median(r["server_cpu_ms_per_image"] for r in rs) for k, rs in runs.items()}
    below_bound = [r for rs in runs.values() for r in rs]
    return {
        "what": "vild-serve on 127.0.0.1: requests/s and latency of POST /detect (multipart PNG upload)",
        "weights": Path(a.weights).name, "image_size": [128, 128], "vocabulary": a.vocab,
        "server": {"torch_threads": a.threads, "max_batch": a.max_batch, "max_wait_ms": a.max_wait_ms,
                   "max_queue": 64, "device": "cpu"},
        "requests_per_phase": a.requests, "repeats": a.repeats,
        "requests_per_s": {k: round(v, 2) for k, v in rate.items()},
        # CPU the server spent per answered image: what a phase costs, whatever else runs on the machine
        "server_cpu_ms_per_image": cpu,
        "server_cpu_one_at_a_time_over_phase": {k: round(cpu["one_at_a_time"] / v, 3) for k, v in cpu.items()
                                                if k != "one_at_a_time" and v},
        "latency_ms_p50": {k: statistics.median(r["latency_ms"]["p50"] for r in rs) for k, rs in runs.items()},
        "latency_ms_p99": {k: statistics.median(r["latency_ms"]["p99"] for r in rs) for k, rs in runs.items()},
        "ratio_over_one_at_a_time": med,
        "ratio_over_one_at_a_time_per_repeat": over_single,
        "ratio_batched_over_unbatched": {k: round(statistics.median(v), 3) for k, v in over_unbatched.items()},
        "ratio_batched_over_unbatched_per_repeat": over_unbatched,
        "target": {"min_ratio_over_one_at_a_time": 1.5, "met": {k: med[k] >= 1.5 for k in batched}},
        "below_queue_bound": {"errors": sum(r["failures"] for r in below_bound),
                              "lost": sum(r["lost"] for r in below_bound),
                              "non_200": sum(r["answered"] - r["ok"] for r in below_bound)},
        "overload": overload,
        "phases": runs,
    }


def _cpu():
    import torch
    return torch.device("cpu")


if __name__ == "__main__":
    main()
