import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.ops import batched_nms

from vild.modeling import ensemble_scores
from vild.modeling.losses import box_regression_loss, distillation_loss
from vild.modeling.postprocess import paste_masks, select_detections

from helpers import DIM, tiny_model, vocab  # noqa: E402
from helpers import model_scene as scene  # noqa: E402


def train(model, steps, images, targets, lr=0.02):
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    history = []
    for _ in range(steps):
        losses = model(images, targets)
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append({k: v.item() for k, v in losses.items()})
    return history


@pytest.mark.parametrize("variant", ["text", "vild", "ensemble"])
def test_tiny_vild_losses_fall(variant):
    # a larger distillation weight makes its fall visible in a few steps next to the classification loss
    model = tiny_model(variant, **{"MODEL.VILD.DISTILL_WEIGHT": 2.0})
    model.set_vocabulary(vocab(), torch.tensor([True, True, False]))
    imgs, targets = [], []
    for s in range(2):
        img, t = scene(seed=s)
        t["proposal_boxes"] = torch.tensor([[20.0, 10.0, 70.0, 50.0], [90.0, 40.0, 150.0, 90.0], [0, 0, 30, 30]])
        t["proposal_embeds"] = vocab()  # a consistent teacher: the CLIP embedding of each box's class
        t["proposal_valid"] = torch.ones(3, dtype=torch.bool)
        imgs.append(img)
        targets.append(t)
    hist = train(model, 20, imgs, targets, lr=0.005)
    totals = [sum(h.values()) for h in hist]
    assert sum(totals[-3:]) / 3 < 0.7 * totals[0]
    assert hist[-1]["loss_cls"] < hist[0]["loss_cls"]
    assert ("loss_distill" in hist[0]) == (variant != "text")
    if variant != "text":
        assert hist[-1]["loss_distill"] < hist[0]["loss_distill"]


def test_distillation_loss_zero_when_equal_and_grows():
    e = vocab(5)
    valid = torch.ones(5, dtype=torch.bool)
    assert distillation_loss(e, e, valid).item() == pytest.approx(0.0, abs=1e-6)
    near = distillation_loss(F.normalize(e + 0.05 * vocab(5, 2), dim=-1), e, valid)
    far = distillation_loss(vocab(5, 3), e, valid)
    assert 0 < near < far
    # invalid (padding) rows do not count, and the mean is over valid rows only
    mixed = torch.cat([e[:2], vocab(3, 4)])
    assert distillation_loss(mixed, e, torch.tensor([True, True, False, False, False])).item() == pytest.approx(0.0, abs=1e-6)
    one_off = distillation_loss(mixed[2:3], e[2:3], torch.tensor([True]))
    assert distillation_loss(mixed, e, torch.tensor([True, True, True, False, False])) == pytest.approx(one_off / 3)


def test_losses_without_valid_or_foreground_rows():
    """Masked (sync-free) losses: nothing valid or foreground gives 0 with finite gradients, and
    background rows never count, even with the infinite targets of an image without boxes."""
    region = vocab(4).requires_grad_()
    d = distillation_loss(region, vocab(4, 2), torch.zeros(4, dtype=torch.bool))
    d.backward()
    assert d.item() == 0.0 and torch.isfinite(region.grad).all()

    deltas = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)).requires_grad_()
    targets = torch.randn(4, 4, generator=torch.Generator().manual_seed(1))
    targets[3] = float("-inf")
    labels = torch.tensor([2, 0, 1, 0])
    loss = box_regression_loss(deltas, targets, labels)
    fg = labels > 0
    ref = F.smooth_l1_loss(deltas[fg], targets[fg], beta=1 / 9, reduction="sum") / 4
    assert torch.allclose(loss, ref)
    loss.backward()
    assert torch.isfinite(deltas.grad).all() and (deltas.grad[~fg] == 0).all()


def test_ensemble_matches_hand_computation():
    p_t = torch.tensor([[0.6, 0.1, 0.3]])
    p_i = torch.tensor([[0.2, 0.5, 0.3]])
    base = torch.tensor([True, False, True])
    lam = 2 / 3
    out = ensemble_scores(p_t, p_i, base, lam)
    want = [0.6 ** lam * 0.2 ** (1 - lam), 0.1 ** (1 - lam) * 0.5 ** lam, 0.3 ** lam * 0.3 ** (1 - lam)]
    assert out[0].tolist() == pytest.approx(want, rel=1e-5)


def test_inference_on_non_square_image_returns_original_frame(monkeypatch):
    """Detections made in the resized network frame come back in the caller's frame, masks pasted there."""
    model = tiny_model("text", **{"INPUT.TEST_SIZE": 224})
    model.set_vocabulary(vocab(2))
    model.eval()
    img, t = scene(96, 160)
    seen = {}

    def fake_heads(features, proposals, image_sizes, objectness=None, settings=None, vocabulary=None):
        # the network sees the image with its longest side at TEST_SIZE; answer with the objects in that frame
        seen["sizes"] = image_sizes
        (h, w), = image_sizes
        scale = torch.tensor([w / 160, h / 96, w / 160, h / 96])
        n = len(t["boxes"])
        return [{"boxes": t["boxes"] * scale, "scores": torch.tensor([0.9, 0.8]), "labels": t["labels"],
                 "mask_probs": torch.ones(n, 28, 28)}]

    monkeypatch.setattr(model.roi_heads, "forward_test", fake_heads)
    with torch.no_grad():
        out = model([img])[0]
    assert seen["sizes"] == [(134, 224)]
    assert torch.allclose(out["boxes"], t["boxes"], atol=1e-4)
    assert out["masks"].shape == (2, 96, 160) and out["masks"].dtype == torch.bool
    assert torch.equal(out["masks"], t["masks"].bool())
    assert out["scores"].shape == (2,) and out["labels"].dtype == torch.int64


def test_real_heads_keep_boxes_inside_a_non_square_image():
    model = tiny_model("ensemble", **{"INPUT.TEST_SIZE": 224})
    model.set_vocabulary(vocab(3), torch.tensor([True, False, True]))
    model.eval()
    img, _ = scene(96, 160)
    with torch.no_grad():
        out = model([img, img[:, :50]])
    for o, (h, w) in zip(out, [(96, 160), (50, 160)]):
        n = len(o["boxes"])
        assert 0 < n <= 50
        assert o["masks"].shape == (n, h, w)
        assert (o["boxes"][:, 0::2] <= w + 1e-3).all() and (o["boxes"][:, 1::2] <= h + 1e-3).all()
        assert (o["boxes"] >= 0).all() and (o["scores"][:-1] >= o["scores"][1:]).all()


def test_set_vocabulary_changes_labels_and_checks_dimension():
    model = tiny_model("vild")
    model.eval()
    img, _ = scene()
    emb = vocab(4)
    model.set_vocabulary(emb)
    with torch.no_grad():
        a = model([img])[0]["labels"]
    perm = torch.tensor([2, 3, 0, 1])
    model.set_vocabulary(emb[perm])
    with torch.no_grad():
        b = model([img])[0]["labels"]
    # the same regions win; only their vocabulary indices moved
    assert torch.equal(perm[b], a)
    model.set_vocabulary(emb[:1])
    with torch.no_grad():
        assert set(model([img])[0]["labels"].tolist()) == {0}
    with pytest.raises(ValueError, match="EMBED_DIM"):
        model.set_vocabulary(torch.randn(3, DIM + 1))
    with pytest.raises(ValueError, match="empty"):
        model.set_vocabulary(torch.zeros(0, DIM))



def test_a_vocabulary_passed_per_call_serves_that_call_only():
    """``model(images, vocabulary=...)`` detects as if that vocabulary were installed, and leaves the installed
    one (the very tensors) as it was."""
    model = tiny_model("ensemble").eval()
    model.set_vocabulary(vocab(3), torch.tensor([True, True, False]))
    installed = model.roi_heads.classifier.installed_vocabulary
    values = [t.clone() for t in installed]
    img, _ = scene()
    other_mask = torch.tensor([True, False, True, False, False])
    with torch.no_grad():
        plain = model([img])[0]
        per_call = model([img], vocabulary=model.make_vocabulary(vocab(5, seed=7), other_mask))[0]
        again = model([img])[0]
        after = model.roi_heads.classifier.installed_vocabulary
        assert all(a is b for a, b in zip(after, installed)) and all(map(torch.equal, after, values))
        model.set_vocabulary(vocab(5, seed=7), other_mask)
        swapped = model([img])[0]
    assert len(per_call["scores"]) > 0 and not torch.equal(per_call["scores"], plain["scores"])
    for k in per_call:
        assert torch.equal(per_call[k], swapped[k]), k
        assert torch.equal(plain[k], again[k]), k
    with pytest.raises(ValueError, match="base_mask"):
        model.make_vocabulary(vocab(5), torch.tensor([True]))

def naive_select(boxes, scores, score_thresh, nms_thresh, max_dets):
    """The straightforward post-process: every (box with area, class) over the threshold, per-class NMS."""
    r, k = scores.shape
    b = boxes[:, None].expand(r, k, 4).reshape(-1, 4)
    s, lab = scores.reshape(-1), torch.arange(k).repeat(r)
    keep = (s > score_thresh) & (b[:, 2] - b[:, 0] > 1e-2) & (b[:, 3] - b[:, 1] > 1e-2)
    b, s, lab = b[keep], s[keep], lab[keep]
    keep = batched_nms(b, s, lab, nms_thresh)[:max_dets]
    return b[keep], s[keep], lab[keep]


def test_fast_postprocess_gives_the_same_detections_as_the_naive_one():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(400, 2, generator=g) * 300
    boxes = torch.cat([xy, xy + 20 + torch.rand(400, 2, generator=g) * 100], 1)
    logits = torch.randn(400, 1 + 80, generator=g) * 3
    scores = logits.softmax(-1)[:, 1:]
    ref = naive_select(boxes, scores, 0.0, 0.5, 100)
    fast = select_detections(boxes, scores, 0.0, 0.5, 100, topk_candidates=5000)
    for a, b in zip(ref, fast):
        assert torch.equal(a, b)
    # all candidates (topk 0) must equal the reference exactly too
    for a, b in zip(ref, select_detections(boxes, scores, 0.0, 0.5, 100, topk_candidates=0)):
        assert torch.equal(a, b)


def test_peaky_scores_grow_the_top_k_until_the_detections_are_exact():
    """A trained model's scores are peaky: the best pairs are mostly one class on overlapping boxes, so
    NMS over the first top-k leaves few; the result must still be the full 300 the naive path gives."""
    g = torch.Generator().manual_seed(1)
    centers = torch.rand(6, 2, generator=g) * 400
    xy = centers.repeat_interleave(100, 0) + torch.randn(600, 2, generator=g) * 3  # 6 objects, 100 boxes each
    boxes = torch.cat([xy, xy + 60], 1)
    boxes[5, 2] = boxes[5, 0]  # clipped to nothing: no detection, however high it scores
    logits = torch.randn(600, 1 + 400, generator=g) * 0.3
    obj = torch.arange(600) // 100
    for j, bonus in enumerate((12, 10, 8)):  # each object's three likeliest classes dominate all its boxes
        logits[torch.arange(600), 1 + 3 * obj + j] += bonus
    scores = logits.softmax(-1)[:, 1:]
    scores[5] = 0.99
    ref = naive_select(boxes, scores, 0.0, 0.5, 300)
    assert len(ref[0]) == 300 and 5 not in select_detections(boxes, scores, 0.0, 0.5, 300, 0)[3].tolist()
    kth = torch.cat([scores[:5], scores[6:]]).reshape(-1).topk(1000).values[-1]
    assert (ref[1] < kth).sum() > 200, "the case must need more than the first top-k"
    fast = select_detections(boxes, scores, 0.0, 0.5, 300, topk_candidates=1000)
    assert torch.equal(ref[1], fast[1])
    # the order of exactly tied scores is arbitrary: compare the detections as a set
    as_set = lambda d: sorted(zip(d[1].tolist(), d[2].tolist(), map(tuple, d[0].tolist())))  # noqa: E731
    assert as_set(ref) == as_set(fast)


def naive_paste(probs, boxes, h, w):
    """One grid_sample per detection, the same bilinear convention (zeros outside the mask)."""
    ys, xs = torch.arange(h) + 0.5, torch.arange(w) + 0.5
    out = []
    for p, (x0, y0, x1, y1) in zip(probs, boxes.tolist()):
        gx = 2 * (xs - x0) / (x1 - x0) - 1
        gy = 2 * (ys - y0) / (y1 - y0) - 1
        grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], -1)
        out.append(F.grid_sample(p[None, None], grid[None], align_corners=False, padding_mode="zeros")[0, 0])
    return torch.stack(out)


def smooth_masks(n, g):
    """Blob-shaped mask probabilities, like a trained mask head's."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 28), torch.linspace(-1, 1, 28), indexing="ij")
    c = torch.rand(n, 2, generator=g) * 0.6 - 0.3
    r = torch.rand(n, 1, 1, generator=g) * 0.5 + 0.4
    d = ((xx - c[:, :1, None]) ** 2 + (yy - c[:, 1:, None]) ** 2).sqrt()
    return torch.sigmoid((r - d) * 12)


def test_batched_mask_paste_matches_naive_and_torchvision():
    g = torch.Generator().manual_seed(0)
    n, h, w = 40, 90, 130
    xy = torch.rand(n, 2, generator=g) * 80 - 10  # some boxes cross the border
    boxes = torch.cat([xy, xy + 10 + torch.rand(n, 2, generator=g) * 50], 1)
    probs = smooth_masks(n, g)
    ours = paste_masks(probs, boxes, h, w, chunk=16)
    naive = naive_paste(probs, boxes, h, w) >= 0.5
    assert (ours != naive).sum() <= 2  # float rounding exactly at the threshold only
    ref = paste_masks_in_image(probs[:, None], boxes, (h, w))[:, 0] >= 0.5
    inter = (ours & ref).sum((1, 2)).float()
    union = (ours | ref).sum((1, 2)).float()
    iou = inter[union > 0] / union[union > 0]
    assert iou.mean() > 0.9 and iou.min() > 0.7  # torchvision rounds boxes to whole pixels; we do not
    # a memory budget below one float image pastes one mask at a time: the same masks
    assert torch.equal(paste_masks(probs, boxes, h, w, chunk_bytes=1), ours)
    assert torch.equal(paste_masks(probs, boxes, h, w, chunk_bytes=7 * 4 * h * w), ours)  # chunks of 7, last of 5


def test_masks_are_computed_once_per_distinct_box():
    """Detections of several classes from one proposal share box and mask; the mask head sees each box once."""
    model = tiny_model("vild", **{"MODEL.ROI_HEADS.NMS_THRESH_TEST": 0.99, "MODEL.RPN.POST_NMS_TOPK_TEST": 5})
    model.set_vocabulary(vocab(6))
    model.eval()
    img, _ = scene()
    seen = []
    model.roi_heads.mask_predictor.register_forward_hook(lambda m, i, o: seen.append(len(i[0])))
    with torch.no_grad():
        out = model([img], paste_masks=False)[0]
    distinct = torch.unique(out["boxes"], dim=0)
    assert len(distinct) < len(out["boxes"])  # some proposals produced detections of several classes
    assert seen == [len(distinct)]
    for box in distinct:
        same = (out["boxes"] == box).all(1)
        assert torch.equal(out["mask_probs"][same], out["mask_probs"][same][:1].expand(int(same.sum()), -1, -1))


def test_cpu_conv_stacks_give_the_same_outputs(monkeypatch):
    """run_conv_stack (channels-last, BatchNorm folded at inference, the fc as a convolution) is a speed-up only:
    same losses, gradients and detections as the heads' own forward."""
    import vild.modeling.box_head as box_head
    import vild.modeling.conv_stack as conv_stack
    import vild.modeling.roi_heads as roi_heads
    monkeypatch.setattr(conv_stack, "FC_AS_CONV_MIN_ROWS", 1)  # the tiny model's few RoIs take every path
    calls = {"fold": 0, "fc": 0}
    for name in ("_folded_block", "_linear_as_conv"):
        fn = getattr(conv_stack, name)
        key = "fold" if name == "_folded_block" else "fc"
        monkeypatch.setattr(conv_stack, name,
                            lambda *a, fn=fn, key=key: calls.__setitem__(key, calls[key] + 1) or fn(*a))
    img, target = scene()
    results = []
    for path in ("fast", "plain"):
        if path == "plain":
            monkeypatch.setattr(box_head, "run_conv_stack", lambda stack, x: stack(x))
            monkeypatch.setattr(roi_heads, "run_conv_stack", lambda stack, x: stack(x))
        model = tiny_model("vild", **{"MODEL.ROI_BOX_HEAD.NUM_CONV": 2, "MODEL.ROI_BOX_HEAD.NORM": "BN"})
        model.set_vocabulary(vocab(2))
        model.train()
        torch.manual_seed(1)
        losses = model([img], [target])
        sum(losses.values()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.eval()  # the step moved BatchNorm's running statistics: folding sees non-trivial ones
        with torch.no_grad():
            out = model([img])[0]
        results.append((losses, grads, out))
        if path == "fast":
            assert calls["fold"] > 0 and calls["fc"] > 0, calls  # both rewrites ran
    (la, ga, oa), (lb, gb, ob) = results
    for k in la:
        assert torch.allclose(la[k], lb[k], atol=1e-5), k
    assert ga.keys() == gb.keys()
    for k in ga:
        assert torch.allclose(ga[k], gb[k], atol=1e-4, rtol=1e-3), k
    assert torch.allclose(oa["boxes"], ob["boxes"], atol=1e-4) and torch.allclose(oa["scores"], ob["scores"], atol=1e-5)
    assert torch.equal(oa["masks"], ob["masks"])


def test_hooks_on_a_head_still_fire():
    """A hooked stack runs its own forward on the CPU too, so feature-extraction hooks see every call."""
    model = tiny_model("vild", **{"MODEL.ROI_BOX_HEAD.NUM_CONV": 2, "MODEL.ROI_BOX_HEAD.NORM": "BN"})
    model.set_vocabulary(vocab(2))
    model.eval()
    seen = []
    model.roi_heads.text_head.stack[-2].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        model([scene()[0]])
    assert len(seen) == 1 and seen[0][1] == model.roi_heads.text_head.stack[-2].out_features


def _resnet_cfg(**opts):
    from vild.config import get_cfg
    cfg = get_cfg()
    cfg.MODEL.BACKBONE.NAME, cfg.MODEL.BACKBONE.OUT_CHANNELS = "resnet18", 16
    for k, v in opts.items():
        setattr(cfg.MODEL.BACKBONE, k, v)
    return cfg


def test_frozen_bn_from_scratch_is_refused_unless_a_checkpoint_follows(tmp_path):
    from vild.modeling.backbone import build_backbone
    with pytest.raises(ValueError, match="NORM SyncBN"):
        build_backbone(_resnet_cfg(NORM="FrozenBN", PRETRAINED=""))
    build_backbone(_resnet_cfg(NORM="FrozenBN", PRETRAINED=""), load_pretrained=False)
    assert _resnet_cfg().MODEL.BACKBONE.NORM == "SyncBN"  # the default trains from scratch with working BN


def test_frozen_stages_keep_their_batchnorm_statistics(tmp_path):
    from torchvision.models import resnet18
    from torchvision.ops import FrozenBatchNorm2d

    from vild.modeling.backbone import build_backbone
    torch.manual_seed(0)
    weights = tmp_path / "r18.pth"
    torch.save(resnet18().state_dict(), weights)
    cfg = _resnet_cfg(NORM="BN", PRETRAINED=str(weights), TRAINABLE_LAYERS=2)
    net = build_backbone(cfg).train()
    body = net.body
    assert isinstance(body.bn1, FrozenBatchNorm2d) and isinstance(body.layer2[0].bn1, FrozenBatchNorm2d)
    assert isinstance(body.layer3[0].bn1, torch.nn.BatchNorm2d)  # trainable stages keep learning statistics
    before = {k: v.clone() for k, v in body.state_dict().items()}
    net(torch.randn(2, 3, 64, 64) * 5 + 3)
    after = body.state_dict()
    frozen = [k for k in before if k.startswith(("bn1.", "layer1.", "layer2.")) and "running_mean" in k]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["layer3.0.bn1.running_mean"], after["layer3.0.bn1.running_mean"])
    # a checkpoint's model is built the same way without the ImageNet file being present
    weights.unlink()
    again = build_backbone(cfg, load_pretrained=False)
    assert again.state_dict().keys() == net.state_dict().keys()


def test_tiny_backbone_starts_from_weights_that_fit_and_names_those_that_do_not(tmp_path):
    from vild.config import load_config
    from vild.modeling.backbone import TinyCNN, build_backbone
    from vild.synthetic.demo import SHIPPED_BACKBONE
    cfg = load_config("synthetic/demo_base.yaml")
    torch.manual_seed(0)
    source = TinyCNN(cfg.MODEL.BACKBONE.TINY_WIDTH)
    torch.save(source.state_dict(), tmp_path / "tiny.pt")
    cfg.MODEL.BACKBONE.PRETRAINED = str(tmp_path / "tiny.pt")
    body = build_backbone(cfg).body.state_dict()
    assert all(torch.equal(body[k], v) for k, v in source.state_dict().items())
    assert not all(torch.equal(v, build_backbone(load_config("synthetic/demo_base.yaml")).body.state_dict()[k])
                   for k, v in body.items() if v.is_floating_point())  # random init differs
    cfg.MODEL.BACKBONE.PRETRAINED = str(SHIPPED_BACKBONE)  # the demo's shipped weights fit its config
    build_backbone(cfg)
    cfg.MODEL.BACKBONE.TINY_WIDTH = 16
    with pytest.raises(ValueError, match="TINY_WIDTH 16"):
        build_backbone(cfg)
    cfg.MODEL.BACKBONE.PRETRAINED = str(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        build_backbone(cfg)


def test_classifier_logits_are_fp32_under_bf16_autocast():
    """×100 logits in bf16 come in steps of 0.25: enough to reorder near-tied classes."""
    from vild.modeling.classifier import TextClassifier
    torch.manual_seed(0)
    clf = TextClassifier(64)
    clf.set_vocabulary(torch.randn(300, 64))
    x = F.normalize(torch.randn(50, 64), dim=-1)
    ref = clf(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        exact = clf(x)
        from_bf16 = clf(x.bfloat16())
    assert exact.dtype == from_bf16.dtype == torch.float32
    assert torch.equal(exact, ref)


@pytest.mark.parametrize("variant", ["text", "vild", "ensemble"])
def test_every_parameter_gets_a_gradient_without_objects_or_proposals(variant):
    """DDP runs with find_unused_parameters=False: a crop with no object (common under large-scale jitter)
    or an image without stored proposals must still give every parameter a gradient."""
    model = tiny_model(variant)
    model.set_vocabulary(vocab(), torch.tensor([True, True, False]))
    model.train()
    img, t = scene()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
             "masks": torch.zeros(0, *img.shape[1:], dtype=torch.uint8),
             "proposal_boxes": torch.zeros(0, 4), "proposal_embeds": torch.zeros(0, DIM),
             "proposal_valid": torch.zeros(0, dtype=torch.bool)}
    sum(model([img, img], [empty, dict(empty)]).values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"


def test_one_roialign_over_sampled_and_distillation_boxes_pools_each_box_as_alone():
    """forward_train pools both kinds of boxes in one call and unzips them per image."""
    from vild.modeling.roi_heads import _unzip
    model = tiny_model("vild").eval()
    batch, _ = model.preprocessor([scene(seed=s)[0] for s in range(2)])
    features = model.backbone(batch.tensors)
    g = torch.Generator().manual_seed(0)

    def rand(n):
        xy = torch.rand(n, 2, generator=g) * 60
        return torch.cat([xy, xy + 10 + torch.rand(n, 2, generator=g) * 40], 1)

    rois, d = [rand(5), rand(2)], [rand(3), rand(4)]
    pool = model.roi_heads.box_pooler
    sizes = [n for r, b in zip(rois, d) for n in (len(r), len(b))]
    a, b = _unzip(pool(features, [torch.cat([r, x]) for r, x in zip(rois, d)], batch.image_sizes), sizes)
    assert torch.equal(a, pool(features, rois, batch.image_sizes))
    assert torch.equal(b, pool(features, d, batch.image_sizes))


def test_test_time_shrinking_filters_like_training_and_growing_is_unchanged():
    """Shrinking a large image to TEST_SIZE averages its pixel noise (antialias, as training's resizes do);
    plain bilinear reads 2x2 pixels per output pixel and passes most of the noise on. Growing a small
    image (COCO/LVIS at 1024) is plain bilinear as before."""
    import torch.nn.functional as F

    from vild.modeling.preprocess import ImagePreprocessor
    pre = ImagePreprocessor([128.0] * 3, [1.0] * 3, test_size=128).eval()
    g = torch.Generator().manual_seed(0)
    noisy = (128 + 40 * torch.randn(3, 640, 640, generator=g)).clamp(0, 255).to(torch.uint8)
    batch, _ = pre([noisy])
    x = noisy.float()[None] - 128
    plain = F.interpolate(x, size=(128, 128), mode="bilinear", align_corners=False)
    assert batch.tensors.shape[-2:] == (128, 128)
    assert batch.tensors.std() < 0.4 * plain.std()  # ~40/5 against ~40/2
    small = torch.randint(0, 256, (3, 48, 64), generator=g, dtype=torch.uint8)
    batch, _ = pre([small])
    grown = F.interpolate(small.float()[None] - 128, size=(96, 128), mode="bilinear", align_corners=False)
    assert torch.equal(batch.tensors[0, :, :96, :128], grown[0])


def test_distillation_inputs_keep_the_first_proposals_and_drop_sub_pixel_boxes():
    heads = tiny_model().roi_heads
    n, dim = heads.num_distill_proposals, heads.classifier.embed_dim
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]]).repeat(n + 3, 1)
    boxes[1, 2] = 0.5  # under 1 px wide: no embedding worth matching
    embeds = torch.arange(n + 3, dtype=torch.float16)[:, None].expand(-1, dim)
    flags = torch.ones(n + 3, dtype=torch.bool)
    flags[2] = False
    targets = [{"proposal_boxes": boxes, "proposal_embeds": embeds, "proposal_valid": flags},
               {"proposal_boxes": boxes[:2], "proposal_embeds": embeds[:2]},  # no flags: all stored boxes count
               {"proposal_boxes": torch.zeros(0, 4)}]
    out_boxes, out_embeds, valid = heads._distill_inputs(targets, torch.device("cpu"))
    assert [len(b) for b in out_boxes] == [n, 2, 0]
    assert out_embeds.dtype == torch.float32 and out_embeds[:, 0].tolist() == list(range(n)) + [0, 1]
    assert valid.tolist() == [True, False, False] + [True] * (n - 3) + [True, False]
