"""Measured after training, used at inference: what a checkpoint's "calibration" entry holds.

- ``region_mean`` [2, D]: the mean embedding of each head (text, image) over the RPN's test-time
  proposals on training images, which show what any image shows: mostly background, parts of
  objects and whole objects. ``DetectionSettings.centering`` subtracts a share of it before the
  text dot products.
- ``score_thresh``: the display threshold with the best F1 (IoU 0.5, same category) on held-out
  annotated images, every category named, at the scoring ``Detector`` shows people. With the training
  names competing hidden in the softmax, scores mean the same whatever subset of names a user asks
  for, so one threshold serves every vocabulary.

``calibrate_checkpoint(path, train_images, val_images, val_targets)`` measures both and writes them
into the checkpoint.
"""
from __future__ import annotations

from typing import Iterable

import torch

from ..modeling.vild import ViLD


@torch.no_grad()
def measure_region_mean(model: ViLD, images: Iterable[torch.Tensor], batch_size: int = 8) -> torch.Tensor:
    """Mean embedding [2, D] (text head, image head or zeros) of the RPN's test-time proposals over ``images``."""
    was_training = model.training
    model.eval()
    heads = model.roi_heads
    total = torch.zeros(2, model.embed_dim, dtype=torch.float64)
    count = 0
    batch: list[torch.Tensor] = []

    def flush() -> None:
        nonlocal count
        device = heads.region_mean.device
        prepared, _ = model.preprocessor([im.to(device) for im in batch])
        rpn_features, features = model.extract_features(prepared.tensors)
        proposals, *_ = model.rpn.propose(prepared, rpn_features)
        pooled = heads.box_pooler(features, proposals, prepared.image_sizes)
        total[0] += heads.text_head(pooled)[0].double().sum(0).cpu()
        if heads.image_head is not None:
            total[1] += heads.image_head(pooled)[0].double().sum(0).cpu()
        count += len(pooled)
        batch.clear()

    try:
        for im in images:
            batch.append(im)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("no proposals to measure: pass images the model finds regions in")
    return (total / count).float()


def calibration_entry(region_mean: torch.Tensor, score_thresh: float | None = None) -> dict:
    """What a checkpoint's "calibration" entry holds (plain lists: it loads with weights_only=True)."""
    entry = {"region_mean": region_mean.tolist()}
    if score_thresh is not None:
        entry["score_thresh"] = float(score_thresh)
    return entry


def display_threshold(detector, images: list[torch.Tensor], targets: list[tuple[torch.Tensor, list[str]]],
                      names: list[str]) -> tuple[float, float]:
    """(threshold, F1) of ``detector`` at its display scoring over annotated images, with ``names`` asked for.

    ``targets``: per image, (boxes xyxy [n, 4], category names).
    """
    from ..evaluation.matching import MatchCounts, best_f1_threshold, match_image
    detector.set_vocabulary(names)
    results = detector(images, score_thresh=0.0, masks=False)  # boxes are all the matching needs
    counts, matched = MatchCounts(), []
    for r, (boxes, gt_names) in zip(results, targets):
        keep = [i for i, n in enumerate(gt_names) if n in names]
        matched += match_image(counts, r.boxes, r.scores, r.names, boxes[keep], [gt_names[i] for i in keep])
    return best_f1_threshold(matched, sum(counts.gt.values()))


def calibrate_checkpoint(path: str, train_images: list[torch.Tensor], val_images: list[torch.Tensor],
                         val_targets: list[tuple[torch.Tensor, list[str]]], names: list[str]) -> dict:
    """Measure the region mean on ``train_images`` and the display threshold on the annotated
    ``val_images`` (``names``: every category they are annotated with), and write both into the checkpoint."""
    from ..api import Detector
    from ..utils.atomic import atomic_save
    from .checkpoint import load_checkpoint
    det = Detector.from_checkpoint(path, device="cpu")
    det.model.roi_heads.region_mean.copy_(measure_region_mean(det.model, train_images))
    thresh, f1 = display_threshold(det, val_images, val_targets, names)
    ckpt = load_checkpoint(path)
    ckpt["calibration"] = {**calibration_entry(det.model.roi_heads.region_mean.cpu(), thresh), "f1": f1}
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
