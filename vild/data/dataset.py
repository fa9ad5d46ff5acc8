"""COCO- and LVIS-format detection datasets producing the sample format of docs/architecture.md."""
from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import torch
from pycocotools import mask as mask_utils

from ..utils.memory import release_freed_memory
from .proposal_store import ProposalStore
from .records import RecordList
from .splits import apply_split
from .transforms import DetectionTransform
from .validate import read_json, validate_dataset

logger = logging.getLogger(__name__)

# what a record keeps of the json's entries: all that reading an image and building its target needs
_IMAGE_KEYS = ("id", "file_name", "coco_url", "height", "width")
_ANN_KEYS = ("bbox", "category_id", "segmentation")


def load_api(json_file: str | os.PathLike, evaluator_type: str, data: dict | None = None) -> Any:
    """Load a json with the official API: ``pycocotools.coco.COCO`` or ``lvis.LVIS`` (from ``data`` if given)."""
    with contextlib.redirect_stdout(io.StringIO()):  # both APIs print progress chatter
        if evaluator_type == "lvis":
            from lvis import LVIS
            if data is None:
                return LVIS(str(json_file))
            api = LVIS.__new__(LVIS)  # the constructor only reads the file, then indexes it
            api.logger, api.dataset = logging.getLogger("lvis.lvis"), data
            api._create_index()
            return api
        from pycocotools.coco import COCO
        if data is None:
            api = COCO(str(json_file))
        else:
            api = COCO()
            api.dataset = data
            api.createIndex()
    for a in api.anns.values():
        a.setdefault("iscrowd", 0)  # LVIS-style files omit it, and COCOeval needs it
    return api


def _api_tables(api: Any) -> tuple[dict, dict, dict]:
    """(images by id, annotations by image id, categories by id) for either API."""
    if hasattr(api, "img_ann_map"):  # lvis.LVIS
        return api.imgs, api.img_ann_map, api.cats
    return api.imgs, api.imgToAnns, api.cats


def has_segmentation(segm: Any) -> bool:
    """Whether an annotation's ``segmentation`` describes a shape (a polygon of 3+ points, or an RLE)."""
    if isinstance(segm, list):
        return any(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in segm)
    return isinstance(segm, dict) and bool(segm.get("counts"))


def decode_mask(segm: Any, bbox: list[float], height: int, width: int) -> np.ndarray:
    """Polygon / RLE / uncompressed RLE (or the box, when there is no usable segmentation) → uint8 [H, W]."""
    if not segm:
        x, y, w, h = bbox
        m = np.zeros((height, width), np.uint8)
        m[int(round(y)):int(round(y + h)), int(round(x)):int(round(x + w))] = 1
        return m
    if isinstance(segm, list):
        # a polygon needs 3 points; pycocotools would read a 4-number one as a box and fail on fewer
        polys = [p for p in segm if len(p) >= 6 and len(p) % 2 == 0]
        if not polys:
            return decode_mask(None, bbox, height, width)
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    elif isinstance(segm.get("counts"), list):
        rle = mask_utils.frPyObjects(segm, height, width)
    else:
        rle = segm
    return mask_utils.decode(rle).astype(np.uint8)


class DetectionDataset(torch.utils.data.Dataset):
    """Images + annotations of one COCO/LVIS json, with an open-vocabulary split applied on load.

    Training: novel categories are removed from annotations and vocabulary (vocabulary = base
    names), crowd and degenerate boxes are dropped. Testing: all kept categories, ``base_mask``
    tells which are base. ``num_unreadable`` / ``missing_proposals`` count per process (per worker).

    An unreadable image (or one whose size differs from the json) is replaced by the next readable one
    with ``unreadable="next"`` (the default in training), stops the run with ``"raise"`` (the default
    in testing: a test set is scored on every image, and a stand-in would score another image twice),
    and comes back as ``None`` with ``"skip"`` (the proposal-store writer: no image under another's id).
    """

    def __init__(self, json_file: str | os.PathLike, image_root: str | os.PathLike, evaluator_type: str = "coco",
                 split: str = "all", train: bool = True, transforms: Callable | None = None,
                 proposal_store: ProposalStore | None = None, filter_empty: bool | None = None, name: str = "",
                 unreadable: str | None = None, masks: bool = True, keep_api: bool | None = None,
                 novel: tuple[str, ...] | list[str] = (), validate: bool = False):
        """Load ``json_file``; ``filter_empty`` (default: ``train``) drops images left without annotations.

        ``novel``: category names held out of training and scored as novel (split ``all``). ``validate`` checks the
        json first (ids, names, boxes, image files: ``data/validate.py``) and stops at the first kind of problem
        with an error naming the file, the entry and the fix.

        ``masks=False`` leaves the ground-truth masks out of the targets: evaluation scores against the
        json, and the proposal-store writer needs none, so decoding every polygon would be wasted work.
        ``keep_api`` (default: ``not train``) holds on to the json's official API object, which the evaluators
        score against; dropped, ``api`` re-reads the json on first use.
        """
        self.name, self.json_file, self.image_root = name or Path(json_file).stem, str(json_file), Path(image_root)
        self.evaluator_type, self.split, self.train = evaluator_type, split, train
        self.unreadable = unreadable or ("next" if train else "raise")
        self.load_masks = masks
        if self.unreadable not in ("next", "raise", "skip"):
            raise ValueError(f"unreadable={unreadable!r}: expected 'next', 'raise' or 'skip'")
        self.transforms = transforms or DetectionTransform(None)
        self.proposal_store = proposal_store
        self.novel = tuple(novel)
        data = None
        if validate:
            data = read_json(json_file)
            validate_dataset(data, json_file, self.image_path)
        api = load_api(json_file, evaluator_type, data)
        del data
        records = self._index(api, split, train, train if filter_empty is None else filter_empty)
        self.image_ids: list[int] = [r[0]["id"] for r in records]
        # one byte buffer instead of millions of Python objects: loader workers share it (see records.py)
        self._records = RecordList(records)
        del records
        # the records are all that reading images needs; the API object (4 GB for LVIS train) is kept for the
        # evaluators only, as its million objects cost memory in every rank (and in every forked worker whose
        # garbage collector walks them)
        keep = not train if keep_api is None else keep_api
        self._api = api if keep else None
        del api
        if not keep:
            release_freed_memory()
        self.num_unreadable = 0
        self.missing_proposals = 0
        self._bad: set[int] = set()

    def _index(self, api: Any, split: str, train: bool, filter_empty: bool) -> list[tuple[dict, list[dict]]]:
        """Apply the split to the categories (sets the vocabulary) and collect each kept image's record."""
        imgs, img_anns, cats = _api_tables(api)
        kept, base_mask = apply_split(list(cats.values()), split, self.novel)
        if train:
            kept, base_mask = [c for c, b in zip(kept, base_mask) if b], [True] * sum(base_mask)
        self.category_ids: list[int] = [c["id"] for c in kept]
        self.category_names: list[list[str]] = [
            [c["name"]] + [s for s in c.get("synonyms", []) if s != c["name"]] for c in kept]
        self.base_mask: list[bool] = base_mask
        self._label = {cid: i for i, cid in enumerate(self.category_ids)}
        records = []
        self.has_masks = False  # any kept annotation with a segmentation: box-only data trains and scores no masks
        for img_id in sorted(imgs):
            all_anns = [a for a in img_anns.get(img_id, []) if a["category_id"] in self._label]
            self.has_masks = self.has_masks or any(has_segmentation(a.get("segmentation")) for a in all_anns)
            anns = [a for a in all_anns if not a.get("iscrowd", 0) and a["bbox"][2] >= 1 and a["bbox"][3] >= 1]
            # COCO OVD test sets keep only images showing one of the 65 classes (the benchmark's 4836)
            if (filter_empty and not anns) or (split == "coco_ovd" and not train and not all_anns):
                continue
            # copies of the fields targets need: nothing of the json outlives this call unless the API is kept
            records.append(({k: imgs[img_id][k] for k in _IMAGE_KEYS if k in imgs[img_id]},
                            [{k: a[k] for k in _ANN_KEYS if k in a} for a in anns]))
        return records

    def __getstate__(self) -> dict:
        # loader workers started without fork receive the dataset pickled: they read images and records, never
        # the API object (a GB of objects for LVIS val), which ``api`` would re-read if anyone asked
        return {**self.__dict__, "_api": None}

    @property
    def api(self) -> Any:
        """The official ``COCO`` / ``LVIS`` object of the json (re-read on first use for a training set)."""
        if self._api is None:
            self._api = load_api(self.json_file, self.evaluator_type)
        return self._api

    def __len__(self) -> int:
        return len(self._records)

    def image_path(self, img: dict) -> Path:
        """File of an image entry: ``file_name`` under the root, else the tail of ``coco_url`` (LVIS)."""
        if img.get("file_name"):
            return self.image_root / img["file_name"]
        folder, base = img["coco_url"].split("/")[-2:]
        nested = self.image_root / folder / base  # LVIS val mixes COCO train2017 and val2017 images
        return nested if nested.exists() else self.image_root / base

    def _read(self, img: dict) -> tuple[torch.Tensor | None, str]:
        """The image as uint8 [3, H, W], or None and what is wrong with it."""
        path = self.image_path(img)
        arr = cv2.imread(str(path), cv2.IMREAD_COLOR)  # grayscale files come back as 3 channels too
        if arr is None:
            return None, f"unreadable image {path} (id {img['id']})"
        if arr.shape[:2] != (img["height"], img["width"]):
            # OpenCV turns photos upright by their EXIF orientation (so do detectron2 and most annotation
            # tools); a json whose size is the stored bitmap's was annotated on the stored pixels instead
            raw = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
            if raw is None or raw.shape[:2] != (img["height"], img["width"]):
                return None, (f"image {path} (id {img['id']}) is {arr.shape[:2]} on disk but "
                              f"{(img['height'], img['width'])} in the json")
            arr = raw
        return torch.from_numpy(cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)).permute(2, 0, 1).contiguous(), ""

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, dict] | None:
        """``(image uint8 [3, H, W], target)``; an unusable image is handled as ``unreadable`` says."""
        if self.unreadable == "skip" and idx in self._bad:
            return None
        for k in range(len(self)):
            j = (idx + k) % len(self)
            if j in self._bad:
                continue
            img, anns = self._records[j]
            image, problem = self._read(img)
            if image is None:
                if self.unreadable == "raise":
                    raise RuntimeError(f"{problem}: dataset {self.name} is scored on every image, so none is "
                                       f"skipped; repair the file or remove the image from {self.json_file}")
                logger.warning("%s: skipped", problem)
                self._bad.add(j)
                self.num_unreadable += 1
                if self.unreadable == "skip":
                    return None
                continue
            return self.transforms(image, self._build_target(img, anns))
        raise RuntimeError(f"dataset {self.name}: no readable image at all under {self.image_root}")

    def target(self, idx: int) -> dict:
        """The ground truth of image ``idx`` (before transforms), without reading the image."""
        return self._build_target(*self._records[idx])

    def _build_target(self, img: dict, anns: list[dict]) -> dict:
        h, w = img["height"], img["width"]
        boxes = torch.tensor([[x, y, x + bw, y + bh] for x, y, bw, bh in (a["bbox"] for a in anns)],
                             dtype=torch.float32).reshape(-1, 4)
        target = {
            "boxes": boxes,
            "labels": torch.tensor([self._label[a["category_id"]] for a in anns], dtype=torch.int64),
            "image_id": int(img["id"]),
            "orig_size": (h, w),
        }
        if self.load_masks:
            # an annotation without a segmentation gets an empty mask flagged invalid: it trains no mask (a box-shaped
            # target would teach the mask head rectangles)
            valid = [has_segmentation(a.get("segmentation")) for a in anns]
            masks = np.stack([decode_mask(a["segmentation"], a["bbox"], h, w) if v else np.zeros((h, w), np.uint8)
                              for a, v in zip(anns, valid)]) if anns else np.zeros((0, h, w), np.uint8)
            target["masks"] = torch.from_numpy(masks)
            target["mask_valid"] = torch.tensor(valid, dtype=torch.bool)
        target.update(self._proposals(int(img["id"])))
        return target

    def _proposals(self, image_id: int) -> dict:
        dim = self.proposal_store.embed_dim if self.proposal_store is not None else 0
        entry = self.proposal_store.get(image_id) if self.proposal_store is not None else None
        if entry is None:
            if self.proposal_store is not None:
                self.missing_proposals += 1
                if self.missing_proposals == 1 or self.missing_proposals % 1000 == 0:
                    logger.warning("%s: %d images without a proposal-store entry so far (latest: id %d); "
                                   "they get no distillation targets", self.name, self.missing_proposals, image_id)
            return {"proposal_boxes": torch.zeros(0, 4), "proposal_embeds": torch.zeros(0, dim),
                    "proposal_valid": torch.zeros(0, dtype=torch.bool)}
        boxes, embeds = entry
        return {"proposal_boxes": torch.from_numpy(boxes).float(), "proposal_embeds": torch.from_numpy(embeds).float(),
                "proposal_valid": torch.ones(len(boxes), dtype=torch.bool)}
