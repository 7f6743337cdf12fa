"""The one module that touches a TFLite interpreter and its tensors.

It loads a ``.tflite`` with whichever runtime is installed, quantizes float
inputs and dequantizes outputs from the tensor details, so nothing else in
device_agent (or edgekit's evaluation, which uses this very code) has to know
about scales and zero points.

Runtimes, in the order ``runtime="auto"`` tries them when no benchmark has
picked one:

* ``ai_edge_litert`` (LiteRT, maintained, numpy 2),
* ``tflite_runtime`` (2.14, the last release: numpy < 2, Python <= 3.11, the
  only one with armv7l wheels),
* ``tensorflow`` (``tf.lite``), a workstation-only last resort. It is imported
  lazily and only when nothing else is installed or it is asked for by name.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import InputError, RuntimeMissing
from ..update.manifest import TensorSpec

__all__ = [
    "RUNTIMES",
    "available_runtimes",
    "TFLiteModel",
    "quantize",
    "dequantize",
]

log = logging.getLogger(__name__)

RUNTIMES: Tuple[str, ...] = ("ai_edge_litert", "tflite_runtime", "tensorflow")
_MODULES = {
    "ai_edge_litert": "ai_edge_litert.interpreter",
    "tflite_runtime": "tflite_runtime.interpreter",
    "tensorflow": "tensorflow",
}


def available_runtimes(include_tensorflow: bool = False) -> List[str]:
    """Runtimes whose package is installed (without importing them).

    ``tensorflow`` is listed only when ``include_tensorflow`` is set: on a
    board it is never the right choice, on a workstation it is the reference.
    """
    found = []
    for name in RUNTIMES:
        if name == "tensorflow" and not include_tensorflow:
            continue
        top = _MODULES[name].split(".")[0]
        if importlib.util.find_spec(top) is not None:
            found.append(name)
    return found


def _interpreter_class(runtime: str):
    if runtime not in _MODULES:
        raise RuntimeMissing(f"runtime={runtime!r} is unknown; expected one of {RUNTIMES} or 'auto'")
    try:
        module = importlib.import_module(_MODULES[runtime])
    except ImportError as exc:
        hint = {
            "ai_edge_litert": "pip install ai-edge-litert",
            "tflite_runtime": "pip install 'tflite-runtime==2.14.0' 'numpy<2' (Python <= 3.11)",
            "tensorflow": "pip install tensorflow",
        }[runtime]
        raise RuntimeMissing(f"runtime {runtime} is not installed ({exc}); {hint}") from exc
    if runtime == "tensorflow":
        return module.lite.Interpreter
    return module.Interpreter


def quantize(x: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Float values to the tensor's dtype: ``round(x / scale) + zero_point``, clipped."""
    dtype = np.dtype(spec.dtype)
    if not spec.quantized:
        return np.asarray(x, dtype=dtype)
    info = np.iinfo(dtype)
    q = np.round(np.asarray(x, dtype=np.float32) / spec.scale) + spec.zero_point
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize(q: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """The tensor's values as float32: ``scale * (q - zero_point)``.

    Computed in float32: ``q - zero_point`` is a small integer (exact), and TFLite stores
    ``scale`` as a float32, so the one rounding is the same as in float64 then float32.
    """
    if not spec.quantized:
        return np.asarray(q, dtype=np.float32)
    out = q.astype(np.float32)
    out -= np.float32(spec.zero_point)
    out *= np.float32(spec.scale)
    return out


def _spec(detail: dict) -> TensorSpec:
    scale, zero_point = detail.get("quantization", (0.0, 0))
    return TensorSpec(
        name=str(detail.get("name", "")),
        shape=tuple(int(d) for d in detail["shape"]),
        dtype=np.dtype(detail["dtype"]).name,
        scale=float(scale),
        zero_point=int(zero_point),
    )


@dataclass
class TFLiteModel:
    """A loaded model: float in, float scores out, on one runtime.

    Use :meth:`open`; call :meth:`close` (or use ``with``) when done.
    """

    interpreter: Any
    runtime: str
    num_threads: int
    model_path: str
    input_spec: TensorSpec
    output_spec: TensorSpec
    _in_index: int = 0
    _out_index: int = 0

    @classmethod
    def open(
        cls,
        model_path: os.PathLike | str,
        runtime: str = "auto",
        num_threads: int = 1,
        reference_kernels: bool = False,
    ) -> "TFLiteModel":
        """Load ``model_path`` with ``runtime`` (``auto`` takes the first installed).

        ``reference_kernels`` (tensorflow only) uses TFLite's reference
        kernels, the slow but plain implementation to check others against.
        """
        model_path = str(model_path)
        candidates: Sequence[str]
        if runtime == "auto":
            candidates = available_runtimes() or available_runtimes(include_tensorflow=True)
            if not candidates:
                raise RuntimeMissing(
                    "no TFLite interpreter is installed; pip install ai-edge-litert "
                    "(or 'tflite-runtime==2.14.0' 'numpy<2' on 32-bit boards)"
                )
        else:
            candidates = [runtime]
        last: Optional[Exception] = None
        for name in candidates:
            try:
                klass = _interpreter_class(name)
                kwargs: dict = {"model_path": model_path, "num_threads": int(num_threads)}
                if reference_kernels:
                    if name != "tensorflow":
                        raise RuntimeMissing("reference_kernels needs runtime='tensorflow'")
                    tf = importlib.import_module("tensorflow")  # workstation only, asked for by name
                    kwargs["experimental_op_resolver_type"] = tf.lite.experimental.OpResolverType.BUILTIN_REF
                interp = klass(**kwargs)
                interp.allocate_tensors()
            except SystemError as exc:
                # tflite-runtime 2.14 was built against numpy 1.x.
                last = RuntimeMissing(
                    f"runtime {name} failed to start ({exc}); tflite-runtime 2.14 needs numpy<2: "
                    "pip install 'numpy<2', or use ai-edge-litert"
                )
                log.warning("%s", last)
                continue
            except (ValueError, RuntimeError) as exc:
                raise InputError(f"{model_path} is not a valid TFLite model ({exc}); re-create the bundle") from exc
            except RuntimeMissing as exc:
                last = exc
                continue
            ins, outs = interp.get_input_details(), interp.get_output_details()
            if len(ins) != 1 or len(outs) != 1:
                raise InputError(
                    f"{model_path} has {len(ins)} inputs and {len(outs)} outputs; edgekit runs classifiers "
                    "with exactly one of each"
                )
            return cls(
                interpreter=interp,
                runtime=name,
                num_threads=int(num_threads),
                model_path=model_path,
                input_spec=_spec(ins[0]),
                output_spec=_spec(outs[0]),
                _in_index=ins[0]["index"],
                _out_index=outs[0]["index"],
            )
        assert last is not None
        raise last

    # -- one inference ------------------------------------------------------
    def set_input(self, x: np.ndarray) -> None:
        """Quantize one float input (without the batch axis, or with batch 1) and set it."""
        expected = self.input_spec.shape
        x = np.asarray(x)
        if x.shape != expected:
            if x.size != int(np.prod(expected)):
                raise InputError(
                    f"input shape={list(x.shape)}, expected={list(expected)}; check the bundle's preprocessing"
                )
            x = x.reshape(expected)
        self.interpreter.set_tensor(self._in_index, quantize(x, self.input_spec))

    def set_raw_input(self, q: np.ndarray) -> None:
        """Set an input already in the tensor's dtype (no quantization)."""
        self.interpreter.set_tensor(self._in_index, q.reshape(self.input_spec.shape))

    def invoke(self) -> None:
        self.interpreter.invoke()

    def calls(self) -> Tuple[Callable[[np.ndarray], None], Callable[[], None], Callable[[], np.ndarray]]:
        """``(set_input, invoke, output)``: the interpreter's own methods bound to this model's tensors, for a
        loop that calls them on every inference (set_input takes an array of the tensor's exact shape and dtype;
        output returns :meth:`raw_output`)."""
        it = self.interpreter
        return functools.partial(it.set_tensor, self._in_index), it.invoke, functools.partial(it.get_tensor,
                                                                                               self._out_index)

    def raw_output(self) -> np.ndarray:
        return self.interpreter.get_tensor(self._out_index)

    def output(self) -> np.ndarray:
        """The dequantized output of the last invoke, without the batch axis."""
        return dequantize(self.raw_output(), self.output_spec).reshape(-1)

    def score_table(self) -> Optional[List[float]]:
        """For an 8-bit quantized output: raw byte -> the score :meth:`output` gives for it, as Python floats
        (``inference.classify.classify_table`` reads :meth:`raw_output` through it); None for other outputs."""
        spec = self.output_spec
        if not spec.quantized or np.dtype(spec.dtype).itemsize != 1:
            return None
        codes = np.arange(256, dtype=np.uint8).view(np.dtype(spec.dtype))
        return dequantize(codes, spec).astype(np.float64).tolist()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """One float input to one vector of float scores."""
        self.set_input(x)
        self.invoke()
        return self.output()

    # -- many ---------------------------------------------------------------
    def predict(self, xs: np.ndarray) -> np.ndarray:
        """Float scores for every row of ``xs`` (one invoke per row)."""
        return np.stack([self(x) for x in xs]) if len(xs) else np.zeros((0, self.output_spec.shape[-1]), np.float32)

    def time_invoke(self, x: np.ndarray, runs: int = 50, warmup: int = 5) -> np.ndarray:
        """Seconds per ``invoke()`` for ``runs`` repeats on one input (after ``warmup``)."""
        self.set_input(x)
        for _ in range(warmup):
            self.invoke()
        out = np.empty(runs, dtype=np.float64)
        for i in range(runs):
            t0 = time.perf_counter()
            self.invoke()
            out[i] = time.perf_counter() - t0
        return out

    def close(self) -> None:
        self.interpreter = None

    def __enter__(self) -> "TFLiteModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
