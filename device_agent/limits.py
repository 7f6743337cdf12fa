"""Every limit the agent checks on what comes from outside, before it parses or allocates anything.

One place, so a reviewer can read them all (docs/agent.md, "Limits"):

================================  =======================  ================================================
what                              limit                    checked
================================  =======================  ================================================
MQTT packet (MQTT 5)              the largest limit below  the broker is told at CONNECT (Maximum Packet Size)
``cmd`` message                   64 KiB, JSON depth 32    in the MQTT thread, then before ``json.loads``
sensor message (``[source] mqtt``)  4 MiB (less for small    in the MQTT thread, then before it is decoded
                                  inputs), JSON depth 32
``bundle`` message                ``[update].max_bytes``   before it is decoded (base64, JSON)
                                  x 4/3 + 64 KiB, depth 32
bundle archive                    manifest, model,         while it streams, before a byte is written
                                  signature.json only
``manifest.json``                 1 MiB, JSON depth 32     before it is read
every shape                       2**22 elements, rank 8   before anything of that shape is allocated
``.npy`` input                    header against shape     before the data is read
image file                        2**24 pixels             from its header, before it is decoded
================================  =======================  ================================================

Each check raises the caller's error type (``ProtocolError``, ``BundleError``,
``InputError``) with one line that names the limit.
"""

from __future__ import annotations

import json
import math
from typing import Any, Optional, Sequence, Tuple, Type

import numpy as np

from .errors import AgentError

__all__ = [
    "MAX_JSON_DEPTH",
    "MAX_CMD_BYTES",
    "MAX_SENSOR_BYTES",
    "MAX_MANIFEST_BYTES",
    "MAX_SIGNATURE_BYTES",
    "MAX_ELEMENTS",
    "MAX_RANK",
    "MAX_IMAGE_PIXELS",
    "MAX_INPUT_FILE_BYTES",
    "json_depth",
    "check_json",
    "loads",
    "check_shape",
    "check_number",
    "sensor_max_bytes",
]

MAX_JSON_DEPTH = 32
MAX_CMD_BYTES = 64 * 1024
MAX_SENSOR_BYTES = 4 * 1024 * 1024
MAX_MANIFEST_BYTES = 1024 * 1024
MAX_SIGNATURE_BYTES = 64 * 1024
MAX_ELEMENTS = 1 << 22  # 4,194,304: a 2048 x 2048 picture; the product of any shape
MAX_RANK = 8
MAX_IMAGE_PIXELS = 1 << 24  # 4096 x 4096 before resizing
MAX_INPUT_FILE_BYTES = 64 * 1024 * 1024

_OPEN = (91, 123)  # [ {
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth(data: bytes) -> int:
    """How deep ``[`` and ``{`` nest in ``data`` (brackets inside strings do not count), without parsing it.

    Linear in ``len(data)``, whatever its strings hold (tens of ms for the 4 MiB a sensor topic takes):
    ``bytes.count`` answers most payloads at once. Else the escapes that matter go first, in two C passes:
    every escaped backslash, then every escaped quote becomes two spaces (pairs from the left of each run of
    backslashes, as a JSON parser reads them); the quotes left open or close strings, a running count of them
    blanks the bytes inside (odd), and the brackets left go through a cumulative sum. A string with no
    closing quote runs to the end of the data (json.loads refuses it as unterminated, and never sees a bracket
    in it either). Exact on JSON and on cut-off JSON, where a backslash is only ever in a string; on other
    bytes json.loads stops at the first one that is not JSON, and what comes before it is counted exactly.
    """
    if data.count(b"[") + data.count(b"{") == 0:  # (check_json asks only when there are more than max_depth)
        return 0
    if b'"' in data:
        if b"\\" in data:
            data = data.replace(b"\\\\", b"  ").replace(b'\\"', b"  ")
        a = np.frombuffer(data, dtype=np.uint8).copy()
        a[(np.cumsum(a == 34, dtype=np.uint8) & 1).view(bool)] = 32  # inside strings (uint8 wraps: parity counts)
        data = a.tobytes()
    codes = data.translate(None, _NOT_BRACKETS)
    # A closer with nothing open counts as nothing (depth never goes below 0), so it cannot hide what follows.
    if len(codes) <= 256:
        depth = top = 0
        for b in codes:
            depth = depth + 1 if b in _OPEN else max(0, depth - 1)
            top = max(top, depth)
        return top
    codes = np.frombuffer(codes, dtype=np.uint8)
    walk = np.cumsum(np.where((codes == 91) | (codes == 123), 1, -1).astype(np.int64))
    floor = np.minimum.accumulate(np.minimum(walk, 0))  # the same walk, reflected at 0
    return int((walk - floor).max())


def check_json(data: bytes, *, what: str, max_bytes: int, max_depth: int = MAX_JSON_DEPTH,
               error: Type[AgentError] = AgentError) -> None:
    """Refuse ``data`` over ``max_bytes`` or nested deeper than ``max_depth`` (before ``json.loads`` sees it)."""
    if len(data) > max_bytes:
        raise error(f"{what} is {len(data)} bytes, over the limit of {max_bytes}")
    if data.count(b"[") + data.count(b"{") <= max_depth:  # cannot nest deeper than it opens
        return
    depth = json_depth(data)
    if depth > max_depth:
        raise error(f"{what} nests JSON {depth} levels deep, over the limit of {max_depth}")


def loads(data: bytes, *, what: str, max_bytes: int, max_depth: int = MAX_JSON_DEPTH,
          error: Type[AgentError] = AgentError) -> Any:
    """``json.loads`` after :func:`check_json`; any failure is ``error`` with one line."""
    check_json(data, what=what, max_bytes=max_bytes, max_depth=max_depth, error=error)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError, MemoryError) as exc:
        raise error(f"{what} is not UTF-8 JSON ({exc.__class__.__name__}); see docs/protocol.md") from exc


def check_shape(shape: Any, *, what: str, error: Type[AgentError] = AgentError, allow_batch: bool = False,
                max_elements: int = MAX_ELEMENTS) -> Tuple[int, ...]:
    """``shape`` as a tuple of ints: rank <= MAX_RANK, every dimension >= 1 (the first may be <= 0 with
    ``allow_batch``: a dynamic batch), and the product of the positive ones <= ``max_elements``."""
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
        raise error(f"{what}={shape!r} must be a list of integers")
    if len(shape) > MAX_RANK:
        raise error(f"{what} has rank {len(shape)}, over the limit of {MAX_RANK}")
    dims = []
    for i, d in enumerate(shape):
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)):
            raise error(f"{what}={list(shape)!r} must be a list of integers")
        if d <= 0 and not (allow_batch and i == 0):
            raise error(f"{what}={list(shape)} has a non-positive dimension")
        dims.append(int(d))
    n = math.prod(d for d in dims if d > 0)  # exact (Python ints): no overflow on 20000 x 20000 x ...
    if n > max_elements:
        raise error(f"{what}={dims} has {n} elements, over the limit of {max_elements}")
    return tuple(dims)


def check_number(value: Any, *, what: str, lo: Optional[float] = None, hi: Optional[float] = None,
                 lo_open: bool = False, nonzero: bool = False, error: Type[AgentError] = AgentError) -> float:
    """``value`` as a finite float within ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``); NaN and inf refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise error(f"{what}={value!r} must be a number")
    v = float(value)
    if not math.isfinite(v):
        raise error(f"{what}={v} must be a finite number")
    if lo is not None and hi is not None and not lo_open and not lo <= v <= hi:
        raise error(f"{what}={v:g} must be within [{lo:g}, {hi:g}]")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise error(f"{what}={v:g} must be {'>' if lo_open else '>='} {lo:g}")
    if hi is not None and v > hi:
        raise error(f"{what}={v:g} must be <= {hi:g}")
    if nonzero and v == 0:
        raise error(f"{what}=0 must not be zero")
    return v


def sensor_max_bytes(shape: Sequence[int], dtype: str) -> int:
    """The largest sensor message worth decoding for an input of ``shape``: the raw bytes, an ``.npy`` of
    them, or JSON at up to 32 characters a value; at least 64 KiB, at most MAX_SENSOR_BYTES."""
    if not shape:
        return MAX_SENSOR_BYTES
    n = math.prod(int(d) for d in shape)
    return int(min(MAX_SENSOR_BYTES, max(64 * 1024, n * max(32, np.dtype(dtype).itemsize) + 4096)))
