"""Measured after training, used at inference: what a checkpoint's "calibration" entry holds.

- ``region_mean`` [2, D]: the mean embedding of each head (text, image) over the RPN's test-time
  proposals on training images, which show what any image shows: mostly background, parts of
  objects and whole objects. ``DetectionSettings.centering`` subtracts a share of it before the
  text dot products.
- ``confidence`` [[a, b] for names seen in training, [a, b] for the others]: Platt scaling of the display
  score s (``Detector``'s scoring) into a confidence σ(a · log s + b), fitted to whether each detection on
  held-out annotated images (every category named) matched an object (IoU 0.5, same category): a shown 0.8
  means about 8 in 10 such boxes were right. Names never trained on score lower for the same precision
  (the text head learned them as background; ViLD-ensemble weighs its heads per group), so they get their
  own fit when the held-out images annotate such categories (the synthetic world's novel shapes, LVIS's
  rare ones), else the trained names' fit. Each map is monotone: it changes no ranking within a group.
- ``image_null`` (ViLD-ensemble only): the similarity under which its image head abstains (see
  ``ViLDRoIHeads.class_scores``): of the quantiles of the image head's best similarity over the held-out
  images' proposals, the one whose display scores reach the best F1 on those images (every category named);
  absent when no abstention scores better.
- ``score_thresh``: the display threshold with the best F1 on the same images, as a confidence
  (``raw_score_thresh``: the best-F1 threshold of the raw display scores, for ``Detector(confidence=False)``).
  With the training names competing hidden (see ``ViLDRoIHeads._scoring_vocabulary``), what a subset of the
  names shows is what all of them show, restricted to the subset, so one threshold serves every vocabulary.

``calibrate_checkpoint(path, train_images, val_images, val_targets, names)`` measures them all and
writes them into the checkpoint.
"""
from __future__ import annotations

import itertools
from typing import Iterable, Iterator

import torch

from ..modeling.postprocess import to_confidence
from ..modeling.roi_heads import NO_IMAGE_NULL
from ..modeling.vild import ViLD


@torch.no_grad()
def proposal_features(model: ViLD, images: Iterable[torch.Tensor], batch_size: int = 8) -> Iterator[torch.Tensor]:
    """Pooled box features [R, C, S, S] of the RPN's test-time proposals, ``batch_size`` of ``images`` at a time
    (the model in eval mode until the last batch is out)."""
    was_training = model.training
    model.eval()
    heads = model.roi_heads
    device = heads.region_mean.device
    images = iter(images)
    try:
        while batch := list(itertools.islice(images, batch_size)):
            prepared, _ = model.preprocessor([im.to(device) for im in batch])
            rpn_features, features = model.extract_features(prepared.tensors)
            proposals, *_ = model.rpn.propose(prepared, rpn_features)
            yield heads.box_pooler(features, proposals, prepared.image_sizes)
    finally:
        model.train(was_training)


@torch.no_grad()
def measure_region_mean(model: ViLD, images: Iterable[torch.Tensor], batch_size: int = 8) -> torch.Tensor:
    """Mean embedding [2, D] (text head, image head or zeros) of the RPN's test-time proposals over ``images``."""
    heads = model.roi_heads
    total = torch.zeros(2, model.embed_dim, dtype=torch.float64)
    count = 0
    for pooled in proposal_features(model, images, batch_size):
        total[0] += heads.text_head(pooled)[0].double().sum(0).cpu()
        if heads.image_head is not None:
            total[1] += heads.image_head(pooled)[0].double().sum(0).cpu()
        count += len(pooled)
    if count == 0:
        raise ValueError("no proposals to measure: pass images the model finds regions in")
    return (total / count).float()


def calibration_entry(region_mean: torch.Tensor, score_thresh: float | None = None,
                      confidence: list[tuple[float, float]] | None = None, image_null: float | None = None) -> dict:
    """What a checkpoint's "calibration" entry holds (plain lists: it loads with weights_only=True);
    ``confidence``: the (a, b) of trained names, then of the others."""
    entry = {"region_mean": region_mean.tolist()}
    if image_null is not None:
        entry["image_null"] = float(image_null)
    if score_thresh is not None:
        entry["score_thresh"] = float(score_thresh)
    if confidence is not None:
        entry["confidence"] = [[float(a), float(b)] for a, b in confidence]
    return entry


def display_matches(detector, images: list[torch.Tensor], targets: list[tuple[torch.Tensor, list[str]]],
                    names: list[str]) -> tuple[list[tuple[float, bool, str]], int]:
    """(score, matched an object, name) of every detection ``detector`` shows at threshold 0 over annotated
    images with ``names`` asked for, and the number of objects. ``targets``: per image, (boxes xyxy [n, 4], names)."""
    from ..evaluation.matching import MatchCounts, match_image
    detector.set_vocabulary(names)
    results = detector(images, score_thresh=0.0, masks=False)  # boxes are all the matching needs
    counts, matched = MatchCounts(), []
    for r, (boxes, gt_names) in zip(results, targets):
        keep = [i for i, n in enumerate(gt_names) if n in names]
        matched += match_image(counts, r.boxes, r.scores, r.names, boxes[keep], [gt_names[i] for i in keep])
    return matched, sum(counts.gt.values())


def fit_confidence(matched: list[tuple[float, bool]], steps: int = 200) -> tuple[float, float] | None:
    """Platt scaling: (a, b) of P(match | s) = σ(a · log s + b) by maximum likelihood over (score, matched)
    detections; None when the fit is not increasing in s (no signal to calibrate)."""
    if not matched or all(hit for _, hit in matched) or not any(hit for _, hit in matched):
        return None
    x = torch.tensor([s for s, _ in matched], dtype=torch.float64).clamp_min(1e-12).log()
    y = torch.tensor([float(hit) for _, hit in matched], dtype=torch.float64)
    mu, sd = x.mean(), x.std().clamp_min(1e-6)
    params = torch.zeros(2, dtype=torch.float64, requires_grad=True)  # on standardised log scores
    opt = torch.optim.LBFGS([params], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(params[0] * (x - mu) / sd + params[1], y)
        loss.backward()
        return loss

    opt.step(closure)
    a, b = (float(v) for v in params.detach())
    if not a > 0:
        return None
    return a / float(sd), b - a * float(mu) / float(sd)


# candidates for the image head's null similarity: quantiles of its best similarity over held-out proposals, most of
# which show background or parts of objects (the null is to rank under the names of whole objects)
IMAGE_NULL_QUANTILES = (0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99)


@torch.no_grad()
def image_similarities(detector, images: list[torch.Tensor]) -> torch.Tensor:
    """ViLD-ensemble's image-head similarity [N] to its nearest name (of ``detector``'s vocabulary, with its
    centering) for every test-time proposal of ``images``."""
    heads = detector.model.roi_heads
    shift = detector.centering * heads.region_mean[1] if detector.centering else None
    best = []
    for pooled in proposal_features(detector.model, images):
        emb, _ = heads.image_head(pooled)
        logits = heads.classifier(emb, with_background=False, shift=shift)
        best.append((logits.float() * heads.classifier.temperature).max(dim=1).values.cpu())
    return torch.cat(best) if best else torch.zeros(0)


def fit_image_null(detector, images: list[torch.Tensor], targets: list[tuple[torch.Tensor, list[str]]],
                   names: list[str], trained: set[str]) -> tuple[float | None, dict]:
    """The image-head null similarity (one of ``IMAGE_NULL_QUANTILES`` of ``image_similarities``, or None for no
    abstention) whose display scoring (``display_scoring``) has the best F1 on the annotated ``images`` with
    ``names`` asked for, and that scoring; leaves ``detector`` scoring with it."""
    detector.abstain = False
    best = (None, display_scoring(*display_matches(detector, images, targets, names), trained))
    sims = image_similarities(detector, images)
    # quantiles of tied similarities coincide: each distinct null is scored once
    nulls = dict.fromkeys(torch.quantile(sims, torch.tensor(IMAGE_NULL_QUANTILES)).tolist()) if len(sims) else {}
    detector.abstain = True
    for null in nulls:
        detector.model.roi_heads.image_null.fill_(null)
        scoring = display_scoring(*display_matches(detector, images, targets, names), trained)
        if scoring["f1"] > best[1]["f1"]:
            best = (null, scoring)
    detector.abstain = best[0] is not None
    detector.model.roi_heads.image_null.fill_(NO_IMAGE_NULL if best[0] is None else best[0])
    return best


# a group of names gets a fit of its own from this many held-out detections on
MIN_GROUP_DETECTIONS = 50


def fit_group_confidence(matched: list[tuple[float, bool, str]], trained: set[str]
                         ) -> list[tuple[float, float]] | None:
    """The (a, b) of names in ``trained`` and of the others (``fit_confidence`` per group); a group with too few
    detections, or no signal, takes the trained names' fit; None when there is none."""
    groups = [[(s, hit) for s, hit, n in matched if (n in trained) == is_trained] for is_trained in (True, False)]
    fits = [fit_confidence(g) if len(g) >= MIN_GROUP_DETECTIONS else None for g in groups]
    if fits[0] is None:
        fits[0] = fit_confidence(groups[0] + groups[1])
    if fits[0] is None:
        return None
    return [fits[0], fits[1] or fits[0]]


def display_scoring(matched: list[tuple[float, bool, str]], num_objects: int, trained: set[str]) -> dict:
    """From held-out (raw display score, matched, name) detections: the groups' ``confidence`` fits (or None), the
    ``score_thresh`` with the best ``f1`` (as a confidence when there are fits) and ``raw_score_thresh``."""
    from ..evaluation.matching import best_f1_threshold
    raw_thresh, raw_f1 = best_f1_threshold(matched, num_objects)
    fits = fit_group_confidence(matched, trained)
    if fits is None:
        return {"confidence": None, "score_thresh": raw_thresh, "f1": raw_f1}
    fit = torch.tensor(fits, dtype=torch.float64)[[int(n not in trained) for _, _, n in matched]]  # [N, 2]
    conf = to_confidence(torch.tensor([s for s, _, _ in matched], dtype=torch.float64), fit[:, 0], fit[:, 1])
    thresh, f1 = best_f1_threshold([(c, hit) for c, (_, hit, _) in zip(conf.tolist(), matched)], num_objects)
    return {"confidence": fits, "score_thresh": thresh, "f1": f1, "raw_score_thresh": raw_thresh}


def calibrate_checkpoint(path: str, train_images: list[torch.Tensor], val_images: list[torch.Tensor],
                         val_targets: list[tuple[torch.Tensor, list[str]]], names: list[str]) -> dict:
    """Measure the region mean on ``train_images``, then (ViLD-ensemble) the image head's null, the confidence fits
    and the display threshold on the annotated ``val_images`` (``names``: every category they are annotated with);
    write them into the checkpoint."""
    from ..api import Detector
    from ..teacher.vocabulary import name_key
    from ..utils.atomic import atomic_save
    from .checkpoint import load_checkpoint
    det = Detector.from_checkpoint(path, device="cpu", confidence=False)  # the raw display scores
    det.model.roi_heads.region_mean.copy_(measure_region_mean(det.model, train_images))
    trained = {n for n in names if name_key(n) in det.training_keys}
    image_null = None
    if det.model.roi_heads.image_head is not None:
        image_null, scoring = fit_image_null(det, val_images, val_targets, names, trained)
    else:
        scoring = display_scoring(*display_matches(det, val_images, val_targets, names), trained)
    ckpt = load_checkpoint(path)
    fits = scoring.pop("confidence")
    ckpt["calibration"] = {**calibration_entry(det.model.roi_heads.region_mean.cpu(), scoring.pop("score_thresh"),
                                               fits, image_null), **scoring}
    atomic_save(ckpt, path)
    return ckpt["calibration"]


def apply_calibration(model: ViLD, entry: dict | None) -> bool:
    """Install a checkpoint's calibration into the model; False when there is none."""
    if not entry or "region_mean" not in entry:
        return False
    mean = torch.tensor(entry["region_mean"], dtype=torch.float32)
    if mean.shape != model.roi_heads.region_mean.shape:
        raise ValueError(f"calibration region_mean of shape {tuple(mean.shape)} does not fit this model "
                         f"({tuple(model.roi_heads.region_mean.shape)}): measure it again for this checkpoint")
    model.roi_heads.region_mean.copy_(mean)
    if entry.get("confidence") is not None:  # [a, b] for every name, or one row per group
        fit = torch.tensor(entry["confidence"], dtype=torch.float32)
        model.roi_heads.confidence_fit.copy_(fit.expand_as(model.roi_heads.confidence_fit))
    if entry.get("image_null") is not None:
        model.roi_heads.image_null.fill_(float(entry["image_null"]))
    return True


def dataset_images(cfg, name: str, limit: int
                   ) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, list[str]]], list[str]]:
    """The first ``limit`` images of dataset ``name`` (untransformed), their boxes and category display names,
    and the names of every category it has."""
    from ..data import build_dataset
    ds = build_dataset(cfg, name, train=False, masks=False, unreadable="skip")
    names = [syns[0] for syns in ds.category_names]
    images, targets = [], []
    for i in range(min(limit, len(ds))):
        item = ds[i]
        if item is None:
            continue
        image, target = item
        images.append(image)
        targets.append((target["boxes"], [names[int(k)] for k in target["labels"]]))
    return images, targets, names


def calibrate_from_config(cfg, weights: str, train_images: int = 200, val_images: int = 500) -> dict:
    """Calibrate ``weights`` on the config's first training set (region mean) and first test set (threshold)."""
    train, _, _ = dataset_images(cfg, cfg.DATASETS.TRAIN[0], train_images)
    val, targets, names = dataset_images(cfg, cfg.DATASETS.TEST[0], val_images)
    return calibrate_checkpoint(weights, train, val, targets, names)
