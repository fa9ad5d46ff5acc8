"""Scores that mean "this is a <name>": class-agnostic NMS, objectness weighting, hidden reference names."""
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou, nms

from vild.evaluation.matching import MatchCounts, match_image
from vild.modeling.classifier import TextClassifier
from vild.modeling.postprocess import DetectionSettings, select_detections

from helpers import DIM, tiny_model  # noqa: E402


def random_boxes(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 200
    return torch.cat([xy, xy + 20 + torch.rand(n, 2, generator=g) * 60], 1), g


def test_class_agnostic_selection_keeps_one_label_per_box_and_equals_nms_over_best_classes():
    boxes, g = random_boxes(300)
    scores = torch.randn(300, 1 + 12, generator=g).mul(3).softmax(-1)[:, 1:]
    b, s, lab, rows = select_detections(boxes, scores, 0.05, 0.5, 100, 1000, class_agnostic=True)
    best, best_lab = scores.max(1)
    ok = (best > 0.05).nonzero().squeeze(1)
    ref = ok[nms(boxes[ok], best[ok], 0.5)][:100]
    assert torch.equal(rows, ref)
    assert torch.equal(lab, best_lab[ref]) and torch.equal(s, best[ref])
    iou = box_iou(b, b).fill_diagonal_(0)
    assert iou.max() <= 0.5  # no two kept boxes overlap past the NMS threshold, whatever their classes
    # per-class NMS leaves several labels on one box for flat enough scores
    flat = torch.randn(300, 12, generator=g).mul(0.5).softmax(-1)
    _, _, _, rows_pc = select_detections(boxes, flat, 0.05, 0.5, 300, 1000)
    assert len(rows_pc.unique()) < len(rows_pc)


def test_objectness_weight_is_a_geometric_mean_with_the_rpn_probability():
    model = tiny_model("vild").eval()
    model.set_vocabulary(F.normalize(torch.randn(5, DIM), dim=-1))
    heads = model.roi_heads
    pooled = torch.randn(7, 32, 7, 7)
    objectness = torch.rand(7)
    with torch.no_grad():
        s, _ = heads.class_scores(pooled, objectness, DetectionSettings(objectness_weight=0.4))
        emb, _ = heads.text_head(pooled)
        p = F.softmax(heads.classifier(emb), -1)[:, 1:]
        plain, _ = heads.class_scores(pooled, objectness)  # the config's settings: the class probability alone
    assert torch.allclose(s, p ** 0.6 * objectness[:, None] ** 0.4, atol=1e-6)
    assert torch.allclose(plain, p, atol=1e-6)
    with pytest.raises(ValueError, match="objectness weight"):
        DetectionSettings(objectness_weight=1.5)


def _ensemble_heads(seed: int):
    """A tiny ViLD-ensemble over four names (two of them trained on), its RoI heads, and a generator after them."""
    model = tiny_model("ensemble").eval()
    g = torch.Generator().manual_seed(seed)
    text = F.normalize(torch.randn(4, DIM, generator=g), dim=-1)
    model.set_vocabulary(text, torch.tensor([True, True, False, False]))
    return model, model.roi_heads, text, g


def test_centering_subtracts_the_mean_region_from_names_but_not_from_the_background():
    _, heads, text, g = _ensemble_heads(2)
    heads.region_mean.copy_(torch.randn(2, DIM, generator=g) * 0.3)
    pooled = torch.randn(6, 32, 7, 7, generator=g)
    with torch.no_grad():
        got, _ = heads.class_scores(pooled, settings=DetectionSettings(centering=0.5))
        emb, _ = heads.text_head(pooled)
        img, _ = heads.image_head(pooled)
        clf = heads.classifier
        bg = F.normalize(clf.background, dim=0)
        lt = torch.cat([emb @ bg[:, None], (emb - 0.5 * heads.region_mean[0]) @ text.T], 1) / clf.temperature
        li = (img - 0.5 * heads.region_mean[1]) @ text.T / clf.temperature
        lam = heads.ensemble_lambda
        pt, pi = lt.softmax(-1)[:, 1:], li.softmax(-1)
        w = torch.tensor([lam, lam, 1 - lam, 1 - lam])
    assert torch.allclose(got, pt.clamp_min(1e-12) ** w * pi.clamp_min(1e-12) ** (1 - w), atol=1e-6)


def test_abstaining_image_head_scores_against_a_null_similarity():
    from vild.engine.calibration import apply_calibration, calibration_entry
    from vild.modeling.roi_heads import NO_IMAGE_NULL
    model, heads, text, g = _ensemble_heads(3)
    pooled = torch.randn(9, 32, 7, 7, generator=g)
    abstain = DetectionSettings(abstain=True)
    with torch.no_grad():
        plain, _ = heads.class_scores(pooled)
        uncalibrated, _ = heads.class_scores(pooled, settings=abstain)
        assert float(heads.image_null) == NO_IMAGE_NULL and torch.allclose(uncalibrated, plain, atol=1e-6)
        img, _ = heads.image_head(pooled)
        sims = img @ text.T
        null = float(sims.max(1).values.median())  # half the regions resemble no name more than this
        assert apply_calibration(model, calibration_entry(heads.region_mean, image_null=null))
        got, _ = heads.class_scores(pooled, settings=abstain)
        emb, _ = heads.text_head(pooled)
        clf = heads.classifier
        lt = torch.cat([emb @ F.normalize(clf.background, dim=0)[:, None], emb @ text.T], 1) / clf.temperature
        li = torch.cat([torch.full((9, 1), null), sims], 1) / clf.temperature
        pt, pi = lt.softmax(-1)[:, 1:], li.softmax(-1)[:, 1:]
        w = torch.full((4,), heads.ensemble_lambda)
        w[2:] = 1 - heads.ensemble_lambda
    assert torch.allclose(got, pt.clamp_min(1e-12) ** w * pi.clamp_min(1e-12) ** (1 - w), atol=1e-6)
    # the null only takes probability away, most from the regions that resemble no name
    assert (got <= plain + 1e-6).all()
    best, col = sims.max(1)
    rows = torch.arange(9)
    ratio = got[rows, col] / plain[rows, col]  # at each region's nearest name
    weak, strong = best < null - 0.05, best > null + 0.05
    assert weak.any() and strong.any()
    assert (ratio[weak] < 0.35).all() and (ratio[strong] > 0.95).all(), (best - null, ratio)


@pytest.mark.parametrize("helps", [True, False])
def test_image_null_is_the_held_out_best_quantile_or_none(monkeypatch, helps):
    import vild.engine.calibration as cal
    from vild.modeling.roi_heads import NO_IMAGE_NULL
    model, heads, _, _ = _ensemble_heads(4)

    class Det:  # what fit_image_null uses of a Detector
        abstain = None

    det = Det()
    det.model = model
    sims = torch.linspace(0.0, 1.0, 101)
    target = float(torch.quantile(sims, 0.9))

    def matches(detector, images, targets, names):
        # 10 objects; the null nearest 0.9's quantile keeps 8 right boxes and 1 wrong, without abstention 6 right
        # and 4 wrong (or, when abstaining does not help, 9 right and none wrong)
        null = float(heads.image_null) if detector.abstain else None
        if null is None:
            right, wrong = (6, 4) if helps else (9, 0)
        else:
            right, wrong = (8, 1) if abs(null - target) < 1e-6 else (5, 5)
        return [(0.9, True, "star")] * right + [(0.8, False, "star")] * wrong, 10

    monkeypatch.setattr(cal, "display_matches", matches)
    monkeypatch.setattr(cal, "image_similarities", lambda detector, images: sims)
    null, scoring = cal.fit_image_null(det, [], [], ["star"], set())
    if helps:
        assert null == pytest.approx(target) and det.abstain and float(heads.image_null) == pytest.approx(target)
        assert scoring["f1"] == pytest.approx(2 * 8 / (8 + 10))  # the threshold drops the wrong box
    else:
        assert null is None and not det.abstain and float(heads.image_null) == NO_IMAGE_NULL


def test_region_mean_is_measured_on_proposals_and_travels_in_a_checkpoint_entry():
    from vild.engine.calibration import apply_calibration, calibration_entry, measure_region_mean
    model = tiny_model("vild")
    model.set_vocabulary(F.normalize(torch.randn(3, DIM), dim=-1))
    g = torch.Generator().manual_seed(0)
    images = [(torch.rand(3, 64, 96, generator=g) * 255).to(torch.uint8) for _ in range(3)]
    mean = measure_region_mean(model, images, batch_size=2)
    assert model.training  # left as it was
    model.eval()
    with torch.no_grad():  # by hand: every test-time proposal of every image, through the text head
        embs = []
        for im in images:
            batch, _ = model.preprocessor([im])
            feats = model.backbone(batch.tensors)
            props, *_ = model.rpn.propose(batch, feats)
            embs.append(model.roi_heads.text_head(model.roi_heads.box_pooler(feats, props, batch.image_sizes))[0])
    assert torch.allclose(mean[0], torch.cat(embs).mean(0), atol=1e-5)
    assert torch.equal(mean[1], torch.zeros(DIM))  # no image head
    other = tiny_model("vild")
    assert apply_calibration(other, calibration_entry(mean)) and torch.allclose(other.roi_heads.region_mean, mean)
    assert not apply_calibration(other, None)
    with pytest.raises(ValueError, match="measure it again"):
        apply_calibration(other, {"region_mean": [[0.0] * (DIM + 1)] * 2})


def test_hidden_reference_names_take_their_regions_and_never_appear():
    clf = TextClassifier(DIM, temperature=0.05)
    names = F.normalize(torch.randn(6, DIM, generator=torch.Generator().manual_seed(3)), dim=-1)
    visible, hidden = names[:2], names[2:]
    regions = torch.cat([visible, hidden])  # regions that look exactly like each category
    clf.set_vocabulary(visible)
    alone = F.softmax(clf(regions), -1)[:, 1:]
    clf.set_vocabulary(visible, reference=hidden)
    logits = clf(regions)
    assert logits.shape == (6, 1 + 2 + 4)
    with_ref = F.softmax(logits, -1)[:, 1:3]
    # a region showing a hidden category no longer scores high for a visible one ...
    assert (with_ref[2:].max(1).values < alone[2:].max(1).values).all()
    assert with_ref[2:].max() < 0.5
    # ... while regions of the visible names keep their scores
    assert (with_ref[:2].diagonal() > 0.9).all()
    with pytest.raises(ValueError, match="EMBED_DIM"):
        clf.set_vocabulary(visible, reference=torch.randn(2, DIM + 1))


def test_model_scores_have_one_column_per_visible_name_with_a_reference():
    model = tiny_model("ensemble").eval()
    g = torch.Generator().manual_seed(0)
    model.set_vocabulary(F.normalize(torch.randn(3, DIM, generator=g), dim=-1), torch.tensor([True, False, False]),
                         reference=F.normalize(torch.randn(4, DIM, generator=g), dim=-1))
    img = (torch.rand(3, 64, 80, generator=g) * 255).to(torch.uint8)
    with torch.no_grad():
        out = model([img], settings=DetectionSettings(score_thresh=0.0, max_dets=20, class_agnostic=True))[0]
    assert out["labels"].max() < 3 and len(out["labels"]) <= 20
    assert box_iou(out["boxes"], out["boxes"]).fill_diagonal_(0).max() <= 0.5


def test_matching_counts_precision_recall_and_absent_names():
    c = MatchCounts()
    gt = torch.tensor([[0, 0, 10, 10], [20, 20, 30, 30]], dtype=torch.float)
    dets = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 11], [20, 20, 30, 30], [50, 50, 60, 60]], dtype=torch.float)
    match_image(c, dets, torch.tensor([0.9, 0.8, 0.7, 0.6]), ["star", "star", "ring", "heart"], gt, ["star", "star"])
    # the duplicate star matches nothing (its object is taken); the ring box sits on a star: wrong name
    assert c.tp["star"] == 1 and c.fp["star"] == 1 and c.fp["ring"] == 1 and c.fp["heart"] == 1
    assert c.precision() == 0.25 and c.recall() == 0.5 and c.recall("star") == 0.5
    assert c.absent == 2 and c.absent_per_image() == 2.0


def test_region_mean_of_a_model_whose_heads_read_other_features_than_its_rpn():
    """F-VLM's RoI heads read the frozen trunk's last map besides the FPN levels: calibration goes through
    the model's own feature extraction, like its forward."""
    from pathlib import Path

    from vild.config import load_config
    from vild.engine.calibration import measure_region_mean
    from vild.modeling import build_model
    teacher = Path(__file__).resolve().parent / "assets" / "demo_model" / "vild-tiny-clip.pt"
    model = build_model(load_config("synthetic/fvlm_demo.yaml", ["TEACHER.PRETRAINED", str(teacher)]))
    model.set_vocabulary(F.normalize(torch.randn(3, model.embed_dim), dim=-1))
    g = torch.Generator().manual_seed(0)
    mean = measure_region_mean(model, [(torch.rand(3, 96, 128, generator=g) * 255).to(torch.uint8)])
    assert mean.shape == (2, model.embed_dim) and mean[0].norm() > 0


@pytest.mark.parametrize("variant", ["vild", "ensemble"])
def test_a_subset_of_names_shows_what_all_names_show_restricted_to_it(variant):
    """With one label per box, hidden names win regions (and suppress other labels there) like named ones:
    asking for 3 names with 4 hidden gives the 7-name output's detections of those 3, exactly."""
    model = tiny_model(variant).eval()
    g = torch.Generator().manual_seed(5)
    visible, hidden = F.normalize(torch.randn(3, DIM, generator=g), dim=-1), F.normalize(torch.randn(4, DIM, generator=g), dim=-1)
    base = torch.tensor([True, False, False])
    images = [(torch.rand(3, 64, 80, generator=g) * 255).to(torch.uint8) for _ in range(3)]
    st = DetectionSettings(score_thresh=0.0, max_dets=1000, class_agnostic=True)
    with torch.no_grad():
        sub = model(images, settings=st, vocabulary=model.make_vocabulary(visible, base, hidden))
        full = model(images, settings=st, vocabulary=model.make_vocabulary(
            torch.cat([visible, hidden]), torch.cat([base, torch.ones(4, dtype=torch.bool)])))
    hidden_won = 0
    for s, f in zip(sub, full):
        keep = f["labels"] < 3
        hidden_won += int((~keep).sum())
        assert torch.equal(s["labels"], f["labels"][keep])
        assert torch.allclose(s["scores"], f["scores"][keep]) and torch.allclose(s["boxes"], f["boxes"][keep])
        assert s["masks"].shape[0] == len(s["labels"])
    assert hidden_won > 0  # the hidden names did take regions
    # per-class NMS: hidden names only compete in the softmax, no label of theirs comes out
    with torch.no_grad():
        pc = model(images, settings=DetectionSettings(score_thresh=0.0, max_dets=1000),
                   vocabulary=model.make_vocabulary(visible, base, hidden))
    assert all(len(r["labels"]) and r["labels"].max() < 3 for r in pc)


def test_confidence_fit_recovers_a_platt_curve_and_refuses_no_signal():
    from vild.engine.calibration import fit_confidence
    g = torch.Generator().manual_seed(0)
    s = torch.exp(torch.rand(5000, generator=g) * -8)  # log-uniform over (e^-8, 1)
    hit = torch.rand(5000, generator=g) < torch.sigmoid(0.8 * s.log() + 2.0)
    a, b = fit_confidence(list(zip(s.tolist(), hit.tolist())))
    assert abs(a - 0.8) < 0.1 and abs(b - 2.0) < 0.3
    assert fit_confidence([(0.9, True), (0.1, True)]) is None  # nothing to tell apart
    assert fit_confidence([(0.9, False), (0.1, True), (0.2, True), (0.8, False)]) is None  # decreasing: no fit


def test_confidence_is_a_monotone_map_of_the_display_score_and_changes_no_detection():
    from pathlib import Path

    from vild import Detector
    from vild.engine.calibration import apply_calibration, calibration_entry
    from vild.modeling.postprocess import to_confidence
    from vild.synthetic.world import NOVEL_NAMES
    asset = Path(__file__).resolve().parent / "assets" / "demo_model" / "model.pth"
    det = Detector.from_checkpoint(asset, device="cpu", confidence=False, vocabulary=list(NOVEL_NAMES))
    g = torch.Generator().manual_seed(1)
    images = [(torch.rand(3, 96, 128, generator=g) * 255).to(torch.uint8) for _ in range(2)]
    raw = det(images, score_thresh=0.0, masks=False)
    assert apply_calibration(det.model, calibration_entry(det.model.roi_heads.region_mean, 0.7, [(1.5, 2.0)] * 2))
    det.confidence = True
    conf = det(images, score_thresh=0.0, masks=False)
    for r, c in zip(raw, conf):
        assert len(r) > 0 and torch.equal(r.labels, c.labels) and torch.equal(r.boxes, c.boxes)
        assert torch.allclose(c.scores, to_confidence(r.scores, 1.5, 2.0), atol=1e-6)


def test_names_never_trained_on_get_their_own_confidence_fit():
    from vild.engine.calibration import MIN_GROUP_DETECTIONS, fit_group_confidence
    g = torch.Generator().manual_seed(2)

    def group(n, a, b, names):
        s = torch.exp(torch.rand(n, generator=g) * -8)
        hit = torch.rand(n, generator=g) < torch.sigmoid(a * s.log() + b)
        return [(float(v), bool(h), names[i % len(names)]) for i, (v, h) in enumerate(zip(s, hit))]

    base, novel = group(4000, 0.8, 2.0, ["square", "circle"]), group(4000, 0.8, 4.0, ["star"])
    fits = fit_group_confidence(base + novel, {"square", "circle"})
    assert abs(fits[0][1] - 2.0) < 0.3 and abs(fits[1][1] - 4.0) < 0.4  # novel boxes are right at lower scores
    few = fit_group_confidence(base + novel[:MIN_GROUP_DETECTIONS - 1], {"square", "circle"})
    assert few[1] == few[0]  # too few to fit: the trained names' map
