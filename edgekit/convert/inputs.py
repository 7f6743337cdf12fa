"""The model's input range as the user states it: ``--input-range 0..1|-1..1|0..255`` or ``--mean/--std``,
turned into the bundle's ``preprocessing.scale`` and ``offset`` (docs/bundle.md)::

    model_input = raw * scale + offset

Raw pictures are 0..255 (``raw_dtype`` uint8); raw float pictures of an ``.npz`` are 0..1.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional, Tuple

from device_agent.update.manifest import Preprocessing

from ..errors import DataError

__all__ = ["INPUT_RANGES", "parse_input_range", "raw_range", "with_input_range"]

#: The ranges ``--input-range`` names.
INPUT_RANGES = {"0..1": (0.0, 1.0), "-1..1": (-1.0, 1.0), "0..255": (0.0, 255.0)}


def parse_input_range(text: str) -> Tuple[float, float]:
    """``"0..1"``, ``"-1..1"``, ``"0..255"`` (or any ``LO..HI``) as ``(lo, hi)``."""
    if text in INPUT_RANGES:
        return INPUT_RANGES[text]
    lo, sep, hi = str(text).partition("..")
    try:
        if not sep:
            raise ValueError(text)
        out = (float(lo), float(hi))
    except ValueError:
        raise DataError(f"--input-range {text!r} is not LO..HI; use one of {', '.join(INPUT_RANGES)}") from None
    if not out[0] < out[1]:
        raise DataError(f"--input-range {text!r} must go from low to high, like 0..1")
    return out


def raw_range(pre: Preprocessing) -> Optional[Tuple[float, float]]:
    """The range raw inputs come in: 0..255 for uint8 pictures, 0..1 for float pictures, None for arrays."""
    if pre.kind != "image":
        return None
    return (0.0, 255.0) if pre.raw_dtype == "uint8" else (0.0, 1.0)


def with_input_range(pre: Preprocessing, *, input_range: Optional[str] = None, mean: Optional[float] = None,
                     std: Optional[float] = None) -> Preprocessing:
    """``pre`` with the scale and offset that map raw inputs to the stated model input range.

    ``input_range``: raw 0..255 (or 0..1) onto LO..HI; ``mean``/``std``: ``(raw - mean) / std`` in raw units.
    """
    if input_range is not None and (mean is not None or std is not None):
        raise DataError("pass either --input-range or --mean/--std, not both")
    if (mean is None) != (std is None):
        raise DataError("--mean and --std go together: model_input = (raw - mean) / std")
    if mean is not None:
        if not std:
            raise DataError(f"--std {std} must not be 0")
        return replace(pre, scale=1.0 / float(std), offset=-float(mean) / float(std))
    if input_range is None:
        return pre
    lo, hi = parse_input_range(input_range)
    raw = raw_range(pre)
    if raw is None:
        raise DataError(f"--input-range needs pictures (their raw range is known); for {pre.kind} inputs pass "
                        "--mean/--std in the data's units")
    scale = (hi - lo) / (raw[1] - raw[0])
    return replace(pre, scale=scale, offset=lo - raw[0] * scale)
