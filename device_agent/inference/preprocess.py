"""Raw input (an image file, a decoded picture, an array) to the model's float input.

The recipe is the bundle's ``preprocessing`` (see docs/bundle.md)::

    model_input = resize(color(raw)) * scale + offset

Pillow decodes and resizes images when it is installed; without it, ``.npy``
inputs still work and resizing falls back to nearest neighbour in numpy.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Union

import numpy as np

from ..errors import InputError
from ..limits import MAX_IMAGE_PIXELS, MAX_INPUT_FILE_BYTES
from ..update.manifest import Preprocessing
from .npy import read_npy

__all__ = ["IMAGE_SUFFIXES", "load_raw", "decode_image", "preprocess"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pgm", ".ppm", ".webp")
_ORIENTATION = 0x0112  # the EXIF tag


def _orientation(img) -> int:
    try:
        value = img.getexif().get(_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a malformed EXIF block (hostile or broken): the picture as stored
        return 1
    return value if isinstance(value, int) else 1


def decode_image(data: Union[bytes, os.PathLike, str], color: str = "grayscale") -> np.ndarray:
    """Decode an image to an H x W x C uint8 array (C = 1 for grayscale, 3 for rgb).

    The picture is turned upright by its EXIF orientation (as viewers show it); any mode Pillow reads
    (L, RGB, RGBA, LA, P with or without transparency, CMYK, ...) becomes ``color`` with Pillow's own
    ``convert``: alpha is dropped, grayscale is ITU-R 601-2 luma. ``edgekit``'s image-folder loader
    decodes with this very function, so host and board see the same pixels.
    """
    try:
        from PIL import Image, ImageOps, UnidentifiedImageError
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise InputError("decoding images needs Pillow; pip install pillow, or feed .npy arrays") from exc
    name = "<bytes>" if isinstance(data, bytes) else str(data)
    try:
        if not isinstance(data, bytes) and os.path.getsize(data) > MAX_INPUT_FILE_BYTES:
            raise InputError(f"{name} is {os.path.getsize(data)} bytes, over the limit of {MAX_INPUT_FILE_BYTES}")
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            w, h = img.size  # from the header: nothing is decoded yet
            if w * h > MAX_IMAGE_PIXELS:
                raise InputError(f"{name} is {w} x {h} pixels, over the limit of {MAX_IMAGE_PIXELS}; send a smaller "
                                 "picture")
            if _orientation(img) in range(2, 9):  # a phone's or camera's picture, stored sideways
                img = ImageOps.exif_transpose(img)
            img = img.convert("L" if color == "grayscale" else "RGB")
            arr = np.asarray(img, dtype=np.uint8)
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, MemoryError, Image.DecompressionBombError) as exc:
        raise InputError(f"{name} is not a readable image ({exc.__class__.__name__}); replace or remove the file") from exc
    return arr[..., None] if arr.ndim == 2 else arr


def load_raw(path: os.PathLike | str, color: str = "grayscale") -> np.ndarray:
    """One input file (image or ``.npy``) as an array in raw units."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return read_npy(path, what=str(path))  # header checked before the data is read
    if suffix in IMAGE_SUFFIXES:
        return decode_image(path, color)
    raise InputError(f"{path} has suffix {suffix!r}; inputs must be .npy or one of {IMAGE_SUFFIXES}")


def _resize(img: np.ndarray, height: int, width: int, method: str) -> np.ndarray:
    if img.shape[0] == height and img.shape[1] == width:
        return img
    if method == "none":
        raise InputError(
            f"input size={img.shape[0]}x{img.shape[1]}, expected={height}x{width} and the bundle does not resize"
        )
    try:
        from PIL import Image

        resample = Image.BILINEAR if method == "bilinear" else Image.NEAREST
        chans = [
            np.asarray(Image.fromarray(img[..., c].astype(np.float32), mode="F").resize((width, height), resample))
            for c in range(img.shape[2])
        ]
        return np.stack(chans, axis=-1)
    except ImportError:
        rows = (np.arange(height) * img.shape[0] / height).astype(int)
        cols = (np.arange(width) * img.shape[1] / width).astype(int)
        return img[rows][:, cols]


def preprocess(raw: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """Turn one raw input into the model's float32 input (no batch axis)."""
    x = np.asarray(raw)
    if x.dtype == object or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise InputError(f"input dtype={x.dtype} is not numeric; send numbers")
    target = tuple(pre.shape)
    if pre.kind == "array":
        if target and x.size != int(np.prod(target)):
            raise InputError(f"input shape={list(x.shape)}, expected={list(target)}; check the source's data")
        x = x.reshape(target) if target else x
    else:
        if x.ndim == 2:
            x = x[..., None]
        if x.ndim != 3:
            raise InputError(f"image shape={list(x.shape)}, expected H x W x C like {list(target)}")
        want_c = target[2] if len(target) == 3 else (1 if pre.color == "grayscale" else 3)
        if x.shape[2] != want_c:
            if want_c == 1 and x.shape[2] in (3, 4):
                x = (x[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
            elif want_c == 3 and x.shape[2] == 1:
                x = np.repeat(x, 3, axis=2)
            elif want_c == 3 and x.shape[2] == 4:
                x = x[..., :3]
            else:
                raise InputError(f"image has {x.shape[2]} channels, expected={want_c}")
        if len(target) >= 2:
            x = _resize(x, target[0], target[1], pre.resize)
    x = x.astype(np.float32) * np.float32(pre.scale) + np.float32(pre.offset)
    if not np.all(np.isfinite(x)):
        raise InputError("input holds NaN or infinite values; check the sensor or file")
    return x
