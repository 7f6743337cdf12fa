"""Magnitude pruning before int8 conversion, and what it buys on a board.

``convert(model, data, mode=..., output=..., prune=PruneSpec(0.5))``:

1. wraps every top-level layer tfmot can prune (Conv, Dense, ...) in
   ``prune_low_magnitude`` and fine-tunes ``epochs`` on the training split with the
   ``UpdatePruningStep`` callback, the sparsity growing along a ``PolynomialDecay``
   (0 to the target over the first 60% of the steps, then held) or held at the
   target from the first step (``ConstantSparsity``); with a structure ``(m, n)``
   tfmot zeroes the ``m`` smallest of every ``n`` consecutive input-channel weights
   of each Conv2D / Dense layer instead (the pattern lives in the last dimension of
   the TFLite weight tensor);
2. strips the wrappers (``strip_pruning``); the pipeline then runs QAT with tfmot's
   sparsity-preserving scheme (``Default8BitPrunePreserveQuantizeScheme``, so fine-tuning
   cannot refill the zeros) or PTQ (a zero weight quantizes to zero);
3. after conversion, :func:`tflite_weights` reads every weight tensor of the int8
   ``.tflite`` (TensorFlow's flatbuffer reader) and the report states the sparsity
   each layer reached *in the model the board runs*, the 2:4-style pattern when one
   was asked for, the size of ``model.tflite`` raw and gzip-compressed, the bytes of
   the bundle archive a board downloads (``pack_bundle``), and latency against the
   unpruned model.

What pruning buys on a board, plainly: the int8 ``.tflite`` stores every weight,
zero or not, so it is no smaller on disk; compressed (the archive ``fleet push``
sends is gzip) the zeros cost almost nothing. The int8 kernels multiply zeros
like any other weight, so latency does not improve; XNNPACK has sparse kernels
only for float models of one shape (see docs/shrink.md).

Nested models (a Keras model used as a layer, a pretrained base) are
flattened first (:mod:`edgekit.convert.flatten`), so their layers are pruned
like any other; a subclassed model inside cannot be flattened, nor cloned by
tfmot: one ConversionError line says so.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..data import Dataset
from ..errors import ConversionError

__all__ = ["SCHEDULES", "PruneSpec", "LayerSparsity", "WeightTensor", "Pruned", "parse_structure", "prune_model"]

log = logging.getLogger(__name__)

SCHEDULES = ("polynomial", "constant")
#: Ops whose second input is a weight tensor pruning can empty.
_WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV", "CONV_3D")
#: Layers tfmot prunes with an m-by-n structure (its documented scope).
_M_BY_N_KINDS = ("Conv2D", "Dense")
_POLY_FRACTION = 0.6


def parse_structure(text: Optional[str]) -> Optional[Tuple[int, int]]:
    """``"2x4"`` (also ``2:4``, ``2by4``) -> ``(2, 4)``: m zeros in every n consecutive weights."""
    if text is None or str(text).strip() == "":
        return None
    match = re.fullmatch(r"\s*(\d+)\s*(?:x|:|by|_by_)\s*(\d+)\s*", str(text), re.IGNORECASE)
    if not match:
        raise ConversionError(f"prune structure {text!r} is not MxN (M zeros in every N weights); pass for example 2x4")
    m, n = int(match.group(1)), int(match.group(2))
    if not 0 < m < n:
        raise ConversionError(f"prune structure {text!r} needs 0 < M < N (M zeros in every N weights); pass for example 2x4")
    return m, n


@dataclass(frozen=True)
class PruneSpec:
    """What to prune and how: a target ``sparsity`` in (0, 1), or a structure ``(m, n)`` (sparsity m/n)."""

    sparsity: Optional[float] = None
    structure: Optional[Tuple[int, int]] = None
    schedule: str = "polynomial"
    epochs: int = 4
    learning_rate: float = 5e-4
    batch_size: int = 32

    def __post_init__(self) -> None:
        structure = self.structure
        if isinstance(structure, str):
            structure = parse_structure(structure)
            object.__setattr__(self, "structure", structure)
        if structure is not None:
            m, n = (int(v) for v in structure)
            if not 0 < m < n:
                raise ConversionError(f"prune structure {m}x{n} needs 0 < M < N (M zeros in every N weights); pass for example 2x4")
            object.__setattr__(self, "structure", (m, n))
        if self.sparsity is None:
            if structure is None:
                raise ConversionError("pruning needs a target sparsity (--prune 0.5) or a structure (--prune-structure 2x4)")
            object.__setattr__(self, "sparsity", structure[0] / structure[1])
        try:
            sparsity = float(self.sparsity)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ConversionError(f"sparsity={self.sparsity!r} is not a number; pass a fraction within (0, 1), e.g. 0.5") from None
        if not (math.isfinite(sparsity) and 0.0 < sparsity < 1.0):
            raise ConversionError(f"sparsity={self.sparsity} must be within (0, 1): the fraction of weights set to zero, e.g. 0.5")
        object.__setattr__(self, "sparsity", sparsity)
        if structure is not None and abs(sparsity - structure[0] / structure[1]) > 1e-6:
            m, n = structure
            raise ConversionError(
                f"sparsity={sparsity} does not match structure {m}x{n}, which zeroes exactly {m} of every {n} weights "
                f"({m / n:g}); pass --prune {m / n:g} or leave --prune out"
            )
        if self.schedule not in SCHEDULES:
            raise ConversionError(f"prune schedule {self.schedule!r} is not supported; use {' or '.join(SCHEDULES)}")
        if int(self.epochs) < 1:
            raise ConversionError(f"prune epochs={self.epochs} must be >= 1: pruning happens while fine-tuning")
        if not self.learning_rate > 0:
            raise ConversionError(f"prune learning_rate={self.learning_rate} must be > 0")
        if int(self.batch_size) < 1:
            raise ConversionError(f"prune batch_size={self.batch_size} must be >= 1")

    @property
    def structure_name(self) -> Optional[str]:
        return None if self.structure is None else f"{self.structure[0]}x{self.structure[1]}"

    def describe(self, steps: Optional[int] = None) -> str:
        if self.structure is not None:
            m, n = self.structure
            how = (f"structured {m}x{n}: the {m} smallest of every {n} consecutive input-channel weights of each "
                   "Conv2D / Dense layer set to zero at the first step")
        elif self.schedule == "polynomial":
            how = f"unstructured, polynomial decay from 0 to {100 * self.sparsity:g}% over the first {int(100 * _POLY_FRACTION)}% of the steps, then held"
        else:
            how = f"unstructured, {100 * self.sparsity:g}% from the first step (constant sparsity)"
        return f"Target {100 * self.sparsity:g}% of the weights zero ({how}), fine-tuned {self.epochs} epoch(s)" + (
            f" ({steps} steps)" if steps else ""
        )

    def to_dict(self) -> Dict[str, Any]:
        return {
            "target_sparsity": round(float(self.sparsity), 6),
            "structure": self.structure_name,
            "schedule": "m_by_n" if self.structure is not None else self.schedule,
            "epochs": int(self.epochs),
            "learning_rate": float(self.learning_rate),
        }


@dataclass(frozen=True)
class LayerSparsity:
    """One layer's pruned weights: how many, and the fraction that is zero before and after conversion."""

    layer: str
    kind: str
    weights: int
    keras: Optional[float]  # zeros / weights in the pruned float Keras model (None: not pruned)
    int8: Optional[float] = None  # the same in the int8 model's weight tensor (None: not found or not measured)
    pattern: Optional[bool] = None  # the m-by-n pattern holds in the int8 weights (None: no structure asked)
    note: str = ""  # why a layer with weights was left dense


@dataclass(frozen=True)
class WeightTensor:
    """The weight tensor of one op in a ``.tflite`` (TFLite layout: output channels first, input channels last)."""

    op_index: int
    op: str
    name: str
    shape: Tuple[int, ...]
    dtype: str
    zeros: float
    values: np.ndarray

    @property
    def size(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 0


@dataclass(frozen=True)
class Pruned:
    """The pruned, stripped float model and what was done to get it."""

    model: Any
    spec: PruneSpec
    layers: Tuple[LayerSparsity, ...]
    unpruned_accuracy: float  # float Keras model, before pruning, test split
    pruned_accuracy: float  # float Keras model, after pruning, test split
    reference_int8: Optional[bytes]  # the unpruned model, PTQ int8: the size and latency reference
    steps: int
    seconds: float

    @property
    def pruned_layers(self) -> Tuple[LayerSparsity, ...]:
        return tuple(x for x in self.layers if x.keras is not None)

    def qat_scheme(self) -> Any:
        """tfmot's quantization scheme that keeps zero weights zero during QAT."""
        from .._keras import tfmot

        return tfmot().experimental.combine.Default8BitPrunePreserveQuantizeScheme()


def _overall(layers: Sequence[LayerSparsity], which: str) -> Optional[float]:
    rows = [(getattr(x, which), x.weights) for x in layers if getattr(x, which) is not None]
    total = sum(w for _, w in rows)
    return None if not total else sum(v * w for v, w in rows) / total


def _by_note(rows: Sequence[LayerSparsity]) -> Dict[str, List[str]]:
    """Layer names grouped by the reason they were left dense (one line per reason in logs and reports)."""
    out: Dict[str, List[str]] = {}
    for r in rows:
        if r.note:
            out.setdefault(r.note, []).append(r.layer)
    return out


# --- which layers -------------------------------------------------------------------------------------------------


def _kernel_size(layer: Any) -> int:
    """Weights in a layer's kernels (what pruning would empty); biases and norms are not counted."""
    return int(sum(int(np.prod(w.shape)) for w in layer.weights if re.search(r"(kernel|embeddings)[^/]*$", w.name.split(":")[0])))


def _tfmot_prunable(layer: Any) -> bool:
    from tensorflow_model_optimization.python.core.sparsity.keras import prune_registry

    registry = prune_registry.PruneRegistry
    if hasattr(layer, "get_prunable_weights"):
        return True
    if not registry.supports(layer):
        return False
    try:
        return bool(registry._weight_names(layer))  # noqa: SLF001 - tfmot 0.8.1 (pinned): which weights it prunes
    except KeyError:  # an RNN layer: its cells say
        return True


def _plan(model: Any, spec: PruneSpec) -> Tuple[List[str], List[LayerSparsity]]:
    """(names of the layers to prune, the layers with weights that stay dense, each with its reason)."""
    from .._keras import keras, tfmot

    tfmot()
    prune, dense = [], []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        size = _kernel_size(layer)
        kind = type(layer).__name__
        if isinstance(layer, keras.Model):
            if size or layer.count_params():
                dense.append(LayerSparsity(layer.name, kind, size or int(layer.count_params()), None,
                                           note="nested model that cannot be flattened (subclassed): its layers are not pruned"))
            continue
        if not size:
            continue
        if not _tfmot_prunable(layer):
            note = f"tfmot does not prune {kind} weights"
        elif spec.structure is not None and kind not in _M_BY_N_KINDS:
            note = f"a {spec.structure_name} structure applies to Conv2D and Dense only"
        elif spec.structure is not None and int(layer.weights[0].shape[-2 if kind == "Conv2D" else 0]) < spec.structure[1]:
            channels = int(layer.weights[0].shape[-2 if kind == "Conv2D" else 0])
            note = f"{channels} input channel(s) < {spec.structure[1]}: no {spec.structure_name} pattern fits"
        else:
            prune.append(layer.name)
            continue
        dense.append(LayerSparsity(layer.name, kind, size, None, note=f"left dense: {note}"))
    return prune, dense


def _schedule(spec: PruneSpec, steps: int, steps_per_epoch: int) -> Any:
    from .._keras import tfmot

    sparsity = tfmot().sparsity.keras
    frequency = max(1, steps_per_epoch // 4)
    if spec.schedule == "constant" or spec.structure is not None:
        return sparsity.ConstantSparsity(float(spec.sparsity), begin_step=0, frequency=frequency)
    # the last mask update must land on end_step, where the polynomial reaches the target
    end = max(frequency, int(steps * _POLY_FRACTION) // frequency * frequency)
    return sparsity.PolynomialDecay(0.0, float(spec.sparsity), begin_step=0, end_step=end, frequency=frequency)


def _accuracy(model: Any, data: Dataset) -> float:
    pred = np.asarray(model.predict(data.model_inputs(data.x_test), batch_size=256, verbose=0)).argmax(axis=1)
    return float(np.mean(pred == data.y_test))


def prune_model(
    model: Any,
    data: Dataset,
    spec: PruneSpec,
    *,
    from_logits: bool,
    calibration: Optional[np.ndarray] = None,
    progress: bool = True,
    seed: int = 0,
) -> Pruned:
    """Prune ``model``'s top-level layers while fine-tuning on ``data``; returns the stripped model and the facts."""
    from .._keras import keras, tfmot
    from tf_keras.src.saving.serialization_lib import SafeModeScope

    from ..models import seed_everything
    from . import quantize as q

    mot = tfmot()
    from tensorflow_model_optimization.python.core.sparsity.keras.pruning_wrapper import PruneLowMagnitude

    started = time.perf_counter()
    if not (isinstance(model, keras.Sequential) or getattr(model, "_is_graph_network", False)):
        raise ConversionError(
            f"pruning needs a Sequential or functional model; {type(model).__name__} is a subclassed model "
            "(rebuild it with the functional API, or convert without --prune)"
        )
    from ..errors import ModelError
    from .flatten import flatten_model

    try:
        model = flatten_model(model)  # tfmot prunes top-level layers only: a nested base is pruned once flattened
    except ModelError as exc:  # a subclassed model inside: tfmot cannot clone (nor strip) the model around it
        raise ConversionError(f"{exc}; or convert without --prune") from exc
    names, dense = _plan(model, spec)
    if not names:
        why = "; ".join(f"{x.layer}: {x.note}" for x in dense) or "it has no Conv or Dense weights"
        raise ConversionError(f"no layer of model {model.name} can be pruned ({why}); convert without --prune")
    for note, layers in _by_note(dense).items():
        log.warning("%s: %s", note, ", ".join(layers))
    steps_per_epoch = max(1, math.ceil(len(data.x_train) / int(spec.batch_size)))
    steps = steps_per_epoch * int(spec.epochs)
    schedule = _schedule(spec, steps, steps_per_epoch)
    unpruned_accuracy = _accuracy(model, data)
    reference: Optional[bytes] = None
    if calibration is not None:
        try:
            reference = q.to_tflite_int8(model, calibration)
        except ConversionError as exc:
            log.warning("unpruned reference model did not convert (%s); the report shows no reference", exc)

    def wrap(layer: Any) -> Any:
        fresh = layer.__class__.from_config(layer.get_config())
        if layer.name in names:
            return mot.sparsity.keras.prune_low_magnitude(fresh, pruning_schedule=schedule, sparsity_m_by_n=spec.structure)
        return fresh

    try:
        with SafeModeScope(False):
            wrapped = keras.models.clone_model(model, clone_function=wrap)
        for old, new in zip(model.layers, wrapped.layers):
            target = new.layer if isinstance(new, PruneLowMagnitude) else new
            if target.name != old.name:
                raise ConversionError(f"cloned layer {target.name} does not line up with {old.name}")
            target.set_weights(old.get_weights())
    except ConversionError:
        raise
    except Exception as exc:  # noqa: BLE001 - tfmot and Keras raise many types for graphs they cannot clone
        raise ConversionError(
            f"tfmot cannot wrap model {model.name} for pruning ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); "
            "convert without --prune"
        ) from exc
    seed_everything(seed)
    wrapped.compile(
        optimizer=keras.optimizers.Adam(float(spec.learning_rate)),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits),
        metrics=["accuracy"],
    )
    log.info("pruning %d layer(s) while fine-tuning %d epoch(s) on %d inputs: %s", len(names), spec.epochs,
             len(data.x_train), spec.describe())
    wrapped.fit(
        data.model_inputs(data.x_train),
        data.y_train,
        epochs=int(spec.epochs),
        batch_size=int(spec.batch_size),
        shuffle=True,
        callbacks=[mot.sparsity.keras.UpdatePruningStep()],
        verbose=1 if progress else 0,
    )
    rows: Dict[str, LayerSparsity] = {}
    for layer in wrapped.layers:
        if isinstance(layer, PruneLowMagnitude):
            values = [np.asarray(v.numpy()) for v in layer.prunable_weights]
            size = int(sum(v.size for v in values))
            zeros = int(sum(int(np.count_nonzero(v == 0)) for v in values))
            rows[layer.layer.name] = LayerSparsity(layer.layer.name, type(layer.layer).__name__, size, zeros / max(1, size))
    stripped = mot.sparsity.keras.strip_pruning(wrapped)
    order = [layer.name for layer in model.layers]
    layers = sorted(list(rows.values()) + dense, key=lambda x: order.index(x.layer) if x.layer in order else len(order))
    pruned = Pruned(
        model=stripped,
        spec=spec,
        layers=tuple(layers),
        unpruned_accuracy=unpruned_accuracy,
        pruned_accuracy=_accuracy(stripped, data),
        reference_int8=reference,
        steps=steps,
        seconds=time.perf_counter() - started,
    )
    overall = _overall(pruned.pruned_layers, "keras")
    log.info("pruned %d layer(s) to %.1f%% zeros; float top-1 %.2f%% -> %.2f%%", len(rows), 100 * (overall or 0),
             100 * unpruned_accuracy, 100 * pruned.pruned_accuracy)
    return pruned


# --- the int8 model ----------------------------------------------------------------------------------------------
