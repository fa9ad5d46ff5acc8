"""The batched RPN (vild.modeling.rpn) against torchvision's RegionProposalNetwork on the same inputs."""
import torch
import torch.nn.functional as F
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

from vild.modeling.rpn import BatchedRPN
from vild.modeling.sampling import sample_balanced, sampled_mask

SIZES = ((16,), (32,), (64,))


def _pair(pre=60, post=40):
    anchors = AnchorGenerator(SIZES, ((0.5, 1.0, 2.0),) * len(SIZES))
    args = (anchors, RPNHead(8, 3), 0.7, 0.3, 64, 0.5, dict(training=pre, testing=pre),
            dict(training=post, testing=post), 0.7)
    return RegionProposalNetwork(*args), BatchedRPN(*args)


def _features(batch=3, h=128, w=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = ImageList(torch.zeros(batch, 3, h, w), [(h, w), (h - 30, w), (h, w - 50)][:batch])
    feats = [torch.randn(batch, 8, h // s, w // s, generator=g) for s in (4, 8, 16)]
    return images, feats


def _decoded(rpn, images, feats, seed=0):
    """Proposals and objectness as RegionProposalNetwork.forward hands them to filter_proposals."""
    g = torch.Generator().manual_seed(seed)
    anchors = rpn.anchor_generator(images, feats)
    per_level = [f.shape[-2] * f.shape[-1] * 3 for f in feats]
    total = sum(per_level)
    deltas = torch.randn(len(feats[0]) * total, 4, generator=g) * 0.5
    deltas[::17] *= 8  # some boxes leave the image and clip to nothing
    objectness = torch.randn(len(feats[0]) * total, 1, generator=g)
    proposals = rpn.box_coder.decode(deltas, anchors).view(len(feats[0]), -1, 4)
    return anchors, proposals, objectness, per_level


def test_filter_proposals_equals_torchvision():
    ref, ours = _pair()
    images, feats = _features()
    for train in (True, False):
        ref.train(train)
        ours.train(train)
        _, proposals, objectness, per_level = _decoded(ref, images, feats)
        want_b, want_s = ref.filter_proposals(proposals, objectness, images.image_sizes, per_level)
        got_b, got_s = ours.filter_proposals(proposals, objectness, images.image_sizes, per_level)
        assert [len(b) for b in got_b] == [len(b) for b in want_b]
        for gb, wb, gs, ws in zip(got_b, want_b, got_s, want_s):
            assert torch.equal(gb, wb) and torch.equal(gs, ws)


def test_small_boxes_are_dropped_as_torchvision_drops_them():
    ref, ours = _pair(pre=500, post=5000)  # nothing cut by count: dropped boxes would show
    images, feats = _features(batch=2, seed=3)
    ref.min_size = ours.min_size = 6.0  # many boxes below it: the drop path matters
    _, proposals, objectness, per_level = _decoded(ref, images, feats, seed=3)
    want_b, want_s = ref.filter_proposals(proposals, objectness, images.image_sizes, per_level)
    got_b, got_s = ours.filter_proposals(proposals, objectness, images.image_sizes, per_level)
    wh = proposals[..., 2:] - proposals[..., :2]
    assert (wh < 6).any(-1).any()
    for gb, wb, gs, ws in zip(got_b, want_b, got_s, want_s):
        assert torch.equal(gb, wb) and torch.equal(gs, ws)


def test_anchor_targets_equal_torchvision_with_low_quality_matches_and_empty_images():
    ref, ours = _pair()
    images, feats = _features()
    anchors = ref.anchor_generator(images, feats)
    gts = [torch.tensor([[10.0, 10.0, 60.0, 50.0], [70.0, 20.0, 74.0, 23.0], [100.0, 60.0, 150.0, 120.0]]),
           torch.zeros(0, 4), torch.tensor([[5.0, 80.0, 40.0, 95.0]])]
    want_labels, want_boxes = ref.assign_targets_to_anchors(anchors, [{"boxes": g} for g in gts])
    labels, boxes = ours.assign_targets_to_anchors_batched(anchors[0], gts)
    for i in range(3):
        assert torch.equal(labels[i], want_labels[i])
        fg = want_labels[i] == 1
        assert torch.equal(boxes[i][fg], want_boxes[i][fg])
    # the 4x3 box is too small for IoU 0.7 with any anchor: only low-quality matching makes it foreground
    tiny = torch.tensor([70.0, 20.0, 74.0, 23.0])
    assert (boxes[0][labels[0] == 1] == tiny).all(-1).any()
    assert labels[1].eq(0).all() and boxes[1].eq(0).all()


def test_iou_is_built_a_few_images_at_a_time_when_large(monkeypatch):
    import vild.modeling.rpn as rpn_mod
    ref, ours = _pair()
    images, feats = _features()
    anchors = ref.anchor_generator(images, feats)
    gts = [torch.tensor([[10.0, 10.0, 60.0, 50.0]]), torch.tensor([[5.0, 80.0, 40.0, 95.0]]),
           torch.tensor([[50.0, 30.0, 90.0, 100.0]])]
    whole = ours.assign_targets_to_anchors_batched(anchors[0], gts)
    monkeypatch.setattr(rpn_mod, "MAX_IOU_ELEMENTS", len(anchors[0]))  # one image per chunk
    chunked = ours.assign_targets_to_anchors_batched(anchors[0], gts)
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked))


def test_losses_are_torchvisions_on_the_same_sample():
    _, ours = _pair()
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(-1, 2, (2, 500), generator=g).float()
    labels[1, 3:] = labels[1, 3:].clamp(max=0)  # image 1: three candidates for foreground at most
    objectness = torch.randn(1000, 1, generator=g)
    deltas = torch.randn(1000, 4, generator=g)
    targets = torch.randn(1000, 4, generator=g)
    targets[labels.reshape(-1) == 0] = float("-inf")  # an empty image's background targets
    torch.manual_seed(5)
    obj_loss, box_loss = ours.compute_loss_batched(objectness, deltas, labels, targets)
    torch.manual_seed(5)
    mask = sampled_mask(*sample_balanced(labels == 1, labels == 0, 64, 0.5), 500).reshape(-1)
    inds = mask.nonzero().squeeze(1)
    pos = (mask & (labels.reshape(-1) == 1)).nonzero().squeeze(1)
    want_box = F.smooth_l1_loss(deltas[pos], targets[pos], beta=1 / 9, reduction="sum") / inds.numel()
    want_obj = F.binary_cross_entropy_with_logits(objectness.flatten()[inds], labels.reshape(-1)[inds])
    assert inds.numel() == 128 and torch.isfinite(box_loss)
    assert torch.allclose(obj_loss, want_obj) and torch.allclose(box_loss, want_box)


def test_proposals_are_decoded_in_fp32_under_bf16_autocast():
    _, ours = _pair(pre=200, post=100)
    ours.eval()
    images, _ = _features(batch=2, h=512, w=512)
    g = torch.Generator().manual_seed(1)
    feats = {str(i): torch.randn(2, 8, 512 // s, 512 // s, generator=g) for i, s in enumerate((4, 8, 16))}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        boxes, _, _ = ours(images, feats)
    assert all(b.dtype == torch.float32 for b in boxes)
    # bf16 would put coordinates above 256 px on a 2-px grid, above 512 on a 4-px grid
    big = torch.cat(boxes)[torch.cat(boxes) > 256]
    assert big.numel() and (big.frac() != 0).float().mean() > 0.9
