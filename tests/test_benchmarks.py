"""Smoke test of benchmarks/run.py: every figure runs at a tiny size and the JSON is well formed (no timings checked)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _scratch_env(tmp_path: Path) -> dict:
    """The environment with TMPDIR set to a new empty folder, to see what a run leaves behind."""
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    return {**os.environ, "TMPDIR": str(scratch)}


def _left_behind(env: dict) -> list[str]:
    """What a run left in its TMPDIR, less torch's compile cache (one folder, reused by every run)."""
    return [p.name for p in Path(env["TMPDIR"]).iterdir() if not p.name.startswith("torchinductor_")]


def _run_benchmark(script: str, args: list, out: Path, env: dict, tail: int = 2000) -> dict:
    """``python benchmarks/SCRIPT ARGS --out OUT`` from the checkout; the JSON it wrote (its output on failure)."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *map(str, args), "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-tail:] + proc.stderr[-tail:]
    return json.loads(out.read_text())


def test_benchmark_smoke_writes_wellformed_json(tmp_path):
    out = tmp_path / "smoke.json"
    env = _scratch_env(tmp_path)
    res = _run_benchmark("run.py", ["--smoke"], out, env, tail=3000)
    # its stores, JPEGs and embedding caches are removed at the end: repeated runs do not fill the disk
    assert not _left_behind(env)

    m = res["machine"]
    for key in ("cpu", "cpu_cores", "torch", "torchvision", "open_clip"):
        assert m[key], key
    assert "gpu" in m

    figs = res["figures"]
    assert set(figs) == {"inference", "crops", "training", "precompute", "vocabulary"}

    inf = figs["inference"]
    assert inf["rows"]
    for row in inf["rows"]:
        for k in ("vild", "torchvision"):
            assert _finite(row[k]["images_per_s"])
            assert row[k]["mean_detections"] == inf["detections_per_image"]  # both fill the detection cap
            assert row[k]["masks_ok"]
        assert _finite(row["ratio"])
        assert row["target"] is None or isinstance(row["target"]["met"], bool)
    assert all(v > 0 for v in inf["flops"]["gflop_per_image"].values())
    assert {"backbone+fpn", "rpn", "box_head", "mask_head", "mask_paste", "total"} <= \
        set(next(iter(inf["stage_seconds_per_batch"].values()))["vild"])

    crops = figs["crops"]
    assert _finite(crops["vild"]["images_per_s"]) and _finite(crops["clip_crops"]["images_per_s"])
    assert crops["crops_per_image"] == 2 * crops["proposals_embedded"]

    tr = figs["training"]
    for k in ("vild", "torchvision"):
        assert _finite(tr[k]["steps_per_s"])
        assert isinstance(tr[k]["peak_memory_mib"], (int, float))
    assert "loss_distill" in tr["vild"]["losses"]
    for k in ("vild", "torchvision"):  # one profiled step per model (on a GPU: how busy the GPU was)
        prof = tr[k]["profiled_step"]
        assert prof["wall_ms"] > 0 and prof["aten_ops"] > 100
        assert prof["sync_ops"]["aten::nonzero"] >= 1 and prof["sync_ops"]["torchvision::nms"] >= 1  # RPN's NMS
        assert prof["top_ops_self_cpu_ms"] and all(ms >= 0 and n >= 1 for _, ms, n in prof["top_ops_self_cpu_ms"])
    # the distillation RoIs go through the head too: more work per step than torchvision's
    assert tr["vild"]["gflop_per_step"] > 0 and tr["torchvision"]["gflop_per_step"] > 0
    assert tr["flops"]["ratio_at_equal_flop_rate"] == pytest.approx(
        tr["torchvision"]["gflop_per_step"] / tr["vild"]["gflop_per_step"], rel=0.01)
    assert tr["target"] is None  # on the CPU the FLOP figures are read, the step rate has no target

    pc = figs["precompute"]
    assert _finite(pc["writer"]["images_per_s"]) and _finite(pc["encode_image"]["images_per_s"])
    assert isinstance(pc["target"]["met"], bool)

    voc = figs["vocabulary"]
    assert _finite(voc["cold"]["seconds"]) and _finite(voc["cached_1203"]["seconds_median"])
    assert _finite(voc["set_vocabulary"]["seconds_median"])

    assert {t["figure"] for t in res["targets"]} >= {"inference", "precompute"}


def test_the_gpu_test_module_imports_here():
    """tests/gpu is only collected where CUDA is; a broken import there would first show in a lent
    GPU session, whose minutes are scarce. Importing it (not running it) catches that on the CPU."""
    import importlib.util
    import sys
    from pathlib import Path
    gpu_dir = Path(__file__).resolve().parent / "gpu"
    spec = importlib.util.spec_from_file_location("gpu_test_cuda", gpu_dir / "test_cuda.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(gpu_dir.parent))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(gpu_dir.parent))
    assert [n for n in dir(mod) if n.startswith("test_")]


def test_side_benchmarks_run_and_write_their_figures(tmp_path):
    """The side benchmarks (loader memory, folder detection, large images, photo resizing) at toy sizes."""
    out = tmp_path / "mem.json"
    env = _scratch_env(tmp_path)
    mem = _run_benchmark("loader_memory.py", ["--images", 300, "--annotations", 3000, "--cache", tmp_path], out, env)
    assert mem["dataset"]["images"] > 0 and mem["dataset"]["records_mib"] > 0
    # the Python-object baseline copies pages as a worker reads it; the shared buffer does not
    assert mem["worker_growth_mib"]["python_objects_baseline"] > mem["worker_growth_mib"]["record_list"]

    det = _run_benchmark("detect_folder.py", ["--images", 6, "--size", "160x120", "--batch-size", 2, "--repeats", 1],
                         tmp_path / "detect.json", env)
    assert set(det["images_per_s"]) == {"model_only", "serial_baseline", "serial", "pipeline"}
    assert det["host_ms_per_image"]["current"]["wall"] > 0
    vocab = _run_benchmark("vocab_templates.py", ["--clip-model", "vild-test-micro", "--names", 1, "--repeats", 1,
                                                  "--val-images", 3], tmp_path / "vocab.json", env)
    assert vocab["speed"]["rates"]["vild_threads1"]["prompts"] == vocab["speed"]["rates"]["simple_threads1"]["prompts"]
    assert set(vocab["accuracy"]["simple"]["box_ap50"]) == {"all", "base", "novel"}
    large = _run_benchmark("large_image.py", ["--size", "300x200", "--detections", 5], tmp_path / "large.json", env)
    photo = _run_benchmark("photo_resize.py", ["--images", 3, "--noise", 0, "--scale", 2], tmp_path / "photo.json",
                           env)
    assert photo["images"] == 3 and 0 <= photo["rows"][0]["filtered"]["AP"] <= 100
    assert large["vild"]["output_mib"] == large["torchvision"]["output_mib"] > 0
    assert large["mask_pixel_count_agreement"] > 0.9
    assert all(_finite(v) and v > 0 for v in det["images_per_s"].values())
    assert not _left_behind(env)  # their photos and outputs are removed


def test_onnx_speed_benchmark_runs(tmp_path):
    """benchmarks/onnx_speed.py on the demo model at a toy size (the R50 figure costs a minute: not here)."""
    pytest.importorskip("onnxruntime", reason="install the [onnx] extra")
    env = _scratch_env(tmp_path)
    demo = _run_benchmark("onnx_speed.py", ["--only", "demo", "--demo-images", 2, "--demo-repeats", 1, "--warmup", 0,
                                            "--threads", 1], tmp_path / "onnx.json", env)["figures"]["demo"]
    assert all(_finite(v) for v in demo["images_per_s"].values())
    assert demo["same_detections_at_display_threshold_on_4_images"]
    # importing onnxruntime (1.32) writes a 51-byte session-id file, .ses, into TMPDIR: one, rewritten each time
    assert not [n for n in _left_behind(env) if n != ".ses"]


def test_serve_load_benchmark_answers_every_request(tmp_path):
    """benchmarks/serve_load.py at toy sizes: three servers on 127.0.0.1, every request answered, nothing left."""
    pytest.importorskip("fastapi")
    env = _scratch_env(tmp_path)
    res = _run_benchmark("serve_load.py", ["--requests", 12, "--images", 2, "--repeats", 1, "--clients", 4,
                                           "--overload-queue", 1], tmp_path / "serve.json", env)
    assert set(res["requests_per_s"]) == {"one_at_a_time", "one_at_a_time_batching", "unbatched_4", "batched_4"}
    assert all(_finite(v) for v in res["requests_per_s"].values())
    assert res["below_queue_bound"] == {"errors": 0, "lost": 0, "non_200": 0}
    overload = res["overload"]
    assert (overload["answered"], overload["failures"], overload["lost"]) == (12, 0, 0)
    assert overload["statuses"].get("503", 0) == overload["503_with_retry_after"]  # every 503 says when to retry
    assert not _left_behind(env)  # the servers' folder, images and caches are removed
    assert not _processes_in(Path(env["TMPDIR"])), "server processes outlived the benchmark"


def _processes_in(folder: Path) -> list[int]:
    """Processes whose working directory is (or was, before its removal) inside ``folder``."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if os.readlink(proc / "cwd").startswith(str(folder)):
                found.append(int(proc.name))
        except OSError:  # gone meanwhile, or not ours to read
            pass
    return found
