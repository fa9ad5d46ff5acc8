"""vild's own copies of the torchvision helpers it relies on that torchvision keeps private: the same numbers.

Each copy is compared with torchvision's private original while this torchvision still has it (the comparison
is skipped, naming the helper, once one is gone), and checked on its own for the behaviour vild relies on.
"""
import importlib
import warnings

import pytest
import torch
from torchvision.models import resnet18
from torchvision.ops import MultiScaleRoIAlign, batched_nms, box_iou

from vild.modeling.backbone import resnet_fpn
from vild.modeling.box_coder import BoxCoder
from vild.modeling.pooling import level_scales, merge_levels
from vild.modeling.postprocess import nms_each_group, topk_size
from vild.modeling.roi_heads import pool_rois
from vild.modeling.rpn import top_n_per_level


def _torchvision(module: str, name: str):
    """torchvision's private ``module.name``, or a skip saying that this torchvision has no such helper."""
    found = getattr(importlib.import_module(module), name, None)
    if found is None:
        pytest.skip(f"this torchvision has no {module}.{name} to compare with")
    return found


def _boxes(n: int, seed: int, size: float = 200.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size
    return torch.cat([xy, xy + 1 + torch.rand(n, 2, generator=g) * size / 2], dim=1)


# ---- box coder ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_box_coder_equals_torchvision_bit_for_bit(weights):
    theirs = _torchvision("torchvision.models.detection._utils", "BoxCoder")(weights)
    ours = BoxCoder(weights)
    boxes, refs = _boxes(50, 0), _boxes(50, 1)
    assert torch.equal(ours.encode_single(boxes, refs), theirs.encode_single(boxes, refs))
    offsets = torch.randn(50, 12, generator=torch.Generator().manual_seed(2)) * 3  # 3 boxes per reference
    offsets[::7] *= 10  # past the clamp of exp()
    assert torch.equal(ours.decode_single(offsets, refs), theirs.decode_single(offsets, refs))
    per_image = [refs[:20], refs[20:], refs[:0]]
    assert torch.equal(ours.decode(offsets, per_image), theirs.decode(offsets, per_image))
    half = offsets.to(torch.bfloat16)  # decoded in the offsets' dtype
    assert torch.equal(ours.decode_single(half, refs), theirs.decode_single(half, refs))


def test_box_coder_decodes_what_it_encodes():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    boxes, refs = _boxes(30, 3), _boxes(30, 4)
    offsets = coder.encode_single(boxes, refs)
    assert torch.allclose(coder.decode_single(offsets, refs), boxes, atol=1e-3)
    assert torch.equal(coder.encode_single(refs, refs), torch.zeros(30, 4))  # a reference is its own box
    assert coder.decode(offsets, [refs[:10], refs[10:]]).shape == (30, 1, 4)


# ---- RPN top-n ---------------------------------------------------------------------------------------------
def test_top_n_per_level_equals_torchvision():
    get_top_n = _torchvision("torchvision.models.detection.rpn", "RegionProposalNetwork")._get_top_n_idx
    if not callable(get_top_n):
        pytest.skip("this torchvision has no RegionProposalNetwork._get_top_n_idx to compare with")
    objectness = torch.randn(3, 700, generator=torch.Generator().manual_seed(5))
    per_level = [400, 200, 80, 20]  # the last two smaller than n: all of them
    rpn = type("RPN", (), {"pre_nms_top_n": lambda self: 100})()
    assert torch.equal(top_n_per_level(objectness, per_level, 100), get_top_n(rpn, objectness, per_level))


def test_top_n_per_level_takes_the_best_of_each_level_in_order():
    objectness = torch.tensor([[0.1, 0.9, 0.5, 0.3, 0.8, 0.2]])
    assert top_n_per_level(objectness, [4, 2], 2).tolist() == [[1, 2, 4, 5]]  # level 2 starts at index 4


def test_topk_size_stays_dynamic_in_a_trace():
    def best_five(x):
        return x.topk(topk_size(x, 5, 1), dim=1).values

    assert topk_size(torch.zeros(2, 3), 5, 1) == 3 and topk_size(torch.zeros(2, 9), 5, 1) == 5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace's notice: the ONNX export traces too
        traced = torch.jit.trace(best_five, torch.randn(2, 8))
    small = torch.randn(2, 3)
    assert torch.equal(traced(small), small.sort(dim=1, descending=True).values)  # 3 columns, not 5


# ---- NMS per group -----------------------------------------------------------------------------------------
def test_nms_each_group_equals_torchvision():
    vanilla = _torchvision("torchvision.ops.boxes", "_batched_nms_vanilla")
    g = torch.Generator().manual_seed(6)
    base = _boxes(40, 7)
    boxes = torch.cat([base, base + torch.randn(40, 4, generator=g) * 6])  # many overlapping pairs
    scores, groups = torch.rand(80, generator=g), torch.randint(0, 9, (80,), generator=g)
    assert torch.equal(nms_each_group(boxes, scores, groups, 0.5), vanilla(boxes, scores, groups, 0.5))


def test_nms_each_group_suppresses_only_within_a_group():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.5], [0.0, 0.0, 10.0, 10.0]])
    scores, groups = torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0, 0, 1])
    assert nms_each_group(boxes, scores, groups, 0.5).tolist() == [0, 2]  # box 1 is box 0's near copy
    assert torch.equal(nms_each_group(boxes, scores, groups, 0.5), batched_nms(boxes, scores, groups, 0.5))
    assert box_iou(boxes[:1], boxes[1:2]).item() > 0.5


# ---- pooling levels and scales -----------------------------------------------------------------------------
def _fpn_maps(h: int = 128, w: int = 160, seed: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 4, h // s, w // s, generator=g) for s in (4, 8, 16, 32)]


def test_level_scales_and_mapper_equal_torchvision():
    setup_scales = _torchvision("torchvision.ops.poolers", "_setup_scales")
    maps = _fpn_maps()
    for sizes in ([(128, 160), (100, 150)], [(70, 160)], [(128, 40)]):
        scales, mapper = level_scales(maps, sizes)
        their_scales, their_mapper = setup_scales(maps, sizes, 224, 4)
        assert scales == their_scales
        boxes = [_boxes(60, 9, size=600.0), _boxes(5, 10, size=20.0)]  # from below the finest to past the coarsest
        assert torch.equal(mapper(boxes), their_mapper(boxes))


def test_merge_levels_equals_torchvision():
    merge = _torchvision("torchvision.ops.poolers", "_onnx_merge_levels")
    levels = torch.tensor([2, 0, 1, 0, 2, 2])
    pooled = [torch.randn(int((levels == k).sum()), 3, 2, 2) for k in range(3)]
    assert torch.equal(merge_levels(levels, pooled), merge(levels, pooled))


def test_pool_rois_equals_the_pooler_whichever_runs_first():
    maps = dict(zip("0123", _fpn_maps()))
    sizes = torch.tensor([[128, 160], [100, 150]])
    boxes = [_boxes(30, 11, size=120.0), _boxes(20, 12, size=90.0)]
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], dim=1) for i, b in enumerate(boxes)])
    shapes = [tuple(s.tolist()) for s in sizes]
    ours_first = MultiScaleRoIAlign(list("0123"), 7, 2)
    got = pool_rois(ours_first, maps, rois, sizes)
    assert torch.equal(got, ours_first(maps, boxes, shapes))
    theirs_first = MultiScaleRoIAlign(list("0123"), 7, 2)
    want = theirs_first(maps, boxes, shapes)
    assert torch.equal(pool_rois(theirs_first, maps, rois, sizes), want) and torch.equal(got, want)


# ---- ResNet + FPN ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("trainable,returned", [(0, [1, 2, 3, 4]), (3, [2, 3, 4]), (5, [1, 2, 3, 4])])
def test_resnet_fpn_equals_torchvision(trainable, returned):
    extractor = _torchvision("torchvision.models.detection.backbone_utils", "_resnet_fpn_extractor")
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
    torch.manual_seed(0)
    ours = resnet_fpn(resnet18(), trainable, returned).eval()
    theirs = extractor(resnet18(), trainable, returned, LastLevelMaxPool()).eval()
    theirs.load_state_dict(ours.state_dict())  # strict: the same tensors under the same names
    assert {n: p.requires_grad for n, p in ours.named_parameters()} == \
        {n: p.requires_grad for n, p in theirs.named_parameters()}
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        got, want = ours(x), theirs(x)
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in got)


def test_resnet_fpn_freezes_the_early_stages_and_widths_follow_the_stages():
    net = resnet_fpn(resnet18(), 2, [2, 3, 4], out_channels=32)
    training = {n.split(".")[1] for n, p in net.named_parameters() if p.requires_grad and n.startswith("body.")}
    assert training == {"layer3", "layer4"}
    assert net.out_channels == 32 and [b[0].out_channels for b in net.fpn.inner_blocks] == [32, 32, 32]
    assert [b[0].in_channels for b in net.fpn.inner_blocks] == [128, 256, 512]  # resnet18's stages 2..4
    with pytest.raises(ValueError, match="TRAINABLE_LAYERS"):
        resnet_fpn(resnet18(), 6, [1, 2, 3, 4])
    with pytest.raises(ValueError, match="RETURNED_LAYERS"):
        resnet_fpn(resnet18(), 3, [0, 1])
