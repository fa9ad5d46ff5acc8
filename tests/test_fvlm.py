"""F-VLM (MODEL.VILD.VARIANT fvlm): a frozen CLIP trunk as the backbone, CLIP's own region scores at test time."""
import math
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from vild.api import Detector
from vild.config import load_config
from vild.engine.checkpoint import load_checkpoint
from vild.engine.trainer import Trainer
from vild.io import to_image_tensor
from vild.modeling import build_model
from vild.modeling.fvlm import CLIP_FEATURES, FVLM, fvlm_ensemble
from vild.teacher import CLIPTeacher

TEACHER = Path(__file__).parent / "assets" / "demo_model" / "vild-tiny-clip.pt"  # the demo's ModifiedResNet teacher


def fvlm_cfg(*opts, world=None, out_dir=None):
    """configs/synthetic/fvlm_demo.yaml made smaller, on the session's world."""
    cfg = load_config("configs/synthetic/fvlm_demo.yaml", [
        "TEACHER.PRETRAINED", str(TEACHER), "MODEL.DEVICE", "cpu", "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "100",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50", "MODEL.RPN.PRE_NMS_TOPK_TEST", "100", "MODEL.RPN.POST_NMS_TOPK_TEST",
        "50", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "3",
        "SOLVER.WARMUP_ITERS", "1", "SOLVER.LOG_PERIOD", "1", *opts])
    if world is not None:
        cfg.DATASETS.CUSTOM.merge({"synth_train": {"JSON": world["lvis_train"], "IMAGES": world["images_train"],
                                                   "TYPE": "lvis", "SPLIT": "lvis"}}, allow_new=True)
        cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ["synth_train"], []
        cfg.OUTPUT_DIR = str(out_dir)
        cfg.TEACHER.CACHE_DIR = str(out_dir / "cache")
    return cfg


def teacher_visual() -> torch.nn.Module:
    """The teacher's own image tower, straight from its file (plain BatchNorm, nothing of the detector's)."""
    return open_clip.create_model("vild-tiny-clip", pretrained=str(TEACHER)).visual.eval()


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory, one_thread):
    """Three training steps of the tiny F-VLM (through the Trainer) and the trunk's weights before them."""
    out = tmp_path_factory.mktemp("fvlm") / "run"
    trainer = Trainer(fvlm_cfg(world=world, out_dir=out))
    model = trainer.model
    before = {k: v.clone() for k, v in model.backbone.trunk.visual.state_dict().items()}
    fpn_before = {k: v.clone() for k, v in model.backbone.fpn.state_dict().items()}
    seen_grads = []
    hooks = [p.register_hook(lambda g: seen_grads.append(g)) for p in model.backbone.trunk.parameters()
             if p.requires_grad]
    trainer.train()
    for h in hooks:
        h.remove()
    return {"out": out, "model": model, "trunk_before": before, "fpn_before": fpn_before, "hooked": len(hooks),
            "seen_grads": seen_grads}


def test_frozen_trunk_gets_no_gradient_and_does_not_move(trained):
    model = trained["model"]
    trunk = model.backbone.trunk
    assert trained["hooked"] == 0 and not trained["seen_grads"]
    assert all(not p.requires_grad and p.grad is None for p in trunk.parameters())
    assert not trunk.training  # BatchNorm statistics stay the teacher's while the rest trains
    after = trunk.visual.state_dict()
    assert after.keys() == trained["trunk_before"].keys()
    assert all(torch.equal(after[k], v) for k, v in trained["trunk_before"].items())
    # ... and are the teacher file's weights (BatchNorm folded into FrozenBatchNorm2d's same buffers)
    teacher = teacher_visual().state_dict()
    assert torch.equal(after["layer4.0.conv3.weight"], teacher["layer4.0.conv3.weight"])
    assert torch.equal(after["attnpool.c_proj.weight"], teacher["attnpool.c_proj.weight"])
    assert torch.equal(after["bn1.running_var"], teacher["bn1.running_var"])
    # the rest did train
    fpn = model.backbone.fpn.state_dict()
    assert any(not torch.equal(fpn[k], v) for k, v in trained["fpn_before"].items())


def test_checkpoint_holds_only_trained_weights_and_loads_into_a_detector(trained, world):
    ckpt = load_checkpoint(trained["out"] / "model_final.pth")
    assert ckpt["cfg"]["MODEL"]["VILD"]["VARIANT"] == "fvlm" and ckpt["teacher"]["sha256"]
    assert not [k for k in ckpt["model"] if ".trunk." in k]
    assert any(k.startswith("backbone.fpn.") for k in ckpt["model"])
    assert "roi_heads.classifier.background" in ckpt["model"]
    det = Detector.from_checkpoint(trained["out"] / "model_final.pth", device="cpu")
    assert isinstance(det.model, FVLM)
    trained_state = trained["model"].state_dict()
    assert all(torch.equal(v, trained_state[k]) for k, v in det.model.state_dict().items())
    # the loaded trunk is the teacher's, read from its file
    assert torch.equal(det.model.backbone.trunk.visual.layer3[0].conv2.weight, teacher_visual().layer3[0].conv2.weight)
    # strict loading still refuses weights that do not belong to the model
    with pytest.raises(RuntimeError, match="Unexpected"):
        det.model.load_state_dict({**ckpt["model"], "roi_heads.extra": torch.zeros(1)})


def test_onnx_export_is_refused_with_what_runs_fvlm_instead(trained, tmp_path, capsys):
    """The exported graph has no CLIP region scorer: an F-VLM graph would silently score with the detector alone."""
    from vild.cli.export import main as export_main
    assert export_main(["--weights", str(trained["out"] / "model_final.pth"), "--out", str(tmp_path / "m.onnx"),
                        "--no-text"]) == 2
    err = capsys.readouterr().err
    assert "F-VLM cannot be exported to ONNX" in err and "vild.Detector" in err
    assert not (tmp_path / "m.onnx").exists()


def test_set_vocabulary_swaps_what_both_scorers_classify(trained, world):
    det = Detector.from_checkpoint(trained["out"] / "model_final.pth", device="cpu")
    image = to_image_tensor(str(min(Path(world["images_val"]).iterdir())))
    base = world["base_names"][0]
    novel = world["novel_names"][0]
    det.set_vocabulary(f"{base},{novel}")
    assert det.base_mask == [True, False]
    heads = det.model.roi_heads
    assert heads.classifier.num_classes == 2 and heads.classifier.base_mask.tolist() == [True, False]
    out = det(image)
    assert set(out.names) <= {base, novel} and len(out) > 0
    assert out.labels.max() < 2 and bool((out.scores > 0).all())
    batch, _ = det.model.preprocessor([image])
    _, feats = det.model.extract_features(batch.tensors)
    boxes = [torch.tensor([[10.0, 10.0, 60.0, 60.0], [0.0, 0.0, 128.0, 128.0]])]
    assert heads.vlm_scores(feats[CLIP_FEATURES], boxes).shape == (2, 2)
    det.set_vocabulary(world["base_names"] + world["novel_names"])
    k = len(world["base_names"]) + len(world["novel_names"])
    assert heads.vlm_scores(feats[CLIP_FEATURES], boxes).shape == (2, k)
    assert det.base_mask == [True] * len(world["base_names"]) + [False] * len(world["novel_names"])


def test_vlm_score_is_the_teachers_own_region_embedding(world, one_thread):
    torch.manual_seed(0)
    model = build_model(fvlm_cfg()).eval()
    teacher = CLIPTeacher("vild-tiny-clip", str(TEACHER), templates="simple", cache_dir=None)
    names = world["base_names"] + world["novel_names"]
    text = teacher.encode_text(names)
    model.set_vocabulary(text, torch.tensor([n in world["base_names"] for n in names]))
    image = to_image_tensor(str(min(Path(world["images_val"]).iterdir())))  # 128 x 128
    boxes = torch.tensor([[0.0, 0.0, 128.0, 128.0], [12.5, 20.0, 70.0, 64.5], [64.0, 64.0, 128.0, 128.0],
                          [90.0, 5.0, 127.0, 40.0]])
    with torch.no_grad():
        batch, _ = model.preprocessor([image])
        _, feats = model.extract_features(batch.tensors)
        p_vlm = model.roi_heads.vlm_scores(feats[CLIP_FEATURES], [boxes])
        # by hand, through the teacher's own trunk and attention pool: same normalisation, same last feature map,
        # each box RoIAligned to the pool's grid (pixel-aligned boxes, adaptive sampling)
        visual = teacher.model.visual
        x = ((image.float() / 255.0)[None] - teacher.mean) / teacher.std
        c5 = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(x)))))
        grid = math.isqrt(visual.attnpool.positional_embedding.shape[0] - 1)
        emb = F.normalize(visual.attnpool(roi_align(c5, [boxes], (grid, grid), 1 / 32, -1, aligned=True)), dim=-1)
        by_hand = F.softmax(emb @ text.t() / 0.01, dim=-1)
    assert torch.allclose(p_vlm, by_hand, atol=1e-5)
    # the whole image at the teacher's own input size is CLIP's embedding of that image
    small = F.interpolate(image[None].float(), size=(32, 32), mode="bilinear", antialias=True)[0].round().byte()
    with torch.no_grad():
        model.preprocessor.test_size = 32
        batch, _ = model.preprocessor([small])
        _, feats = model.extract_features(batch.tensors)
        emb_full = model.roi_heads.vlm(feats[CLIP_FEATURES], [torch.tensor([[0.0, 0.0, 32.0, 32.0]])])
    assert torch.allclose(emb_full, teacher.embed_crops(small[None].float() / 255.0), atol=1e-5)


def test_ensemble_formula_matches_a_hand_computation():
    p_det = torch.tensor([[0.5, 0.2, 0.1], [0.04, 0.3, 0.6]])
    p_vlm = torch.tensor([[0.1, 0.7, 0.2], [0.9, 0.05, 0.05]])
    base = torch.tensor([True, False, True])
    got = fvlm_ensemble(p_det, p_vlm, base, alpha=0.35, beta=0.65)
    want = [[0.5 ** 0.65 * 0.1 ** 0.35, 0.2 ** 0.35 * 0.7 ** 0.65, 0.1 ** 0.65 * 0.2 ** 0.35],
            [0.04 ** 0.65 * 0.9 ** 0.35, 0.3 ** 0.35 * 0.05 ** 0.65, 0.6 ** 0.65 * 0.05 ** 0.35]]
    assert torch.allclose(got, torch.tensor(want), rtol=1e-6)
    # alpha and beta are independent weights: α = 0 keeps the detector's score for base categories
    assert torch.allclose(fvlm_ensemble(p_det, p_vlm, base, 0.0, 1.0)[:, base], p_det[:, base])
    assert torch.allclose(fvlm_ensemble(p_det, p_vlm, base, 0.0, 1.0)[:, ~base], p_vlm[:, ~base])


def test_detector_scores_are_the_ensemble_of_its_two_scorers(one_thread):
    torch.manual_seed(0)
    model = build_model(fvlm_cfg("MODEL.ROI_HEADS.NMS_THRESH_TEST", "1.0")).eval()
    heads = model.roi_heads
    text = F.normalize(torch.randn(3, 64), dim=-1)
    model.set_vocabulary(text, torch.tensor([True, False, False]))
    image = torch.randint(0, 256, (3, 128, 128), dtype=torch.uint8)
    seen = {}
    plain = type(heads).__mro__[1].rescore  # the heads' scores before the ensemble

    def spy(scores, boxes, counts, features, image_sizes, vocabulary):
        seen["det"] = plain(heads, scores, boxes, counts, features, image_sizes, vocabulary)
        seen["boxes"] = boxes
        seen["out"] = type(heads).rescore(heads, scores, boxes, counts, features, image_sizes, vocabulary)
        return seen["out"]
    heads.rescore = spy
    with torch.no_grad():
        batch, _ = model.preprocessor([image])
        _, feats = model.extract_features(batch.tensors)
        model([image])
        p_vlm = heads.vlm_scores(feats[CLIP_FEATURES], [seen["boxes"].clamp(0, 128)])
    w = torch.tensor([0.35, 0.65, 0.65])
    # probabilities are floored at 1e-12 before the powers (a softmax can underflow to 0)
    want = seen["det"].clamp_min(1e-12) ** (1 - w) * p_vlm.clamp_min(1e-12) ** w
    assert torch.allclose(seen["out"], want, rtol=1e-5, atol=1e-7)


def test_vit_teacher_is_refused_with_the_teachers_that_work():
    cfg = load_config("configs/synthetic/fvlm_demo.yaml",
                      ["TEACHER.MODEL", "vild-test-micro", "TEACHER.PRETRAINED", ""])
    with pytest.raises(ValueError, match=r"ModifiedResNet.*RN50.*vild-test-micro.*VisionTransformer"):
        build_model(cfg)
    with pytest.raises(ValueError, match="set MODEL.VILD.EMBED_DIM 64"):
        build_model(load_config("configs/synthetic/fvlm_demo.yaml", [
            "TEACHER.PRETRAINED", str(TEACHER), "MODEL.VILD.EMBED_DIM", "32"]))


def test_half_precision_trunk_keeps_float32_outputs_close_to_fp32(one_thread):
    image = torch.randint(0, 256, (3, 128, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    boxes = [torch.tensor([[8.0, 8.0, 72.0, 60.0], [40.0, 30.0, 120.0, 128.0]])]
    emb = {}
    for dtype in ("", "bf16"):
        model = build_model(fvlm_cfg("MODEL.FVLM.TRUNK_DTYPE", dtype)).eval()
        with torch.no_grad():
            batch, _ = model.preprocessor([image])
            levels, feats = model.extract_features(batch.tensors)
            emb[dtype] = model.roi_heads.vlm(feats[CLIP_FEATURES], boxes)
        assert all(v.dtype == torch.float32 for v in [*levels.values(), feats[CLIP_FEATURES]])
    assert model.backbone.trunk.visual.layer2[0].conv1.weight.dtype == torch.bfloat16
    assert F.cosine_similarity(emb[""], emb["bf16"]).min() > 0.97
    with pytest.raises(ValueError, match="TRUNK_DTYPE"):
        build_model(fvlm_cfg("MODEL.FVLM.TRUNK_DTYPE", "int8"))
