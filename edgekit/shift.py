"""Deterministic distribution shift for image batches: what a fleet meets in the field.

The demo and the loop bench need inputs the model has not seen: the same
classes, drawn differently. :class:`Shift` describes a shift; :func:`apply_shift`
applies it to a batch of raw images (N x H x W x C, pixels 0..255, as
``edgekit.data.Dataset`` holds them) and returns a new float32 batch in the same
units, clipped to 0..255. Given the same seed the result is identical, bit for bit.

Each image draws its own parameters from the seed, in this order:

1. rotation by an angle uniform in ``[-rotation, rotation]`` degrees and a
   translation uniform in ``[-translate, translate]`` pixels on each axis, one
   bilinear resampling about the image centre; pixels from outside are ``fill``;
2. contrast: ``x = 127.5 + c * (x - 127.5)`` with ``c`` uniform in
   ``[contrast, 1]`` (``contrast < 1`` washes the picture out towards grey);
3. gaussian noise with standard deviation ``noise`` (pixel units);
4. clip to 0..255.

A component whose parameter is neutral (0 degrees, 0 pixels, contrast 1,
noise 0) leaves the image alone and draws nothing, so it does not change what
the other components draw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Dict

import numpy as np

__all__ = ["Shift", "SHIFTS", "DEFAULT_SHIFT", "apply_shift", "get_shift"]


@dataclass(frozen=True)
class Shift:
    """A distribution shift; every field is keyword-only and checked."""

    rotation: float = 0.0  # max degrees, each image uniform in [-rotation, rotation]
    translate: float = 0.0  # max pixels per axis
    contrast: float = 1.0  # lowest contrast factor, each image uniform in [contrast, 1]
    noise: float = 0.0  # gaussian std in pixel units (0..255 scale)
    fill: float = 0.0  # value of pixels rotated in from outside the picture

    def __post_init__(self) -> None:
        for name in ("rotation", "translate", "noise"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"shift {name}={value!r} must be a finite number >= 0")
        if not (isinstance(self.contrast, (int, float)) and 0.0 < self.contrast <= 1.0):
            raise ValueError(f"shift contrast={self.contrast!r} must be within (0, 1]")
        if not (isinstance(self.fill, (int, float)) and 0.0 <= self.fill <= 255.0):
            raise ValueError(f"shift fill={self.fill!r} must be within [0, 255]")

    def scaled(self, severity: float) -> "Shift":
        """The same kind of shift, ``severity`` times as strong (0 = none)."""
        if severity < 0:
            raise ValueError(f"severity={severity} must be >= 0")
        return replace(
            self,
            rotation=self.rotation * severity,
            translate=self.translate * severity,
            contrast=max(1e-3, 1.0 - (1.0 - self.contrast) * severity),
            noise=self.noise * severity,
        )

    def describe(self) -> str:
        parts = []
        if self.rotation:
            parts.append(f"rotation +-{self.rotation:g} deg")
        if self.translate:
            parts.append(f"translation +-{self.translate:g} px")
        if self.contrast < 1:
            parts.append(f"contrast x{self.contrast:g}..1")
        if self.noise:
            parts.append(f"gaussian noise std {self.noise:g}")
        return ", ".join(parts) or "none"


# Tuned on the 8x8 digits: "field" costs the example CNN tens of accuracy
# points while staying readable to a person (see docs/demo.md).
SHIFTS: Dict[str, Shift] = {
    "none": Shift(),
    "noise": Shift(noise=40.0),
    "rotation": Shift(rotation=30.0),
    "contrast": Shift(contrast=0.35),
    "translation": Shift(translate=1.5),
    "field": Shift(rotation=20.0, translate=1.0, contrast=0.6, noise=20.0),
}
DEFAULT_SHIFT = SHIFTS["field"]


def get_shift(name: str) -> Shift:
    """A named shift from :data:`SHIFTS`."""
    try:
        return SHIFTS[name]
    except KeyError:
        raise ValueError(f"shift {name!r} is unknown; expected one of {sorted(SHIFTS)}") from None


def _affine(x: np.ndarray, angles: np.ndarray, shifts: np.ndarray, fill: float) -> np.ndarray:
    """Rotate each image by ``angles`` (radians) and move it by ``shifts`` (dy, dx), bilinear."""
    n, h, w, c = x.shape
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    cos = np.cos(angles)[:, None, None]
    sin = np.sin(angles)[:, None, None]
    # Inverse mapping: for each output pixel, where it comes from in the input.
    oy = yy[None] - cy - shifts[:, 0, None, None]
    ox = xx[None] - cx - shifts[:, 1, None, None]
    sy = cos * oy - sin * ox + cy
    sx = sin * oy + cos * ox + cx
    y0 = np.floor(sy).astype(np.int64)
    x0 = np.floor(sx).astype(np.int64)
    fy = (sy - y0)[..., None]
    fx = (sx - x0)[..., None]
    padded = np.full((n, h + 2, w + 2, c), fill, dtype=np.float64)
    padded[:, 1:-1, 1:-1, :] = x
    idx = np.arange(n)[:, None, None]

    def at(yi: np.ndarray, xi: np.ndarray) -> np.ndarray:
        yi = np.clip(yi + 1, 0, h + 1)
        xi = np.clip(xi + 1, 0, w + 1)
        return padded[idx, yi, xi]

    top = at(y0, x0) * (1 - fx) + at(y0, x0 + 1) * fx
    bottom = at(y0 + 1, x0) * (1 - fx) + at(y0 + 1, x0 + 1) * fx
    return top * (1 - fy) + bottom * fy


def apply_shift(x: np.ndarray, shift: Shift = DEFAULT_SHIFT, *, seed: int = 0) -> np.ndarray:
    """``x`` (N x H x W x C or N x H x W, pixels 0..255) under ``shift``, as float32.

    Deterministic: the same ``x``, ``shift`` and ``seed`` give the same output.
    ``x`` itself is never modified.
    """
    arr = np.asarray(x)
    if arr.ndim == 3:
        arr = arr[..., None]
        squeeze = True
    elif arr.ndim == 4:
        squeeze = False
    else:
        raise ValueError(f"images shape={list(arr.shape)}, expected N x H x W x C or N x H x W")
    if not isinstance(shift, Shift):
        raise TypeError(f"shift must be a Shift, got {type(shift).__name__}")
    out = arr.astype(np.float64)
    n = out.shape[0]
    rng = np.random.default_rng(seed)
    if shift.rotation or shift.translate:
        angles = np.deg2rad(rng.uniform(-shift.rotation, shift.rotation, size=n)) if shift.rotation else np.zeros(n)
        moves = rng.uniform(-shift.translate, shift.translate, size=(n, 2)) if shift.translate else np.zeros((n, 2))
        out = _affine(out, angles, moves, float(shift.fill))
    if shift.contrast < 1.0:
        factors = rng.uniform(shift.contrast, 1.0, size=n)[:, None, None, None]
        out = 127.5 + factors * (out - 127.5)
    if shift.noise:
        out = out + rng.normal(0.0, shift.noise, size=out.shape)
    out = np.clip(out, 0.0, 255.0).astype(np.float32)
    return out[..., 0] if squeeze else out
