"""Batched RoI matching and fg/bg sampling against torchvision's per-image Matcher and sampler."""
import pytest
import torch
from helpers import tiny_model
from torchvision.ops import box_iou

from vild.modeling.sampling import batched_box_iou, pad_boxes, sample_balanced, sampled_mask


def _boxes(n, size=200.0, seed=0, min_side=4.0):
    g = torch.Generator().manual_seed(seed)
    wh = torch.rand(n, 2, generator=g) * size / 2 + min_side
    xy = torch.rand(n, 2, generator=g) * (size - wh)
    return torch.cat([xy, xy + wh], dim=1)


def _near(gt, n, seed):
    """Proposals jittered around the ground truth (many above IoU 0.5) plus random ones."""
    g = torch.Generator().manual_seed(seed)
    base = gt[torch.randint(len(gt), (n // 2,), generator=g)] + torch.randn(n // 2, 4, generator=g) * 8
    return torch.cat([base.clamp(0, 200).sort(dim=1).values[:, [0, 1, 2, 3]], _boxes(n - n // 2, seed=seed)])


def test_batched_iou_equals_torchvision_and_padding_is_inert():
    a, b = [_boxes(3, seed=1), _boxes(5, seed=2)], [_boxes(7, seed=3), _boxes(4, seed=4)]
    iou = batched_box_iou(pad_boxes(a), pad_boxes(b))
    for i in range(2):
        assert torch.allclose(iou[i, :len(a[i]), :len(b[i])], box_iou(a[i], b[i]), atol=1e-6)
    assert iou[0, 3:].eq(0).all() and iou[1, :, 4:].eq(0).all()


def test_sample_rois_labels_matches_and_counts_follow_the_per_image_reference():
    heads = tiny_model().roi_heads
    heads.batch_size_per_image, heads.positive_fraction = 64, 0.25
    gts = [_boxes(4, seed=10), torch.zeros(0, 4), _boxes(9, seed=11), torch.tensor([[0.0, 0.0, 100.0, 100.0]])]
    labels = [torch.randint(0, 5, (len(g),), generator=torch.Generator().manual_seed(i)) for i, g in enumerate(gts)]
    # image 0: plenty of both; 1: no ground truth; 2: mostly foreground (negatives run short); 3: few candidates
    proposals = [_near(gts[0], 150, 0), _boxes(90, seed=5), _near(gts[2], 70, 2)[:40], _near(gts[3], 10, 3)]
    shift = torch.arange(27.0)[:, None] * 0.01  # near-copies of the ground truth: foreground
    proposals[2] = torch.cat([proposals[2], gts[2].repeat(3, 1) + shift])
    proposals[3] = torch.cat([proposals[3], torch.tensor([[0.0, 0.0, 50.0, 100.0]])])  # IoU exactly 0.5: foreground
    targets = [{"boxes": g, "labels": lab} for g, lab in zip(gts, labels)]
    # the reference: torchvision's per-image Matcher and BoxCoder (a private module of torchvision)
    det_utils = pytest.importorskip("torchvision.models.detection._utils")
    matcher = det_utils.Matcher(0.5, 0.5, allow_low_quality_matches=False)
    coder = det_utils.BoxCoder((10.0, 10.0, 5.0, 5.0))
    out = heads.sample_rois(proposals, targets)
    offset = 0
    for i, (p, g) in enumerate(zip(proposals, gts)):
        cands = torch.cat([p, g])
        if len(g):
            m = matcher(box_iou(g, cands))
            ref_lab = torch.where(m >= 0, labels[i][m.clamp(min=0)] + 1, 0)
        else:
            m, ref_lab = torch.full((len(cands),), -1), torch.zeros(len(cands), dtype=torch.long)
        n_pos = min(int((ref_lab > 0).sum()), 16)
        n_rows = n_pos + min(int((ref_lab == 0).sum()), 64 - n_pos)
        rois, lab = out.rois[i], out.labels[offset:offset + len(out.rois[i])]
        assert len(rois) == n_rows and out.num_pos[i] == n_pos
        assert lab[:n_pos].gt(0).all() and lab[n_pos:].eq(0).all()  # positives first
        # every sampled box is a distinct candidate, labelled and matched as the reference labels it
        same = (rois[:, None] == cands[None]).all(-1)
        assert same.sum(1).eq(1).all()
        idx = same.int().argmax(dim=1)
        assert len(set(idx.tolist())) == len(idx)
        assert torch.equal(lab, ref_lab[idx])
        assert torch.equal(out.matched[i][:n_pos], m[idx][:n_pos])
        reg = out.reg_targets[offset:offset + len(rois)]
        if n_pos:
            assert torch.allclose(reg[:n_pos], coder.encode_single(g[m[idx][:n_pos]], rois[:n_pos]), atol=1e-5)
        assert reg[n_pos:].abs().max() < 1e-5 if len(rois) > n_pos else True
        offset += len(rois)
    assert offset == len(out.labels) == len(out.reg_targets)
    assert out.num_pos[1] == 0 and len(out.rois[3]) < 64 and len(out.rois[2]) < 64


def test_sampler_takes_uniform_subsets_of_the_right_size():
    torch.manual_seed(0)
    n, draws = 40, 4000
    positive = torch.zeros(2, n, dtype=torch.bool)
    positive[0, :10] = True   # 10 positives, cap 4
    positive[1, :2] = True    # 2 positives: all taken
    negative = ~positive
    negative[1, 30:] = False  # image 1: 28 negatives for the 14 places left
    hits = torch.zeros(2, n)
    for _ in range(draws):
        pos_idx, neg_idx, num_pos, num_neg = sample_balanced(positive, negative, 16, 0.25)
        mask = sampled_mask(pos_idx, neg_idx, num_pos, num_neg, n)
        assert num_pos.tolist() == [4, 2] and num_neg.tolist() == [12, 14]
        assert mask.sum(1).tolist() == [16, 16]
        assert not (mask & ~(positive | negative)).any()
        assert (mask & positive).sum(1).tolist() == [4, 2]
        hits += mask
    freq = hits / draws
    # each positive of image 0 with probability 4/10, each negative 12/30; image 1's positives always
    assert (freq[0, :10] - 0.4).abs().max() < 0.04 and (freq[0, 10:] - 0.4).abs().max() < 0.04
    assert freq[1, :2].eq(1).all() and (freq[1, 2:30] - 0.5).abs().max() < 0.04 and freq[1, 30:].eq(0).all()
