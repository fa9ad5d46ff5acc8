"""CUDA-only checks (run on a GPU machine with `make test-gpu`; not collected where torch sees no GPU).

Training with bf16 and fp16 AMP, DDP with SyncBatchNorm across two ranks, the teacher's bf16 autocast
and inference on the GPU agreeing with the CPU.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import make_checkpoint, scene
from helpers import resumed_at, world_opts
from torchvision.ops import box_iou

from vild import Detector
from vild.engine.checkpoint import load_checkpoint
from vild.cli.train import run as train_main
from vild.teacher import CLIPTeacher

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_training_on_cuda_with_amp(world, teacher_file, amp):
    out = teacher_file / f"amp_{amp}"
    results = train_main(["--config", "tiny_test.yaml", *world_opts(world, out, max_iter=6, **{
        "MODEL.DEVICE": "cuda", "SOLVER.AMP": amp, "SOLVER.CHECKPOINT_PERIOD": 3})])
    ckpt = load_checkpoint(out / "model_final.pth")
    assert ckpt["iteration"] == 6
    assert all(torch.isfinite(v.float()).all() for v in ckpt["model"].values())
    if amp == "fp16":
        assert "scaler" in ckpt  # the GradScaler's state travels with the checkpoint, so --resume continues it
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if "total_loss" in l]
    assert len(lines) == 6 and all(l["total_loss"] == l["total_loss"] for l in lines)
    assert "bbox" in results["synth_val"] and "segm" in results["synth_val"]
    # --resume on the GPU: the checkpoint's RNG states must come back as CPU tensors
    part = teacher_file / f"amp_{amp}_resumed"
    part.mkdir()
    shutil.copy(out / "model_0000003.pth", part / "model_0000003.pth")
    train_main(["--config", "tiny_test.yaml", "--resume", *world_opts(world, part, max_iter=6, **{
        "MODEL.DEVICE": "cuda", "SOLVER.AMP": amp, "SOLVER.CHECKPOINT_PERIOD": 3, "DATASETS.TEST": []})])
    assert load_checkpoint(part / "model_final.pth")["iteration"] == 6
    assert resumed_at(part) == [3]  # continued from the checkpoint, not from iteration 0


def test_ddp_syncbn_two_ranks(world, teacher_file):
    """Two ranks with SyncBatchNorm in backbone and box head; they share the one GPU, so gloo (NCCL refuses that)."""
    out = teacher_file / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "VILD_DIST_BACKEND": "gloo" if torch.cuda.device_count() < 2 else "nccl"}
    dev = "cuda:0" if torch.cuda.device_count() < 2 else "cuda"
    cmd = [sys.executable, str(ROOT / "tools" / "train_net.py"), "--num-gpus", "2", "--config", "tiny_test.yaml",
           *world_opts(world, out, max_iter=3, **{"SOLVER.CHECKPOINT_PERIOD": 100, "SOLVER.IMS_PER_BATCH": 4,
                                                  "MODEL.DEVICE": dev, "MODEL.BACKBONE.NORM": "SyncBN",
                                                  "MODEL.ROI_BOX_HEAD.NORM": "SyncBN"})]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    assert "SyncBN across 2 processes in the backbone" in proc.stdout
    assert "SyncBN across 2 processes in the RoI heads" in proc.stdout
    ckpt = load_checkpoint(out / "model_final.pth")
    assert ckpt["iteration"] == 3
    # SyncBN's running statistics were updated (saved state is the unwrapped model's BatchNorm buffers)
    assert any(k.endswith("num_batches_tracked") and int(v) == 3 for k, v in ckpt["model"].items())


def test_teacher_bf16_on_cuda_matches_cpu(teacher_file):
    cpu = CLIPTeacher("vild-test-micro", str(teacher_file / "teacher.pt"), templates="simple", device="cpu",
                      cache_dir=str(teacher_file / "cache_cpu"))
    gpu = CLIPTeacher("vild-test-micro", str(teacher_file / "teacher.pt"), templates="simple", device="cuda",
                      cache_dir=str(teacher_file / "cache_gpu"))
    img = torch.from_numpy(scene(96, 128)).permute(2, 0, 1).contiguous()
    boxes = torch.tensor([[5.0, 5.0, 25.0, 25.0], [60.0, 40.0, 120.0, 90.0], [0.0, 0.0, 128.0, 96.0]])
    a = cpu.embed_regions([img], [boxes])[0]
    b = gpu.embed_regions([img.cuda()], [boxes.cuda()])[0].float().cpu()
    assert F.cosine_similarity(a, b, dim=-1).min() > 0.98
    # host boxes and image (the precompute loader's case: boxes go over in one pinned, non-blocking copy)
    assert torch.allclose(gpu.embed_regions([img], [boxes])[0].float().cpu(), b, atol=1e-4)
    ta, tb = cpu.encode_text(["circle", "square"]), gpu.encode_text(["circle", "square"]).float().cpu()
    assert F.cosine_similarity(ta, tb, dim=-1).min() > 0.98


def test_training_batch_reaches_the_gpu_without_a_host_sync(world):
    """The trainer's loader pins the batch on CUDA, so batch_to_device's copies do not wait for the GPU."""
    from test_data import _cfg

    from vild.data import DetectionDataset, batch_to_device, build_train_loader, build_transforms
    cfg = _cfg()
    ds = DetectionDataset(world["coco_train"], world["images_train"], "coco", "all", train=True,
                          transforms=build_transforms(cfg, True))
    images, targets = next(iter(build_train_loader(cfg, ds, pin_memory=True)))
    tensors = lambda ts: [v for t in ts for v in t.values() if torch.is_tensor(v)]  # noqa: E731
    # an empty tensor (no proposal store here) has no memory to pin, and its copy moves nothing
    assert all(x.is_pinned() or x.numel() == 0 for x in images + tensors(targets))
    torch.cuda.set_sync_debug_mode("error")  # a copy that waits for the GPU raises
    try:
        gpu_images, gpu_targets = batch_to_device(images, targets, torch.device("cuda"))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(x.is_cuda for x in gpu_images + tensors(gpu_targets))
    assert all(torch.equal(a.cpu(), b) for a, b in zip(gpu_images + tensors(gpu_targets), images + tensors(targets)))
    with pytest.raises(RuntimeError):  # the check can fail: a blocking copy is a sync
        torch.cuda.set_sync_debug_mode("error")
        try:
            images[0].to("cuda")
        finally:
            torch.cuda.set_sync_debug_mode(0)


def test_detector_on_cuda_matches_cpu(tmp_path):
    path = make_checkpoint(tmp_path)
    img = scene(96, 128)
    outs = {}
    for dev in ("cpu", "cuda"):
        det = Detector.from_checkpoint(path, device=dev, score_thresh=0.0)
        det.set_vocabulary(["circle", "square", "triangle"])
        r = det(img)
        assert r.masks.shape[1:] == (96, 128)
        outs[dev] = r
    a, b = outs["cpu"], outs["cuda"]
    assert len(a.boxes) > 0 and abs(len(a.boxes) - len(b.boxes)) <= max(2, len(a.boxes) // 10)
    # random weights put many scores near each other, so compare as sets: almost every CPU box is on the GPU too
    iou = box_iou(torch.as_tensor(a.boxes).float(), torch.as_tensor(b.boxes).float().cpu())
    assert (iou.max(dim=1).values > 0.95).float().mean() > 0.9


def test_batched_rpn_and_roi_sampling_on_cuda_match_the_cpu():
    """The batched training path (vild/modeling/rpn.py, sampling.py) on the device: the same proposals as on
    the CPU, targets that agree, and a sample of the right sizes, with the loss finite."""
    from test_rpn import _decoded, _features, _pair
    from test_sampling import _boxes, _near
    ref, ours = _pair()
    images, feats = _features()
    anchors, proposals, objectness, per_level = _decoded(ref, images, feats)
    cpu_b, cpu_s = ours.filter_proposals(proposals, objectness, images.image_sizes, per_level)
    gpu_b, gpu_s = ours.filter_proposals(proposals.cuda(), objectness.cuda(), images.image_sizes, per_level)
    for cb, gb, cs, gs in zip(cpu_b, gpu_b, cpu_s, gpu_s):
        # NMS may break near-ties differently on the device: compare the kept sets, not the order
        assert abs(len(cb) - len(gb)) <= 2
        iou = box_iou(cb, gb.cpu())
        assert (iou.max(dim=1).values > 0.999).float().mean() > 0.98
    gts = [torch.tensor([[10.0, 10.0, 60.0, 50.0], [100.0, 60.0, 150.0, 120.0]]), torch.zeros(0, 4),
           torch.tensor([[5.0, 80.0, 40.0, 95.0]])]
    lab_c, box_c = ours.assign_targets_to_anchors_batched(anchors[0], gts)
    lab_g, box_g = ours.assign_targets_to_anchors_batched(anchors[0].cuda(), [g.cuda() for g in gts])
    assert torch.equal(lab_c, lab_g.cpu())
    fg = lab_c == 1
    assert torch.allclose(box_c[fg], box_g.cpu()[fg])
    obj, box = ours.cuda().compute_loss_batched(torch.randn(lab_g.numel(), 1, device="cuda"),
                                                torch.randn(lab_g.numel(), 4, device="cuda"), lab_g,
                                                torch.randn(lab_g.numel(), 4, device="cuda"))
    assert torch.isfinite(obj) and torch.isfinite(box)

    from helpers import tiny_model
    heads = tiny_model().roi_heads.cuda()
    g = _boxes(4, seed=10)
    out = heads.sample_rois([_near(g, 150, 0).cuda(), _boxes(90, seed=5).cuda()],
                            [{"boxes": g.cuda(), "labels": torch.tensor([0, 1, 2, 1], device="cuda")},
                             {"boxes": torch.zeros(0, 4, device="cuda"),
                              "labels": torch.zeros(0, dtype=torch.long, device="cuda")}])
    n = heads.batch_size_per_image
    assert [len(r) for r in out.rois] == [n, n] and n < 90
    assert out.num_pos[1] == 0 and 0 < out.num_pos[0] <= n * heads.positive_fraction
    assert out.labels[:out.num_pos[0]].gt(0).all() and torch.isfinite(out.reg_targets).all()
