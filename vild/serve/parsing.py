"""``POST /detect`` bodies (multipart upload or JSON with a base64 image) → a checked ``DetectRequest``.

The server reads only the bytes it is sent: an ``image`` that names a URL or a path is refused, never fetched.
"""
from __future__ import annotations

import base64
import binascii
import json
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import Request

from ..io import ImageReadError, decode_image
from ..teacher.vocabulary import parse_vocabulary
from .limits import Limits, RequestError

Vocabulary = Union[str, list[Union[str, list[str]]]]


class DetectOptions(BaseModel):
    """The fields of a detection request besides the image."""

    model_config = ConfigDict(extra="forbid")

    vocabulary: Vocabulary = Field(description='categories: "cat,dog|puppy" (synonyms with |), or a list of names '
                                               'or synonym lists')
    score_threshold: Optional[float] = Field(None, ge=0.0, le=1.0,
                                             description="drop detections scoring lower (default: the server's)")
    max_detections: Optional[int] = Field(None, ge=1, description="keep at most this many, best first")
    masks: bool = Field(False, description="add each detection's mask as COCO RLE (size, counts)")


class DetectJSON(DetectOptions):
    """A JSON detection request: the image as base64 (a data: URL is fine)."""

    image: str = Field(description="the image file's bytes, base64-encoded")


@dataclass
class DetectRequest:
    """A checked request: the decoded image, the canonical vocabulary and the settings to detect with."""

    image: torch.Tensor  # uint8 [3, H, W] RGB
    vocabulary: str  # canonical "a|b,c": requests with equal strings share batches
    score_threshold: float
    max_detections: int
    masks: bool


async def read_detect_request(request: Request, limits: Limits, default_score: float, default_max: int,
                              decode: Any) -> DetectRequest:
    """Parse and check a request; ``decode(data, max_pixels)`` decodes the image (off the event loop)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        data, opts = await _from_form(request)
    elif ctype == "application/json":
        data, opts = await _from_json(request)
    else:
        raise RequestError(415, f"unsupported content type {ctype or '(none)'!r}: send multipart/form-data with an "
                                f"'image' file field, or application/json with a base64 'image'")
    vocab = canonical_vocabulary(opts.vocabulary, limits)
    max_dets = default_max if opts.max_detections is None else opts.max_detections
    if max_dets > limits.max_detections:
        raise RequestError(422, f"max_detections is {max_dets}; the limit is {limits.max_detections} "
                                f"(vild-serve --max-detections)")
    if not data:
        raise RequestError(400, "the image is empty: send the image file's bytes")
    image = await decode(data, limits.max_pixels)
    score = default_score if opts.score_threshold is None else opts.score_threshold
    return DetectRequest(image, vocab, float(score), int(max_dets), bool(opts.masks))


def decode_upload(data: bytes, max_pixels: int) -> torch.Tensor:
    """Image bytes → uint8 RGB tensor, or a 400 (not an image, truncated, corrupt) / 413 (too many pixels)."""
    try:
        return decode_image(data, "upload", max_pixels=max_pixels)
    except ImageReadError as e:
        if e.reason == "too many pixels":
            raise RequestError(413, f"the image has {e.detail} (vild-serve --max-pixels)") from None
        if e.reason == "too large":
            raise RequestError(413, f"the image is too large to decode safely ({e.detail})") from None
        if e.reason == "not an image":
            raise RequestError(400, "the upload is not an image: send a PNG, JPEG, WebP, BMP, GIF or TIFF file") \
                from None
        raise RequestError(400, f"the image is {e.reason} ({e.detail}): send the whole, unaltered file") from None


def canonical_vocabulary(value: Vocabulary, limits: Limits) -> str:
    """A request's vocabulary as one "a|b,c" string, within the name and character limits, or a 422."""
    if isinstance(value, list):
        names = [s for item in value for s in ([item] if isinstance(item, str) else item)]
        bad = next((s for s in names if "," in s), None)
        if bad is not None:
            raise RequestError(422, f"name {bad[:60]!r} contains a comma: in a list, give each name as its own entry")
    try:
        with warnings.catch_warnings():  # repeated names are dropped; the response's vocabulary shows it
            warnings.simplefilter("ignore")
            vocab = parse_vocabulary(value.split(",") if isinstance(value, str) else value)
    except ValueError:
        raise RequestError(422, 'the vocabulary is empty: send vocabulary="cat,dog" (synonyms with |: '
                                '"couch|sofa,tv")') from None
    count = sum(len(syns) for syns in vocab)
    if count > limits.max_names:
        raise RequestError(422, f"the vocabulary has {count} names (synonyms included); the limit is "
                                f"{limits.max_names} (vild-serve --max-names)")
    longest = max((s for syns in vocab for s in syns), key=len)
    if len(longest) > limits.max_name_chars:
        shown = longest if len(longest) <= 40 else longest[:40] + "..."
        raise RequestError(422, f"the name {shown!r} has {len(longest)} characters; the limit is "
                                f"{limits.max_name_chars} (vild-serve --max-name-chars)")
    return ",".join("|".join(syns) for syns in vocab)


async def _from_form(request: Request) -> tuple[bytes, DetectOptions]:
    form = await request.form(max_files=1, max_fields=len(DetectOptions.model_fields) + 1)
    image = form.get("image")
    if image is None:
        raise RequestError(422, "the image is missing: send it as the multipart file field 'image'")
    if not isinstance(image, UploadFile):
        raise RequestError(422, "the field 'image' must be a file upload (curl: -F image=@photo.jpg)")
    fields = {k: v for k, v in form.multi_items() if k != "image"}
    if any(isinstance(v, UploadFile) for v in fields.values()):
        raise RequestError(422, "only the field 'image' may be a file")
    return await image.read(), _options(DetectOptions, fields)


async def _from_json(request: Request) -> tuple[bytes, DetectOptions]:
    try:
        body = json.loads(await request.body())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(400, f"the body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise RequestError(422, 'the JSON body must be an object: {"image": BASE64, "vocabulary": "cat,dog"}')
    opts = _options(DetectJSON, body)
    return _b64decode(opts.image), opts


def _b64decode(text: str) -> bytes:
    if text.startswith("data:") and "," in text[:256]:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        hint = (" (the server never fetches URLs or reads paths: send the image's bytes)"
                if text.startswith(("http:", "https:", "ftp:", "file:", "/", "~", ".")) else "")
        raise RequestError(400, f"'image' is not valid base64{hint}") from None


def _options(model: type[DetectOptions], fields: dict) -> Any:
    try:
        return model.model_validate(fields)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
                             for err in e.errors()[:5])
        raise RequestError(422, problems) from None
