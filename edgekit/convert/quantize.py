"""TFLite conversion: float, post-training int8 (PTQ) and quantization-aware training (QAT).

Full-integer int8 everywhere: int8 weights (per-channel for convolutions and
dense layers, the converter's default), int8 activations calibrated on a
representative dataset, int8 input and output tensors.

QAT first flattens a model that holds other models (a pretrained base inside
a Sequential, :mod:`edgekit.convert.flatten`), then annotates every layer tfmot
can quantize and leaves the others float (they are quantized post-training by
the converter from the representative dataset); each such layer is reported by
name in the ``fallbacks``, and :func:`coverage` says how much of the model (layers
and parameters) QAT reached.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..data import Dataset
from ..errors import ConversionError, DataError, ModelError

__all__ = [
    "COVERAGE_WARN",
    "QatResult",
    "check_fits",
    "coverage",
    "coverage_warning",
    "all_float_coverage",
    "output_activation",
    "representative_inputs",
    "to_tflite_float",
    "to_tflite_int8",
    "unsupported_layers",
    "quantize_aware",
]

log = logging.getLogger(__name__)

Fallback = Tuple[str, str]

#: Below this fraction of its parameters under QAT, a "qat" bundle is mostly post-training quantized: say so loudly.
COVERAGE_WARN = 0.9


def check_fits(model: Any, data: Dataset) -> None:
    """Raise DataError/ModelError when ``data`` does not fit ``model`` (one input, one output, sizes)."""
    try:
        in_shape, out_shape = model.input_shape, model.output_shape
    except (AttributeError, RuntimeError):
        # a subclassed model has no static shapes: call it on one input
        try:
            out = model(data.model_inputs(data.x_train[:1]), training=False)
        except Exception as exc:  # noqa: BLE001 - any failure means the data does not fit
            raise DataError(
                f"model {getattr(model, 'name', '?')} cannot run on data of shape={list(data.input_shape)} "
                f"({type(exc).__name__}); pass data of the model's input shape"
            ) from exc
        in_shape, out_shape = (None,) + tuple(data.input_shape), tuple(out.shape)
    if isinstance(in_shape, list) or isinstance(out_shape, list):
        raise ModelError(
            f"model has {len(in_shape) if isinstance(in_shape, list) else 1} inputs and "
            f"{len(out_shape) if isinstance(out_shape, list) else 1} outputs; edgekit converts classifiers with one of each"
        )
    expected = tuple(in_shape[1:])
    if any(d is not None and d != g for d, g in zip(expected, data.input_shape)) or len(expected) != len(data.input_shape):
        raise DataError(
            f"data input shape={list(data.input_shape)} does not fit the model's input shape={list(expected)}; "
            "resize the data or pass the matching model"
        )
    classes = out_shape[-1]
    if classes != data.num_classes:
        raise DataError(
            f"data has {data.num_classes} classes ({', '.join(data.labels[:12])}) but the model outputs {classes} scores; "
            "pass the data the model was trained for, or --labels with one name per output"
        )


def output_activation(model: Any, data: Dataset, rows: int = 64) -> str:
    """``softmax`` when the model's outputs are probabilities, else ``logits``."""
    out = np.asarray(model(data.model_inputs(data.x_train[:rows]), training=False))
    if np.all(out >= -1e-6) and np.all(out <= 1 + 1e-6) and np.allclose(out.sum(axis=-1), 1.0, atol=1e-3):
        return "softmax"
    return "logits"


def representative_inputs(data: Dataset, samples: int, seed: int = 0) -> np.ndarray:
    """Up to ``samples`` training inputs (model units), a fixed stratified-enough random pick."""
    if samples <= 0:
        raise DataError(f"calibration_samples={samples} must be > 0")
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(data.x_train))[: int(samples)]
    return data.model_inputs(data.x_train[np.sort(idx)])


def _rep_dataset(inputs: np.ndarray) -> Callable[[], Iterator[List[np.ndarray]]]:
    def gen() -> Iterator[List[np.ndarray]]:
        for x in inputs:
            yield [x[None, ...].astype(np.float32)]

    return gen


def _convert(model: Any, configure: Callable[[Any], None], what: str) -> bytes:
    from .._keras import tf

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Statistics for quantized inputs", category=UserWarning)
            converter = tf.lite.TFLiteConverter.from_keras_model(model)
            configure(converter)
            return bytes(converter.convert())
    except Exception as exc:  # noqa: BLE001 - the converter raises many types
        msg = " ".join(str(exc).split())
        raise ConversionError(
            f"{what} conversion failed ({type(exc).__name__}: {msg[:240]}); check the model's layers are TFLite "
            "built-ins, or try --mode ptq"
        ) from exc


def to_tflite_float(model: Any) -> bytes:
    """The float32 TFLite model (the reference for size and accuracy)."""
    return _convert(model, lambda c: None, "float TFLite")


def to_tflite_int8(model: Any, calibration: np.ndarray) -> bytes:
    """Full-integer int8 TFLite with int8 input/output tensors, calibrated on ``calibration``."""
    from .._keras import tf

    def configure(c: Any) -> None:
        c.optimizations = [tf.lite.Optimize.DEFAULT]
        c.representative_dataset = _rep_dataset(calibration)
        c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        c.inference_input_type = tf.int8
        c.inference_output_type = tf.int8

    return _convert(model, configure, "int8")


def _registry() -> Any:
    from .._keras import tfmot

    tfmot()
    from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
        default_8bit_quantize_registry as reg,
    )

    return reg.Default8BitQuantizeRegistry()


def _is_graph_model(model: Any) -> bool:
    from .._keras import keras

    return isinstance(model, keras.Sequential) or bool(getattr(model, "_is_graph_network", False))


def unsupported_layers(model: Any) -> List[Tuple[str, str]]:
    """(layer name, class name) of every layer tfmot's default 8-bit scheme cannot quantize."""
    from .._keras import keras

    registry = _registry()
    out = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if isinstance(layer, keras.layers.BatchNormalization):
            continue  # folded into the preceding convolution by quantize_apply
        if isinstance(layer, keras.Model) or not registry.supports(layer):
            out.append((layer.name, type(layer).__name__))
    return out


def _params(layer: Any) -> int:
    try:
        return int(layer.count_params())
    except ValueError:  # an unbuilt layer
        return 0


def coverage(model: Any, float_layers: Dict[str, str], flattened: Sequence[str] = ()) -> Dict[str, Any]:
    """How much of ``model`` QAT reached: layers and parameters, and each layer left float with its reason.

    ``float_layers``: layer name -> why it was left float (every other layer is under QAT; a
    BatchNormalization folded into its convolution counts as under QAT). ``flattened``: the nested
    models replaced by their layers before annotation.
    """
    from .._keras import keras

    layers = [x for x in model.layers if not isinstance(x, keras.layers.InputLayer)]
    total = sum(_params(x) for x in layers)
    left = [x for x in layers if x.name in float_layers]
    float_params = sum(_params(x) for x in left)
    return {
        "layers": len(layers),
        "layers_qat": len(layers) - len(left),
        "parameters": int(total),
        "parameters_qat": int(total - float_params),
        "fraction_parameters": round((total - float_params) / total, 6) if total else 1.0,
        "flattened": list(flattened),
        "float_layers": [
            {"layer": x.name, "class": type(x).__name__, "parameters": _params(x), "reason": float_layers[x.name]}
            for x in left
        ],
    }


def coverage_warning(quantization: Mapping[str, Any]) -> Optional[str]:
    """One loud line when a bundle asked for QAT got it for less than COVERAGE_WARN of its parameters."""
    if quantization.get("requested_mode") != "qat":
        return None
    cov = quantization.get("qat_coverage")
    if quantization.get("mode") != "qat":
        return ("WARNING: QAT was asked for but the whole model was converted post-training (PTQ); "
                "see the fallbacks below")
    if not cov or cov.get("fraction_parameters", 1.0) >= COVERAGE_WARN:
        return None
    biggest = sorted(cov.get("float_layers", []), key=lambda x: -x.get("parameters", 0))[:3]
    names = ", ".join(f"{x['layer']} ({x['class']}, {x['parameters']:,} parameters)" for x in biggest)
    return (f"WARNING: QAT reached only {100 * cov['fraction_parameters']:.1f}% of the parameters "
            f"({cov['parameters_qat']:,} of {cov['parameters']:,}); the rest is post-training quantized. "
            f"Left float: {names}")


@dataclass(frozen=True)
class QatResult:
    """The fine-tuned QAT model (None when the whole model fell back to PTQ) and what was done."""

    model: Any
    fallbacks: Tuple[Fallback, ...]
    mode: str  # "qat" or "ptq" when the whole model fell back
    coverage: Dict[str, Any] = field(default_factory=dict)


def quantize_aware(
    model: Any,
    data: Dataset,
    *,
    epochs: int,
    fallback: str,
    progress: bool,
    from_logits: bool,
    learning_rate: float = 1e-4,
    batch_size: int = 32,
    seed: int = 0,
    scheme: Any = None,
    flattened: Sequence[str] = (),
) -> QatResult:
    """tfmot QAT: annotate what can be quantized, apply, fine-tune ``epochs`` on the train split.

    ``scheme``: a tfmot quantize scheme other than the default 8-bit one (pruning passes the
    sparsity-preserving scheme, so fine-tuning keeps zero weights zero). ``flattened``: nested models the
    caller already flattened (named in the coverage).
    """
    from .._keras import keras, tfmot

    from ..models import seed_everything

    if fallback not in ("ptq", "fail"):
        raise ConversionError(f"fallback={fallback!r} must be 'ptq' or 'fail'")
    mot = tfmot()
    if not _is_graph_model(model):
        reason = f"subclassed model {type(model).__name__}: tfmot QAT needs a Sequential or functional model"
        if fallback == "fail":
            raise ConversionError(f"{reason}; rerun with --fallback ptq or --mode ptq")
        log.warning("%s; converting the whole model with PTQ", reason)
        return QatResult(None, ((model.name, f"{reason}; whole model converted with PTQ"),), "ptq",
                         all_float_coverage(model, reason))
    from .flatten import flatten_model, nested_models

    inside = nested_models(model)
    if inside:
        try:
            model = flatten_model(model)
        except ModelError as exc:
            if fallback == "fail":
                raise ConversionError(f"{exc}; or rerun with --fallback ptq") from exc
            log.warning("%s; the nested model(s) stay float during QAT", exc)
            inside = []
    flattened = list(flattened) + [n for n in inside if n not in flattened]
    skipped = unsupported_layers(model)
    if skipped and fallback == "fail":
        names = ", ".join(f"{n} ({c})" for n, c in skipped)
        raise ConversionError(f"QAT cannot quantize layers {names}; rerun with --fallback ptq or --mode ptq")
    skip_names = {n for n, _ in skipped}
    fallbacks: List[Fallback] = [
        (n, f"{c} is not supported by tfmot QAT: left float during QAT, quantized post-training by the converter")
        for n, c in skipped
    ]
    for name, what in fallbacks:
        log.warning("layer %s: %s", name, what)

    # the model is already in memory (the user's own code): let quantize_apply rebuild its Lambda layers
    from tf_keras.src.saving.serialization_lib import SafeModeScope

    def apply(skip: set) -> Any:
        def annotate(layer: Any) -> Any:
            fresh = layer.__class__.from_config(layer.get_config())
            if layer.name in skip or isinstance(layer, keras.layers.InputLayer):
                return fresh
            return mot.quantization.keras.quantize_annotate_layer(fresh)

        annotated = keras.models.clone_model(model, clone_function=annotate)
        annotated.set_weights(model.get_weights())
        with mot.quantization.keras.quantize_scope(), SafeModeScope(False):
            if scheme is not None:
                return mot.quantization.keras.quantize_apply(annotated, scheme)
            return mot.quantization.keras.quantize_apply(annotated)

    batch_norms = [layer.name for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    try:
        try:
            qat_model = apply(skip_names)
        except Exception:  # noqa: BLE001 - a BatchNormalization tfmot cannot fold: leave those float, try again
            if not batch_norms:
                raise
            if fallback == "fail":
                raise ConversionError(
                    f"QAT cannot quantize BatchNormalization layers {', '.join(batch_norms)} (not after a convolution); "
                    "rerun with --fallback ptq or --mode ptq"
                ) from None
            qat_model = apply(skip_names | set(batch_norms))
            extra = [(n, "BatchNormalization not foldable into a convolution: left float during QAT, "
                         "quantized post-training by the converter") for n in batch_norms]
            for name, what in extra:
                log.warning("layer %s: %s", name, what)
            fallbacks += extra
    except ConversionError:
        raise
    except Exception as exc:  # noqa: BLE001 - tfmot raises many types for unsupported graphs
        reason = f"tfmot quantize_apply failed ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})"
        if fallback == "fail":
            raise ConversionError(f"{reason}; rerun with --fallback ptq or --mode ptq") from exc
        log.warning("%s; converting the whole model with PTQ", reason)
        return QatResult(None, tuple(fallbacks) + ((model.name, f"{reason}; whole model converted with PTQ"),), "ptq",
                         all_float_coverage(model, reason, flattened))
    if epochs > 0:
        seed_everything(seed)
        qat_model.compile(
            optimizer=keras.optimizers.Adam(learning_rate),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits),
            metrics=["accuracy"],
        )
        log.info("QAT fine-tuning for %d epoch(s) on %d inputs", epochs, len(data.x_train))
        qat_model.fit(
            data.model_inputs(data.x_train),
            data.y_train,
            epochs=int(epochs),
            batch_size=int(batch_size),
            shuffle=True,
            verbose=1 if progress else 0,
        )
    reasons = {n: _short_reason(what) for n, what in fallbacks}
    return QatResult(qat_model, tuple(fallbacks), "qat", coverage(model, reasons, flattened))


def _short_reason(action: str) -> str:
    return action.split(": left float")[0]


def all_float_coverage(model: Any, reason: str, flattened: Sequence[str] = ()) -> Dict[str, Any]:
    """Coverage when QAT reached nothing: every layer float for ``reason``."""
    from .._keras import keras

    layers = getattr(model, "layers", None)
    if not layers:  # a subclassed model: one opaque block
        total = _params(model)
        return {"layers": 1, "layers_qat": 0, "parameters": total, "parameters_qat": 0, "fraction_parameters": 0.0,
                "flattened": [], "float_layers": [{"layer": model.name, "class": type(model).__name__,
                                                   "parameters": total, "reason": reason}]}
    return coverage(model, {x.name: reason for x in layers if not isinstance(x, keras.layers.InputLayer)}, flattened)
