"""Raw inputs checked against what the bundle says they are: dtype first, then (floats only) value range.

A camera or sensor that feeds the wrong units (pixels scaled to 0..1 into a bundle made for 0..255, raw
0..255 into one made for 0..1 arrays) gives a model inputs it never saw: every prediction is garbage, most
are low-confidence, and every one would be flagged. :class:`InputCheck` tells such inputs apart, so the agent
warns once per kind, counts them, and keeps them out of the outbox (docs/agent.md, "Input check").

What the bundle expects (its ``preprocessing``):

* ``raw_dtype`` integer (``uint8`` images): values within the dtype's range. An input of that very dtype is
  accepted on one comparison (the camera path pays nothing else). A float input whose values all lie in
  0..1 was scaled on the way (kind ``scaled``); one with values outside the range is kind ``range``.
* ``raw_dtype`` float: the raw range of the training data, from the manifest's ``reference`` statistics
  (model units, mapped back through ``scale`` and ``offset``), widened on each side by a quarter of its span
  for images (pixels have hard bounds: -1..1 into a 0..1 bundle is caught) and by its whole span for arrays
  (sensor readings drift; wrong units differ by a factor of 100 or more). Values outside are kind ``range``.
  A bundle without reference statistics gets no range check.

Inputs that are not numeric, empty or not finite are left to :func:`~.preprocess.preprocess`, which refuses them.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Tuple

import numpy as np

from ..update.manifest import Preprocessing

__all__ = ["KINDS", "InputCheck"]

#: The kinds of mismatch (telemetry ``input_mismatch``).
KINDS = ("scaled", "range")


def _reference_range(pre: Preprocessing, reference: Mapping[str, Any]) -> Optional[Tuple[float, float]]:
    """The training data's raw range, from the reference statistics (model units), or None."""
    try:
        stats = reference.get("input") or {}
        lo_m = min(float(v) for v in stats["min"])
        hi_m = max(float(v) for v in stats["max"])
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    ends = sorted(((lo_m - pre.offset) / pre.scale, (hi_m - pre.offset) / pre.scale))
    if not all(math.isfinite(e) for e in ends):
        return None
    return ends[0], ends[1]


def _fmt(v: float) -> str:
    return f"{v:.6g}"


class InputCheck:
    """One bundle's expectation of its raw inputs; call it with a raw input, get a mismatch kind or None."""

    def __init__(self, pre: Preprocessing, reference: Optional[Mapping[str, Any]] = None):
        self.expected = np.dtype(pre.raw_dtype)
        self.integer = self.expected.kind in "iu"
        self.range: Optional[Tuple[float, float]] = None  # values outside are kind "range"
        self.declared: Optional[Tuple[float, float]] = None  # the range the bundle says, for the message
        if self.integer:
            info = np.iinfo(self.expected)
            self.range = self.declared = (float(info.min), float(info.max))
        else:
            found = _reference_range(pre, reference or {})
            if found is not None:
                lo, hi = found
                span = (hi - lo if hi > lo else max(abs(lo), 1.0)) * (0.25 if pre.kind == "image" else 1.0)
                self.declared = found
                self.range = (lo - span, hi + span)

    def __call__(self, raw: np.ndarray) -> Optional[str]:
        dt = raw.dtype
        if self.integer and (dt is self.expected or dt == self.expected):
            return None  # the well-formed camera input: one comparison, no pass over the pixels
        if self.range is None or dt.kind not in "biuf" or raw.size == 0:
            return None
        lo, hi = float(raw.min()), float(raw.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return None  # preprocess refuses NaN and infinities with its own message
        if self.integer and dt.kind == "f" and lo >= 0.0 and 0.0 < hi <= 1.0 and self.range[1] > 1.0:
            return "scaled"
        if lo < self.range[0] or hi > self.range[1]:
            return "range"
        return None

    def message(self, kind: str, raw: np.ndarray, uri: Any, bundle: str) -> str:
        """The one warning line for the first input of ``kind``: what came, what the bundle expects, the fix."""
        got = f"{raw.dtype} in {_fmt(float(raw.min()))}..{_fmt(float(raw.max()))}"
        lo, hi = self.declared if self.declared is not None else (float("nan"), float("nan"))
        want = f"{self.expected} in {_fmt(lo)}..{_fmt(hi)}"
        if kind == "scaled":
            fix = (f"send the raw values ({want}, as the camera gives them) instead of values scaled to 0..1, "
                   "or re-create the bundle from data in 0..1")
        else:
            fix = (f"convert the source's values to {_fmt(lo)}..{_fmt(hi)}, or re-create the bundle from data "
                   "in the source's units")
        return (f"input {uri} is {got} but bundle {bundle} expects {want} (preprocessing.raw_dtype"
                f"{'' if self.integer else ' and reference statistics'}); {fix}. Such inputs are classified "
                f"but not flagged, counted in telemetry input_mismatch.{kind}; this warning is shown once")
