"""Training augmentation with torchvision.transforms.v2, keeping boxes, masks and proposals aligned."""
from __future__ import annotations

from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2


def clamp_boxes(boxes: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clamp xyxy boxes to the canvas; also return which ones still have width and height >= 1."""
    boxes = boxes.clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    ok = ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)
    return boxes, ok


def mask_extents(masks: torch.Tensor) -> torch.Tensor:
    """Tight xyxy boxes of [N, H, W] masks (pixel edges, so x2 = last column + 1); empty masks → zeros."""
    rows, cols = masks.any(2), masks.any(1)
    boxes = torch.zeros(len(masks), 4)
    for i, (r, c) in enumerate(zip(rows, cols)):
        ys, xs = torch.nonzero(r).flatten(), torch.nonzero(c).flatten()
        if len(ys):
            boxes[i] = torch.tensor([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1], dtype=torch.float32)
    return boxes


class DetectionTransform:
    """Applies one geometric v2 pipeline to image, gt boxes, masks and proposal boxes alike.

    Ground truth that becomes degenerate is removed (boxes, labels, masks together); proposals
    are never removed because their embeddings are paired by index: they are clamped and
    flagged in ``proposal_valid`` instead. With ``recompute_boxes`` gt boxes become the extent of
    their transformed masks: a clipped box would overstate the part of the object left in a crop.
    """

    def __init__(self, geometry: v2.Transform | None, recompute_boxes: bool = False):
        self.geometry = geometry
        self.recompute_boxes = recompute_boxes

    def __call__(self, image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        """Transform one sample; returns a new image and a new target dict."""
        target = dict(target)
        if self.geometry is not None:
            canvas = tuple(image.shape[-2:])
            sample: dict[str, Any] = {
                "image": tv_tensors.Image(image),
                "boxes": tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=canvas),
                "proposal_boxes": tv_tensors.BoundingBoxes(target["proposal_boxes"], format="XYXY", canvas_size=canvas),
            }
            if "masks" in target:
                sample["masks"] = tv_tensors.Mask(target["masks"])
            out = self.geometry(sample)
            image = out["image"].as_subclass(torch.Tensor)
            target["boxes"] = out["boxes"].as_subclass(torch.Tensor)
            if "masks" in target:
                target["masks"] = out["masks"].as_subclass(torch.Tensor)
            target["proposal_boxes"] = out["proposal_boxes"].as_subclass(torch.Tensor)
        h, w = image.shape[-2:]
        if self.recompute_boxes and "masks" in target and len(target["masks"]):
            extents = mask_extents(target["masks"])
            if "mask_valid" in target:  # annotations without a segmentation keep their (clipped) box
                extents = torch.where(target["mask_valid"][:, None], extents, target["boxes"].float())
            target["boxes"] = extents
        boxes, keep = clamp_boxes(target["boxes"].float(), h, w)
        target["boxes"], target["labels"] = boxes[keep], target["labels"][keep]
        for key in ("masks", "mask_valid"):  # left out where nothing reads them (evaluation, the store writer)
            if key in target:
                target[key] = target[key][keep]
        props, ok = clamp_boxes(target["proposal_boxes"].float(), h, w)
        target["proposal_boxes"] = props
        target["proposal_valid"] = target["proposal_valid"] & ok
        return image, target


def build_transforms(cfg: Any, train: bool) -> DetectionTransform | None:
    """INPUT.AUG = lsj | resize | none for training; None at test time (the model resizes)."""
    if not train:
        return None
    aug, size = cfg.INPUT.AUG, int(cfg.INPUT.IMAGE_SIZE)
    ops: list[v2.Transform] = []
    if aug == "lsj":
        lo, hi = cfg.INPUT.LSJ_SCALE
        ops += [
            v2.ScaleJitter((size, size), scale_range=(float(lo), float(hi)), antialias=True),
            # pad with the mean pixel, which normalises to 0 like the model's batch padding (as in the
            # TF release); black would normalise to about -2. Masks pad with 0.
            v2.RandomCrop((size, size), pad_if_needed=True,
                          fill={tv_tensors.Image: [round(m) for m in cfg.MODEL.PIXEL_MEAN], "others": 0}),
        ]
    elif aug == "resize":
        ops.append(v2.Resize(size=None, max_size=size, antialias=True))
    elif aug != "none":
        raise ValueError(f"INPUT.AUG must be lsj, resize or none; got {aug!r}")
    if aug != "none" and cfg.INPUT.RANDOM_FLIP:
        ops.append(v2.RandomHorizontalFlip(0.5))
    return DetectionTransform(v2.Compose(ops) if ops else None, recompute_boxes=aug == "lsj")
