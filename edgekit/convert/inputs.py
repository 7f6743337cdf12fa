"""The model's input range: what raw pixels become before the model sees them, decided once.

A bundle's ``preprocessing`` turns raw units (image pixels 0..255) into the model's
input: ``model_input = raw * scale + offset`` (docs/bundle.md). This module picks
``scale`` and ``offset``:

1. from the options: ``--input-range 0..1|-1..1|0..255`` or ``--mean M --std S``
   (``(raw - M) / S``, in raw units); the model is taken as it is;
2. else from the model: when it normalizes its own input (a ``Rescaling`` or
   ``Normalization`` layer, or a ``preprocess_input`` Lambda, at its start, also
   inside a nested base), the data is fed as raw pixels. When those leading layers
   compute one affine map ``a * x + b`` with scalar ``a`` and ``b`` (probed on
   inputs, so any such Lambda counts), they are moved out of the model into
   ``scale``/``offset``: the same arithmetic, done by the board before int8
   quantization instead of by an op tfmot cannot quantize. Per-channel
   normalizations stay in the model (left float during QAT, named in the coverage);
3. else the data's own recipe (pixels scaled to 0..1).

:func:`range_preprocessing` is the option -> scale/offset arithmetic any command can
reuse (``edgekit import`` for a ``.tflite`` too); :func:`diagnose` names the likely
cause when a float model does not beat the majority baseline.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from device_agent.update.manifest import Preprocessing

from ..errors import ConversionError, DataError

__all__ = ["RANGES", "INPUT_RANGES", "parse_input_range", "raw_range", "with_input_range", "DIAGNOSE_MARGIN", "InputChoice", "range_preprocessing", "resolve", "leading_normalization", "diagnose", "describe"]

log = logging.getLogger(__name__)

#: ``--input-range`` values: the model input's (low, high) for raw pixels 0..255.
RANGES: Dict[str, Tuple[float, float]] = {"0..1": (0.0, 1.0), "-1..1": (-1.0, 1.0), "0..255": (0.0, 255.0)}
_NORMALIZING = ("Rescaling", "Normalization", "Lambda", "TFOpLambda")
#: A float model within this many points (fraction) of the majority baseline does not clearly beat it.
DIAGNOSE_MARGIN = 0.05


def _raw_max(pre: Preprocessing) -> float:
    """The top of the raw range: 255 for uint8 pixels, 1 for raw float data already in 0..1."""
    return 255.0 if pre.raw_dtype == "uint8" else 1.0


def range_preprocessing(pre: Preprocessing, input_range: Optional[str] = None, mean: Optional[float] = None,
                        std: Optional[float] = None) -> Preprocessing:
    """``pre`` with the ``scale``/``offset`` that map raw units to ``input_range``, or to ``(raw - mean) / std``."""
    if input_range is not None and (mean is not None or std is not None):
        raise ConversionError("--input-range and --mean/--std both set the input; pass one of them")
    if input_range is not None:
        if input_range not in RANGES:
            raise ConversionError(f"--input-range {input_range!r} is not one of {', '.join(RANGES)}")
        lo, hi = RANGES[input_range]
        return replace(pre, scale=float((hi - lo) / _raw_max(pre)), offset=float(lo))
    if mean is None and std is None:
        return pre
    mean = 0.0 if mean is None else float(mean)
    std = 1.0 if std is None else float(std)
    if not np.isfinite(mean) or not np.isfinite(std) or std <= 0:
        raise ConversionError(f"--mean {mean} --std {std}: std must be a finite number > 0")
    return replace(pre, scale=float(1.0 / std), offset=float(-mean / std))


def describe(pre: Preprocessing) -> str:
    """``0..255 -> -1..1`` style: the model input range the recipe gives raw pixels."""
    top = _raw_max(pre)
    lo, hi = pre.offset, top * pre.scale + pre.offset
    return f"0..{top:g} -> {_g(min(lo, hi))}..{_g(max(lo, hi))}"


def _g(v: float) -> str:
    return f"{v:.4g}"


@dataclass(frozen=True)
class InputChoice:
    """What was decided, for the manifest (``quantization.input``) and the report."""

    source: str  # "option", "model" or "data"
    detail: str
    preprocessing: Preprocessing
    normalizing_layers: Tuple[str, ...] = ()  # the model's own normalization at its input
    moved_layers: Tuple[str, ...] = ()  # of those, moved into scale/offset (removed from the model)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "source": self.source,
            "detail": self.detail,
            "range": describe(self.preprocessing),
            "scale": self.preprocessing.scale,
            "offset": self.preprocessing.offset,
            "normalizing_layers": list(self.normalizing_layers),
            "moved_layers": list(self.moved_layers),
        }


def _consumers(model: Any, tensor: Any) -> List[Any]:
    """(layer, node) of every node of ``model``'s graph that takes ``tensor``."""
    out = []
    for nodes in model._nodes_by_depth.values():  # noqa: SLF001 - the graph, as Functional runs it
        for node in nodes:
            if not node.is_input and any(t is tensor for t in node.keras_inputs):
                out.append((node.layer, node))
    return out


def leading_normalization(model: Any) -> List[Any]:
    """The chain of normalizing layers (Rescaling, Normalization, Lambda) right after the model's single input.

    ``model`` is flat (:func:`edgekit.convert.flatten.flatten_model`); each layer in the chain must be the only
    consumer of the tensor before it and keep its shape.
    """
    if len(getattr(model, "inputs", None) or []) != 1:
        return []
    chain: List[Any] = []
    tensor = model.inputs[0]
    while True:
        users = _consumers(model, tensor)
        if len(users) != 1:
            break
        layer, node = users[0]
        if type(layer).__name__ not in _NORMALIZING or len(node.keras_inputs) != 1:
            break
        out = node.outputs if not isinstance(node.outputs, (list, tuple)) else node.outputs[0]
        if tuple(out.shape[1:]) != tuple(tensor.shape[1:]):
            break
        chain.append(layer)
        tensor = out
    return chain


def _affine(model: Any, chain: Sequence[Any]) -> Optional[Tuple[float, float]]:
    """(a, b) when the chain computes ``a * x + b`` elementwise with scalars a, b (probed), else None."""
    from .._keras import keras

    end = _chain_end(model, chain)
    sub = keras.Model(model.inputs[0], end)
    shape = (1,) + tuple(int(d) for d in model.inputs[0].shape[1:])
    rng = np.random.default_rng(0)
    probe = np.stack([np.zeros(shape[1:]), np.ones(shape[1:]), rng.uniform(0, 255, shape[1:]),
                      rng.uniform(-1, 1, shape[1:])]).astype(np.float32)
    try:
        y = np.asarray(sub(probe, training=False), dtype=np.float64)
    except Exception:  # noqa: BLE001 - a Lambda that does not take a batch of floats: not an affine map
        return None
    b = y[0]
    a = y[1] - y[0]
    if not (np.allclose(a, a.flat[0], rtol=1e-5, atol=1e-7) and np.allclose(b, b.flat[0], rtol=1e-5, atol=1e-6)):
        return None
    a0, b0 = float(a.flat[0]), float(b.flat[0])
    if a0 == 0 or not np.allclose(y[2:], a0 * probe[2:].astype(np.float64) + b0, rtol=1e-4, atol=1e-4):
        return None
    return a0, b0


def _chain_end(model: Any, chain: Sequence[Any]) -> Any:
    tensor = model.inputs[0]
    for layer in chain:
        tensor = _consumers(model, tensor)[0][1].outputs
        tensor = tensor[0] if isinstance(tensor, (list, tuple)) else tensor
    return tensor


def _strip(model: Any, chain: Sequence[Any]) -> Any:
    """``model`` without the leading ``chain``: a new input feeds what the chain's last layer fed."""
    from .._keras import keras
    from .flatten import _Flattener

    end = _chain_end(model, chain)
    first = model.inputs[0]
    new_input = keras.Input(batch_shape=tuple(first.shape), dtype=first.dtype, name=first.name.split(":")[0])
    flat = _Flattener()
    flat.names.add(new_input.name.split(":")[0])
    outputs = flat.run(model, [new_input], "", False, {}, seed={id(end): new_input}, skip={id(x) for x in chain})
    stripped = keras.Model(new_input, outputs[0] if not isinstance(model.output, (list, tuple)) else outputs,
                           name=model.name)
    for layer in model.layers:
        if id(layer) in flat.copies and layer.weights:
            flat.copies[id(layer)].set_weights(layer.get_weights())
    return stripped


def resolve(model: Any, pre: Preprocessing, *, input_range: Optional[str] = None, mean: Optional[float] = None,
            std: Optional[float] = None, follow_model: bool = True) -> Tuple[Any, InputChoice]:
    """(the model to convert, the input choice). ``model`` is a flat graph model (or subclassed: left alone)."""
    if input_range is not None or mean is not None or std is not None:
        chosen = range_preprocessing(pre, input_range, mean, std)
        how = f"--input-range {input_range}" if input_range is not None else f"--mean {mean} --std {std}"
        return model, InputChoice("option", f"{how}: raw {describe(chosen)}", chosen)
    if not follow_model or pre.kind != "image" or not getattr(model, "_is_graph_network", False):
        return model, InputChoice("data", f"the data's recipe: raw {describe(pre)}", pre)
    chain = leading_normalization(model)
    if not chain:
        return model, InputChoice("data", f"the model does not normalize its input: raw {describe(pre)}", pre)
    names = tuple(x.name for x in chain)
    raw = range_preprocessing(pre, "0..255") if pre.raw_dtype == "uint8" else pre
    affine = _affine(model, chain)
    kinds = ", ".join(f"{x.name} ({type(x).__name__})" for x in chain)
    if affine is None:
        return model, InputChoice(
            "model", f"the model normalizes its input ({kinds}, not one scalar scale/offset: left in the model); "
                     f"fed raw {describe(raw)}", raw, names)
    a, b = affine
    moved = replace(raw, scale=float(raw.scale * a), offset=float(raw.offset * a + b))
    stripped = _strip(model, chain)
    return stripped, InputChoice(
        "model", f"the model normalizes its input ({kinds} = x * {a:.6g} + {b:.6g}); moved into the bundle's "
                 f"preprocessing: raw {describe(moved)}", moved, names, names)


def _alternatives(pre: Preprocessing) -> Dict[str, Preprocessing]:
    return {f"--input-range {r}": range_preprocessing(pre, r) for r in RANGES}


def diagnose(predict: Callable[[np.ndarray], np.ndarray], x_raw: np.ndarray, y: np.ndarray, pre: Preprocessing,
             labels: Sequence[str], baseline: float, accuracy: float) -> Optional[str]:
    """One line naming why a float model does not beat the majority baseline, and the option that fixes it.

    ``predict``: model-input batch -> scores (the float model). Tries each input range, then looks for a
    label permutation in the predictions; names what helps, or both causes when nothing does.
    """
    if accuracy >= baseline + DIAGNOSE_MARGIN:
        return None
    tried = []
    for option, alt in _alternatives(pre).items():
        if np.isclose(alt.scale, pre.scale) and np.isclose(alt.offset, pre.offset):
            continue
        xs = (np.asarray(x_raw, np.float32) * np.float32(alt.scale) + np.float32(alt.offset)).astype(np.float32)
        acc = float(np.mean(np.asarray(predict(xs)).argmax(axis=1) == y))
        tried.append((acc, option, alt))
    head = (f"the float model does not clearly beat the majority baseline ({100 * accuracy:.1f}% vs {100 * baseline:.1f}%) "
            f"with inputs {describe(pre)}")
    best = max(tried, key=lambda t: t[0]) if tried else None
    if best is not None and best[0] >= max(baseline, accuracy) + DIAGNOSE_MARGIN:
        return (f"{head}: input range: fed {describe(best[2])} it scores {100 * best[0]:.1f}%; "
                f"pass {best[1]} (or --mean/--std)")
    xs = (np.asarray(x_raw, np.float32) * np.float32(pre.scale) + np.float32(pre.offset)).astype(np.float32)
    pred = np.asarray(predict(xs)).argmax(axis=1)
    k = len(labels)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (y, pred), 1)
    perm = cm.argmax(axis=1)
    if len(set(perm.tolist())) == k and float(cm[np.arange(k), perm].sum()) / max(1, len(y)) >= baseline + DIAGNOSE_MARGIN \
            and not np.array_equal(perm, np.arange(k)):
        order = [""] * k
        for true, out in enumerate(perm):
            order[out] = labels[true]
        return f"{head}: labels order: the model's outputs match the classes in the order {','.join(order)}; " \
               f"pass --labels {','.join(order)}"
    return (f"{head}: likely causes: the input range (pass --input-range 0..1|-1..1|0..255 or --mean/--std as the "
            "model was trained) or the labels order (pass --labels in the model's output order)")


# -- stated ranges for models made elsewhere (edgekit import): any LO..HI, raw units known from the data --

#: The ranges ``--input-range`` names (the same as :data:`RANGES`).
INPUT_RANGES = RANGES

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
