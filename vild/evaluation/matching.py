"""Precision and recall of detections shown at one threshold: what a person sees, not what AP ranks.

AP averages over every threshold, so a model can rank well and still show mostly false boxes at the
threshold people use. These counts take the detections as given (already thresholded) and match
them greedily, best score first, to unmatched ground truth of the same category at IoU ≥ ``iou``,
as COCO's evaluation matches at one IoU.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torchvision.ops import box_iou


@dataclass
class MatchCounts:
    """True positives, false positives and ground-truth objects per category name."""

    tp: dict = field(default_factory=lambda: defaultdict(int))
    fp: dict = field(default_factory=lambda: defaultdict(int))
    gt: dict = field(default_factory=lambda: defaultdict(int))
    absent: int = 0  # detections of a category with no object of it in their image
    images: int = 0

    def precision(self, name: str | None = None) -> float:
        """Share of detections (of ``name``, or all) that match an object; 1.0 when there are none."""
        tp, fp = self._sum(self.tp, name), self._sum(self.fp, name)
        return tp / (tp + fp) if tp + fp else 1.0

    def recall(self, name: str | None = None) -> float:
        """Share of objects (of ``name``, or all) found; 1.0 when there are none."""
        tp, gt = self._sum(self.tp, name), self._sum(self.gt, name)
        return tp / gt if gt else 1.0

    def detections(self, name: str | None = None) -> int:
        """How many detections were counted."""
        return self._sum(self.tp, name) + self._sum(self.fp, name)

    def absent_per_image(self) -> float:
        """Detections per image naming a category that has no object in that image."""
        return self.absent / max(self.images, 1)

    def summary(self) -> dict:
        """Totals and per-category precision / recall, as plain numbers."""
        names = sorted(set(self.gt) | set(self.tp) | set(self.fp))
        return {"precision": self.precision(), "recall": self.recall(), "detections": self.detections(),
                "objects": sum(self.gt.values()), "absent_per_image": self.absent_per_image(),
                "per_category": {n: {"precision": self.precision(n), "recall": self.recall(n),
                                     "detections": self.detections(n), "objects": self.gt[n]} for n in names}}

    @staticmethod
    def _sum(d: dict, name: str | None) -> int:
        return d[name] if name is not None else sum(d.values())


def match_image(counts: MatchCounts, boxes: torch.Tensor, scores: torch.Tensor, names: list[str],
                gt_boxes: torch.Tensor, gt_names: list[str], iou: float = 0.5) -> list[tuple[float, bool, str]]:
    """Add one image: detections (xyxy [n, 4], scores [n], category names) against its objects (xyxy).

    Returns (score, matched, name) per detection, best score first.
    """
    counts.images += 1
    for n in gt_names:
        counts.gt[n] += 1
    present = set(gt_names)
    used = torch.zeros(len(gt_names), dtype=torch.bool)
    same = torch.tensor([[d == g for g in gt_names] for d in names], dtype=torch.bool).reshape(len(names),
                                                                                               len(gt_names))
    ious = box_iou(boxes.float(), gt_boxes.float()) if len(names) and len(gt_names) else None
    matched = []
    for i in torch.argsort(scores, descending=True, stable=True).tolist():
        name = names[i]
        counts.absent += name not in present
        j = -1
        if ious is not None:
            cand = torch.where(same[i] & ~used, ious[i], torch.tensor(-1.0))
            best = int(cand.argmax())
            j = best if cand[best] >= iou else -1
        if j >= 0:
            used[j] = True
            counts.tp[name] += 1
        else:
            counts.fp[name] += 1
        matched.append((float(scores[i]), j >= 0, name))
    return matched


def best_f1_threshold(matched: list[tuple], num_objects: int) -> tuple[float, float]:
    """The score threshold with the best F1 over (score, matched, ...) detections of ``num_objects`` objects.

    Returns (threshold, F1); a detection is kept when its score is at least the threshold.
    """
    best = (1.0, 0.0)
    tp = 0
    ranked = sorted(matched, key=lambda x: -x[0])
    for k, (score, hit, *_) in enumerate(ranked, 1):
        tp += hit
        # a cut only between different scores: ties are kept or dropped together
        if k < len(ranked) and ranked[k][0] == score:
            continue
        f1 = 2 * tp / (k + num_objects) if num_objects else 0.0
        if f1 > best[1]:
            best = (score, f1)
    return best


def match_coco(gt: dict, detections: list[dict], category_names: list[str] | None = None,
               iou: float = 0.5) -> MatchCounts:
    """Match COCO-results detections to a COCO ground-truth dict, over the categories named (default: all)."""
    cats = {c["id"]: c["name"] for c in gt["categories"]}
    keep = set(category_names) if category_names is not None else set(cats.values())
    truth, dets = defaultdict(list), defaultdict(list)
    for a in gt["annotations"]:
        if cats[a["category_id"]] in keep:
            truth[a["image_id"]].append(a)
    for d in detections:
        name = d.get("category_name") or cats[d["category_id"]]
        if name in keep:
            dets[d["image_id"]].append((d, name))
    counts = MatchCounts()
    for im in gt["images"]:
        t, ds = truth[im["id"]], dets[im["id"]]
        match_image(counts, _xyxy([d["bbox"] for d, _ in ds]), torch.tensor([float(d["score"]) for d, _ in ds]),
                    [n for _, n in ds], _xyxy([a["bbox"] for a in t]), [cats[a["category_id"]] for a in t], iou)
    return counts


def _xyxy(xywh: list) -> torch.Tensor:
    b = torch.tensor(xywh, dtype=torch.float32).reshape(-1, 4)
    return torch.cat([b[:, :2], b[:, :2] + b[:, 2:]], dim=1)
