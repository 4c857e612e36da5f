"""Reading, decoding and resizing one image: the preprocessing extraction and every direct model
call share, so a descriptor in the store equals ``model.extract(normalize_images(load_image(...)))``.

Resizing is PIL bilinear (antialiased when shrinking) to a fixed ``(H, W)`` without keeping the
aspect ratio, as R²Former's official evaluation does with ``transforms.Resize((480, 640))``.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile

from .storage import filesystem

# Truncated JPEGs must fail loudly (they go to the errors table), not decode to grey rows.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# City-scale panoramas can be large; still refuse decompression bombs beyond this many pixels.
Image.MAX_IMAGE_PIXELS = 200_000_000

PREPROCESSING = {
    "decode": "PIL, converted to RGB",
    "resize": "PIL bilinear to (H, W), aspect ratio not kept",
    "normalize": "ImageNet mean/std (pipeline.model.normalize_images)",
}


class ImageReadError(Exception):
    """A bad input; ``stage`` is ``read`` (missing, unreadable, empty) or ``decode``."""

    def __init__(self, stage: str, reason: str):
        super().__init__(f"{stage}: {reason}")
        self.stage = stage
        self.reason = reason


@dataclass
class LoadedImage:
    pixels: np.ndarray  # uint8 (H, W, 3) after resizing
    width: int          # original size
    height: int
    content_hash: str   # of the encoded bytes; changes whenever the file does


def read_bytes(path: str) -> bytes:
    try:
        fs, p = filesystem(path)
        with fs.open(p, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ImageReadError("read", "file not found") from None
    except Exception as exc:  # permissions, network, bad URL: all unreadable for this image only
        raise ImageReadError("read", f"{type(exc).__name__}: {exc}") from None
    if not data:
        raise ImageReadError("read", "empty file (0 bytes)")
    return data


def decode_resize(data: bytes, image_size: tuple[int, int]) -> tuple[np.ndarray, int, int]:
    """uint8 (H, W, 3) resized pixels and the original ``(width, height)``."""
    h, w = image_size
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # decodes fully here, so truncation raises instead of surfacing later
            width, height = im.size
            rgb = im.convert("RGB")
    except Exception as exc:
        raise ImageReadError("decode", f"{type(exc).__name__}: {exc}") from None
    if (width, height) != (w, h):
        rgb = rgb.resize((w, h), Image.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8), width, height


def content_hash(data: bytes) -> str:
    return "blake2b:" + hashlib.blake2b(data, digest_size=16).hexdigest()


def load_image(path: str, image_size: tuple[int, int]) -> LoadedImage:
    data = read_bytes(path)
    pixels, width, height = decode_resize(data, image_size)
    return LoadedImage(pixels, width, height, content_hash(data))
