"""Robust image reading: any file PIL can open becomes a uint8 RGB tensor [3, H, W], or a clear error."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageReadError(Exception):
    """An input file that cannot be read as an image; ``reason`` is a short, groupable cause."""

    def __init__(self, path: Union[str, os.PathLike], reason: str, detail: str = ""):
        self.path, self.reason, self.detail = str(path), reason, detail
        super().__init__(f"cannot read image {self.path}: {reason}" + (f" ({detail})" if detail else ""))


def read_image(path: Union[str, os.PathLike]) -> torch.Tensor:
    """Read an image file as uint8 RGB [3, H, W], EXIF orientation applied; raises ImageReadError.

    JPEGs in RGB or grayscale are decoded by torchvision (libjpeg-turbo, straight into a tensor); the result is
    then a [3, H, W] view of H×W×3 pixels, as drawing and encoding want them. Everything else goes through PIL.
    """
    p = Path(path)
    if not p.is_file():
        raise ImageReadError(p, "not found" if not p.exists() else "not a file")
    return _decode(p.read_bytes(), p)  # one open: PIL reads the header from these bytes and the decoder the rest


def decode_image(data: bytes, name: str = "image", max_pixels: Optional[int] = None) -> torch.Tensor:
    """Decode an encoded image (PNG, JPEG, ...) held in memory as uint8 RGB [3, H, W]; raises ImageReadError.

    With ``max_pixels``, a larger image is refused (reason "too many pixels") from its header, before decoding.
    """
    return _decode(data, name, max_pixels)


def _decode(data: bytes, name: Union[str, os.PathLike], max_pixels: Optional[int] = None) -> torch.Tensor:
    try:
        with Image.open(io.BytesIO(data)) as img:  # the header only; refuses decompression bombs
            if max_pixels is not None and img.width * img.height > max_pixels:
                raise ImageReadError(name, "too many pixels", f"{img.width}x{img.height} = "
                                     f"{img.width * img.height} pixels; the limit is {max_pixels}")
            if img.format == "JPEG" and img.mode in ("RGB", "L"):
                fast = _decode_jpeg(data)
                if fast is not None:
                    return fast
            img.load()  # PIL opens lazily: decoding errors (truncation) only surface here
            return pil_to_tensor(img)
    except UnidentifiedImageError:
        raise ImageReadError(name, "not an image") from None
    except Image.DecompressionBombError as e:  # not an OSError: it would end a whole folder's run
        raise ImageReadError(name, "too large", str(e).splitlines()[0][:200]) from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL reports broken data as any of these
        reason = "truncated" if "truncated" in str(e) else "corrupt"
        raise ImageReadError(name, reason, str(e).splitlines()[0][:200] if str(e) else type(e).__name__) from None


def _decode_jpeg(data: bytes) -> Optional[torch.Tensor]:
    """torchvision's JPEG decoder, where this torchvision has it; None when it is absent or fails (PIL then
    decodes the file, or names what is wrong with it)."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return None
    try:
        encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # a writable copy: torch warns otherwise
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except (RuntimeError, ValueError, TypeError):
        return None


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """Convert any PIL image (grayscale, palette, RGBA, 16-bit, CMYK) to uint8 RGB [3, H, W]."""
    img = ImageOps.exif_transpose(img)
    return torch.from_numpy(np.array(_to_rgb_array(img))).permute(2, 0, 1).contiguous()  # np.array: writable copy


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return np.repeat(_high_depth_to_uint8(np.asarray(img))[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # transparent pixels usually hold garbage colours: composite on white like a viewer would
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.asarray(img.convert("RGB"))


def _high_depth_to_uint8(a: np.ndarray) -> np.ndarray:
    """16/32-bit integer images span 0..65535; float images are 0..1 or 0..255 if they fit, else stretched."""
    is_float = a.dtype.kind == "f"
    a = a.astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    if not is_float:
        a = a / 257.0  # 65535 / 255
    elif lo >= 0 and hi <= 1.0:
        a = a * 255.0
    elif lo < 0 or hi > 255:
        a = (a - lo) / (hi - lo if hi > lo else 1.0) * 255.0
    return np.clip(np.round(a), 0, 255).astype(np.uint8)


def _float_scale(max_value: float) -> float:
    """Float images on 0..1 (torchvision's ToTensor) are scaled to 0..255; on 0..1 they would be black."""
    return 255.0 if max_value <= 1.0 else 1.0


def to_image_tensor(image: object, bgr: bool = False) -> torch.Tensor:
    """Path, PIL image, numpy array (H×W, H×W×3/4; RGB unless ``bgr``) or tensor [3,H,W] → uint8 RGB [3,H,W].

    Float arrays and tensors are read on 0..255, or on 0..1 when no value exceeds 1 (torchvision's ToTensor).
    """
    if isinstance(image, (str, os.PathLike)):
        return read_image(image)
    if isinstance(image, Image.Image):
        return pil_to_tensor(image)
    if isinstance(image, np.ndarray):
        return _array_to_tensor(image, bgr)
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensors must be [3, H, W] RGB; got shape {tuple(image.shape)}")
        if image.is_floating_point():
            image = image.float()
            image = (image * _float_scale(float(image.max()) if image.numel() else 0.0)).round().clamp(0, 255)
            image = image.to(torch.uint8)
        elif image.dtype != torch.uint8:
            image = image.clamp(0, 255).to(torch.uint8)
        return image.flip(0) if bgr else image
    raise TypeError(f"unsupported image type {type(image).__name__}: pass a path, PIL image, numpy array or tensor")


def _array_to_tensor(a: np.ndarray, bgr: bool) -> torch.Tensor:
    if a.dtype == np.uint16:
        a = _high_depth_to_uint8(a)
    elif a.dtype.kind == "f":
        a = np.clip(np.round(a * _float_scale(float(a.max()) if a.size else 0.0)), 0, 255).astype(np.uint8)
    elif a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"numpy images must be H×W, H×W×3 or H×W×4; got shape {a.shape}")
    if a.shape[2] == 4:
        a = a[..., [2, 1, 0, 3]] if bgr else a
        return pil_to_tensor(Image.fromarray(np.ascontiguousarray(a)))
    if bgr:
        a = a[..., ::-1]
    return torch.from_numpy(np.array(a)).permute(2, 0, 1).contiguous()
