"""Checks of a user's COCO- or LVIS-format json on load: one clear error, naming the file, the entry and the fix."""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Callable

# boxes may reach this far past the image border (rounding in annotation tools) before they count as outside
BORDER_TOLERANCE = 1.0


class DatasetError(ValueError):
    """A dataset json that cannot be trained or evaluated on as it is."""


def read_json(json_file: str | os.PathLike) -> dict:
    """The json's top level, checked to be a detection dataset (``images``, ``annotations``, ``categories``)."""
    try:
        with open(json_file) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{json_file} is not valid JSON ({e}); repair the file") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{json_file}: the top level is a {type(data).__name__}, not a COCO-format object with "
                           f"images, annotations and categories")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise DatasetError(f"{json_file}: no {', '.join(missing)} list{'s' if len(missing) > 1 else ''} at the top "
                           f"level; a COCO-format json has images, annotations and categories")
    return data


def validate_dataset(data: dict, json_file: str | os.PathLike, image_path: Callable[[dict], Path],
                     check_files: bool = True) -> None:
    """Raise :class:`DatasetError` on the first kind of problem found (with a count of the entries like it).

    Checked: ids present and unique (images, annotations, categories), category names unique, every image with a
    ``file_name`` (or ``coco_url``), a height and width, and (``check_files``) its file under the image folder;
    every annotation on a known image and category with a box of positive size inside the image.
    """
    src = str(json_file)
    _unique_ids(src, "category", data["categories"], "give each category its own id")
    _unique_ids(src, "image", data["images"], "give each image its own id")
    _unique_ids(src, "annotation", data["annotations"], "give each annotation its own id")
    names = Counter(str(c.get("name") or "").strip().lower() for c in data["categories"])
    _raise_first(src, [f"category name {n!r} is used by {k} categories; merge them or rename all but one"
                       for n, k in names.items() if k > 1 and n])
    _raise_first(src, [f"category id {c['id']} has no name; add \"name\": ..." for c in data["categories"]
                       if not str(c.get("name") or "").strip()])
    images = {im["id"]: im for im in data["images"]}
    _raise_first(src, [f"image id {im['id']} has no file_name; add the image's path relative to the image folder"
                       for im in data["images"] if not im.get("file_name") and not im.get("coco_url")])
    _raise_first(src, [f"image id {im['id']} ({im.get('file_name')}) has no height and width; add them (pixels)"
                       for im in data["images"] if not _positive(im.get("height")) or not _positive(im.get("width"))])
    cats = {c["id"] for c in data["categories"]}
    unknown_image, unknown_cat, no_box, empty, outside = [], [], [], [], []
    for a in data["annotations"]:
        where = f"annotation id {a['id']} (image id {a.get('image_id')})"
        im = images.get(a.get("image_id"))
        if im is None:
            unknown_image.append(f"{where} is on an image id that is not in images; fix its image_id or remove it")
            continue
        if a.get("category_id") not in cats:
            unknown_cat.append(f"{where} has category id {a.get('category_id')!r}, which is not in categories "
                               f"(ids {_ids_text(cats)}); fix its category_id or add the category")
        box = a.get("bbox")
        if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            no_box.append(f"{where} has no bbox [x, y, width, height] (got {box!r}); add one or remove the annotation")
            continue
        x, y, w, h = box
        if w <= 0 or h <= 0:
            empty.append(f"{where} has a box of zero size {box}; fix its width and height or remove it")
        elif (x < -BORDER_TOLERANCE or y < -BORDER_TOLERANCE or x + w > im["width"] + BORDER_TOLERANCE
              or y + h > im["height"] + BORDER_TOLERANCE):
            outside.append(f"{where} has a box {box} (x, y, width, height) outside its {im['width']}x{im['height']} "
                           f"image; fix the box (or the image's width and height) or remove the annotation")
    for problems in (unknown_image, unknown_cat, no_box, empty, outside):
        _raise_first(src, problems)
    if check_files:
        missing = [(im, image_path(im)) for im in data["images"]]
        _raise_first(src, [f"image id {im['id']}: file {p} does not exist; put it there, fix file_name (relative "
                           f"to the image folder) or the image folder, or remove the image" for im, p in missing
                           if not p.is_file()])


def _positive(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def _ids_text(ids: set) -> str:
    s = sorted(ids, key=str)
    return ", ".join(map(str, s[:10])) + (", ..." if len(s) > 10 else "")


def _unique_ids(src: str, kind: str, entries: list, fix: str) -> None:
    no_id = [i for i, e in enumerate(entries) if not isinstance(e, dict) or "id" not in e]
    _raise_first(src, [f"{kind} number {i + 1} in the list has no id; {fix}" for i in no_id])
    counts = Counter(e["id"] for e in entries)
    _raise_first(src, [f"{kind} id {i!r} is used {k} times; {fix}" for i, k in counts.items() if k > 1])


def _raise_first(src: str, problems: list[str]) -> None:
    if problems:
        more = f" ({len(problems) - 1} more like it)" if len(problems) > 1 else ""
        raise DatasetError(f"{src}: {problems[0]}{more}")
