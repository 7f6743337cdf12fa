"""How a stored input is shown to a person: an image (PNG) or a plot (a few lines of numbers).

* An image: ``H x W``, ``H x W x 1`` (grayscale), ``H x W x 3`` (RGB) or ``H x W x 4`` (RGBA), leading
  axes of size 1 dropped. 8-bit pixels are shown as they are; any other dtype is scaled from its
  minimum to its maximum (a constant input is black).
* A series: a 1-D input (audio, a sensor trace), ``1 x N``, or ``N x C`` with at most 8 channels
  and at least 4 readings a channel (an accelerometer window), shown as one line per channel;
  long series are reduced to a min/max envelope of ``max_points`` points so a plot stays light.
* Anything else is shown as the image of its first two axes' means.

The browser scales images crisply (CSS ``image-rendering: pixelated``); nothing here resamples.
"""

from __future__ import annotations

import io
from typing import Any, Dict, List

import numpy as np

from ...errors import DataError
from ..store import SampleRecord

__all__ = ["kind", "image_array", "png_bytes", "series"]


def _squeeze(a: np.ndarray) -> np.ndarray:
    while a.ndim > 2 and a.shape[0] == 1:
        a = a[0]
    return a


def kind(arr: np.ndarray) -> str:
    """``"image"`` or ``"series"``."""
    a = _squeeze(np.asarray(arr))
    if a.ndim <= 1:
        return "series"
    if a.ndim == 2:
        rows, cols = a.shape
        if rows == 1 or (cols <= 8 and rows >= 4 * cols):
            return "series"
        return "image"
    return "image"


def image_array(arr: np.ndarray) -> np.ndarray:
    """``arr`` as 8-bit ``H x W`` or ``H x W x 3|4`` pixels."""
    a = _squeeze(np.asarray(arr))
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    elif a.ndim == 3 and a.shape[-1] not in (3, 4):
        a = a.mean(axis=-1)
    elif a.ndim > 3:
        a = a.reshape(a.shape[0], a.shape[1], -1).mean(axis=-1)
    if a.ndim != 2 and a.ndim != 3:
        raise DataError(f"input of shape {list(np.shape(arr))} is not an image")
    if a.dtype == np.uint8:
        return a
    f = a.astype(np.float64)
    finite = np.isfinite(f)
    lo, hi = (float(f[finite].min()), float(f[finite].max())) if finite.any() else (0.0, 0.0)
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    with np.errstate(invalid="ignore", over="ignore"):
        scaled = np.nan_to_num((f - lo) / (hi - lo) * 255.0, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(scaled, 0, 255).round().astype(np.uint8)


def png_bytes(record_or_array: "SampleRecord | np.ndarray") -> bytes:
    """An image input as a PNG at its own size (grayscale, RGB or RGBA); a series as a small plot."""
    from PIL import Image

    arr = record_or_array.array() if isinstance(record_or_array, SampleRecord) else record_or_array
    if kind(arr) == "series":
        return _series_png(arr)
    px = image_array(arr)
    mode = "L" if px.ndim == 2 else ("RGB" if px.shape[-1] == 3 else "RGBA")
    buf = io.BytesIO()
    Image.fromarray(px, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


_COLOURS = ((31, 111, 235), (207, 34, 46), (26, 127, 55), (154, 103, 0), (130, 80, 223), (191, 57, 137),
            (10, 126, 164), (87, 96, 106))


def _series_png(arr: np.ndarray, width: int = 240, height: int = 120) -> bytes:
    """A series drawn as lines on white (the grid's thumbnail; the page itself plots in SVG)."""
    from PIL import Image, ImageDraw

    s = series(arr, max_points=width * 2)
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    values = [v for ch in s["channels"] for v in ch]
    lo, hi = (min(values), max(values)) if values else (0.0, 0.0)
    for i, ch in enumerate(s["channels"]):
        if len(ch) < 2:
            continue
        pts = [(j * (width - 1) / (len(ch) - 1),
                (height - 1) * (1 - (v - lo) / (hi - lo)) if hi > lo else height / 2) for j, v in enumerate(ch)]
        draw.line(pts, fill=_COLOURS[i % len(_COLOURS)], width=1)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def series(arr: np.ndarray, max_points: int = 1200) -> Dict[str, Any]:
    """``{"channels": [[y, ...], ...], "length": n, "envelope": bool}`` (min/max pairs when reduced)."""
    a = _squeeze(np.asarray(arr)).astype(np.float64)
    if a.ndim <= 1:
        chans = [a.reshape(-1)]
    elif a.shape[0] == 1:
        chans = [a[0]]
    else:
        chans = [a[:, c] for c in range(a.shape[1])]
    n = len(chans[0]) if chans else 0
    envelope = n > max_points
    out: List[List[float]] = []
    for ch in chans:
        ch = np.nan_to_num(ch, nan=0.0, posinf=0.0, neginf=0.0)
        if envelope:
            edges = np.linspace(0, n, max_points // 2 + 1).astype(int)
            pairs = [(float(ch[s:e].min()), float(ch[s:e].max())) for s, e in zip(edges, edges[1:]) if e > s]
            out.append([v for p in pairs for v in p])
        else:
            out.append([float(v) for v in ch])
    return {"channels": out, "length": int(n), "envelope": envelope}
