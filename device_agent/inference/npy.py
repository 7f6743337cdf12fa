"""``.npy`` inputs read without trusting their header: shape and dtype are checked before the data is read.

``np.load`` allocates whatever the header declares (``(100000, 100000)`` in a 100-byte file is a
MemoryError, or the kernel's OOM killer). Here the header is parsed with numpy's own reader
(``numpy.lib.format.read_magic`` and ``read_array_header_1_0`` / ``_2_0``, with a bounded header
size), then checked: a plain numeric dtype, no more than ``MAX_ELEMENTS`` elements (and exactly
``expected`` when the caller knows the model's input size), and exactly that many bytes of data
after the header. Only then are the bytes turned into an array (``np.frombuffer``, no copy).
"""

from __future__ import annotations

import inspect
import io
import math
import os
from typing import Optional, Union

import numpy as np
from numpy.lib import format as npy_format

from ..errors import InputError
from ..limits import MAX_ELEMENTS, MAX_INPUT_FILE_BYTES, MAX_RANK

__all__ = ["MAGIC", "read_npy"]

MAGIC = b"\x93NUMPY"
# numpy's own default since 1.23.5 (literal_eval is not safe on big headers); older numpy reads any size.
_LIMIT = ({"max_header_size": 10000}
          if "max_header_size" in inspect.signature(npy_format.read_array_header_1_0).parameters else {})


def _header(fp, what: str):
    try:
        version = npy_format.read_magic(fp)
        if version in ((1, 0), (2, 0)):
            reader = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
            return reader(fp, **_LIMIT)
    except Exception as exc:  # noqa: BLE001 - a hostile header may raise anything literal_eval raises
        raise InputError(f"{what} has a malformed .npy header ({exc.__class__.__name__}); send a whole array "
                         "written by np.save") from exc
    raise InputError(f"{what} is .npy format version {version[0]}.{version[1]}; send version 1.0 or 2.0 (np.save)")


def read_npy(source: Union[bytes, os.PathLike, str], *, what: str, expected_size: Optional[int] = None,
             max_elements: int = MAX_ELEMENTS) -> np.ndarray:
    """One ``.npy`` (bytes, or a file path) as an array, after its header passed the checks above."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        try:
            size = os.path.getsize(source)
            if size > MAX_INPUT_FILE_BYTES:
                raise InputError(f"{what} is {size} bytes, over the limit of {MAX_INPUT_FILE_BYTES}")
            with open(source, "rb") as fh:
                data = fh.read(MAX_INPUT_FILE_BYTES + 1)
        except OSError as exc:
            raise InputError(f"{what} cannot be read ({exc}); replace or remove the file") from exc
    fp = io.BytesIO(data)
    shape, fortran, dtype = _header(fp, what)
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None or dtype.kind not in "biuf":
        raise InputError(f"{what} has dtype {dtype}; send numbers (uint8, int8, ..., float32, float64)")
    if len(shape) > MAX_RANK:
        raise InputError(f"{what} has rank {len(shape)}, over the limit of {MAX_RANK}")
    n = math.prod(shape)
    if n > max_elements:
        raise InputError(f"{what} declares shape {list(shape)} ({n} elements), over the limit of {max_elements}")
    if expected_size is not None and n != expected_size:
        raise InputError(f"{what} declares shape {list(shape)} ({n} values), expected={expected_size} "
                         "values for this model")
    start = fp.tell()
    if len(data) - start != n * dtype.itemsize:
        raise InputError(f"{what} holds {len(data) - start} data bytes, expected={n * dtype.itemsize} for "
                         f"shape {list(shape)} {dtype}; send a whole array")
    arr = np.frombuffer(data, dtype=dtype, count=n, offset=start)
    return arr.reshape(shape, order="F" if fortran else "C")
