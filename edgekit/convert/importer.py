"""``edgekit import``: a ``.tflite`` made elsewhere (Teachable Machine, Model Maker, Edge Impulse, a colleague's
converter run) becomes a bundle the boards run.

The tensor specs (dtype, shape, scale, zero point) come from the model; the preprocessing from the options
(``--input-range``, ``--mean/--std``) or, for a quantized input, from the float range its quantization covers;
whether the output is softmax, logits or a sigmoid from the model's last op. With data, the bundle is measured
as ``convert`` measures it (:func:`~edgekit.convert.pipeline.prove_bundle`): evaluation and report,
thresholds, reference statistics. Everything is checked before anything is written, and the bundle appears
whole or not at all.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple

import numpy as np

from device_agent.errors import InputError
from device_agent.update.manifest import Manifest, Preprocessing, TensorSpec, load_bundle, read_labels

from ..data import Dataset, load_dataset
from ..errors import DataError, ModelError
from .bundle import atomic_dir, check_output, write_bundle
from .evaluate import EvalReport
from .inputs import INPUT_RANGES, with_input_range

__all__ = ["ImportResult", "import_tflite", "MAX_MODEL_BYTES"]

log = logging.getLogger(__name__)

#: A .tflite bigger than this is refused before it is read (a board's update limit is far below).
MAX_MODEL_BYTES = 512 << 20
_PASS_THROUGH = ("DEQUANTIZE", "QUANTIZE", "RESHAPE", "SQUEEZE", "CAST")


@dataclass(frozen=True)
class ImportResult:
    bundle_path: Path
    manifest: Manifest
    report: Optional[EvalReport]
    notes: Tuple[str, ...]  # what was decided from the model, one line each


def _read_model(path: Path) -> bytes:
    if not path.is_file():
        raise ModelError(f"{path} does not exist; pass the .tflite file to import")
    size = path.stat().st_size
    if size > MAX_MODEL_BYTES:
        raise ModelError(f"{path} is {size} bytes, over the limit of {MAX_MODEL_BYTES}; a board cannot run it")
    data = path.read_bytes()
    if len(data) < 8 or data[4:8] != b"TFL3":  # the flatbuffer's file identifier
        raise ModelError(f"{path} is not a TFLite model (no 'TFL3' identifier); pass the .tflite file the tool "
                         "exported (a Keras model goes through `edgekit convert`)")
    return data


def _open(path: Path):
    from device_agent.inference.interpreter import TFLiteModel

    try:
        return TFLiteModel.open(path)
    except InputError as exc:
        raise ModelError(str(exc).replace("; re-create the bundle", "; export it again")) from exc


def _last_op(interp: Any, tensor: int) -> Optional[str]:
    """The op that computes ``tensor``, looking through (de)quantize and reshapes; None when unknown."""
    try:
        ops = interp._get_ops_details()  # noqa: SLF001 - LiteRT and tf.lite both have it; optional
    except Exception:  # noqa: BLE001 - an interpreter without it: the outputs decide
        return None
    by_output: dict = {}
    for op in ops:  # the model's own ops; a delegate's partitions (XNNPACK) are listed after them
        if op.get("op_name") != "DELEGATE":
            for o in op.get("outputs", []):
                by_output.setdefault(int(o), op)
    for _ in range(16):
        op = by_output.get(int(tensor))
        if op is None:
            return None
        name = str(op.get("op_name", ""))
        if name not in _PASS_THROUGH or not len(op.get("inputs", [])):
            return name
        tensor = op["inputs"][0]
    return None


def _activation(model: Any, classes: int, probe: np.ndarray) -> Tuple[str, str]:
    """``softmax``, ``logits`` or ``sigmoid``, and why."""
    op = _last_op(model.interpreter, model._out_index)  # noqa: SLF001 - the adapter's own tensor index
    if classes == 1 and op == "LOGISTIC":
        return "sigmoid", "one score from LOGISTIC: a binary classifier's probability of the second label"
    if classes == 1:
        return "logits", (f"one score from {op or 'an unknown op'}, not LOGISTIC: a binary classifier's logit; the "
                          "board applies the logistic function, so confidences are probabilities")
    if op == "SOFTMAX":
        return "softmax", "the model ends in SOFTMAX: scores are probabilities"
    scores = model.predict(probe)
    sums = scores.sum(axis=1)
    tol = 0.02 + classes * (model.output_spec.scale if model.output_spec.quantized else 0.0)
    if op is None and np.all(scores >= -1e-6) and np.all(np.abs(sums - 1.0) <= tol):
        return "softmax", "its scores are non-negative and sum to 1"
    return "logits", (f"the model ends in {op or 'an unknown op'}, not SOFTMAX (scores from "
                      f"{float(scores.min()):.3g} to {float(scores.max()):.3g}): the board applies softmax, so "
                      "confidences are probabilities")


def _quantized_range(spec: TensorSpec) -> Optional[Tuple[float, float]]:
    """The float range a quantized input covers: ``(q - zero_point) * scale`` over the dtype's 256 levels.

    Raw pixels mapped onto exactly this range quantize back to themselves (uint8) or to pixel - 128 (int8),
    which is what the tool that made the model feeds it; a rounded range (-1..1 for -1.004..0.996) would
    move half the pixels by one step.
    """
    if not spec.quantized or np.dtype(spec.dtype).itemsize != 1:
        return None
    info = np.iinfo(np.dtype(spec.dtype))
    return (info.min - spec.zero_point) * spec.scale, (info.max - spec.zero_point) * spec.scale


def _nearest_name(lo: float, hi: float) -> str:
    for name, (a, b) in INPUT_RANGES.items():
        if abs(lo - a) <= 0.02 * (b - a) and abs(hi - b) <= 0.02 * (b - a):
            return f" (about {name})"
    return ""


def _base_preprocessing(spec: TensorSpec, raw_dtype: str) -> Preprocessing:
    shape = tuple(int(d) for d in spec.shape[1:])
    if len(shape) == 3 and shape[2] in (1, 3):
        return Preprocessing(kind="image", shape=shape, color="grayscale" if shape[2] == 1 else "rgb",
                             resize="bilinear", raw_dtype=raw_dtype)
    return Preprocessing(kind="array", shape=shape, color="grayscale", resize="none", raw_dtype="float32")


def _preprocessing(path: Path, spec: TensorSpec, raw_dtype: str, input_range: Optional[str], mean: Optional[float],
                   std: Optional[float]) -> Tuple[Preprocessing, str]:
    base = _base_preprocessing(spec, raw_dtype)
    if input_range is not None or mean is not None or std is not None:
        pre = with_input_range(base, input_range=input_range, mean=mean, std=std)
        said = f"--input-range {input_range}" if input_range is not None else f"--mean {mean} --std {std}"
        return pre, f"input: {said}: model_input = raw * {pre.scale:.6g} + {pre.offset:.6g}"
    found = _quantized_range(spec)
    if found is not None and base.kind == "image":
        pre = with_input_range(base, input_range=f"{found[0]!r}..{found[1]!r}")
        return pre, (f"input: {spec.dtype} quantized over {found[0]:.4g}..{found[1]:.4g}{_nearest_name(*found)} "
                     f"(scale {spec.scale:.6g}, zero point {spec.zero_point}): raw pixels are mapped onto it, one "
                     "pixel value per quantization step; pass --input-range to say otherwise")
    if base.kind == "array":
        return base, "input: an array, fed as it comes (pass --mean/--std to normalize it)"
    raise ModelError(f"{path.name} takes {spec.dtype} input and does not say its range; pass --input-range "
                     f"{'|'.join(INPUT_RANGES)} or --mean/--std, as the model's training data was scaled")


def _range_from_data(path: Path, model: Any, spec: TensorSpec, raw_dtype: str, data: Dataset,
                     labels: Tuple[str, ...], classes: int) -> Tuple[Preprocessing, str]:
    """A float picture input whose range nobody stated: the standard range under which the model explains (up to
    200) training pictures best (lowest cross-entropy: a scaled-up input often keeps the top class but makes the
    model sure of its mistakes), when it clearly does; else the error that asks for the option."""
    base = _base_preprocessing(spec, raw_dtype)
    if base.kind != "image" or classes < 2:
        raise ModelError(f"{path.name} takes {spec.dtype} input and does not say its range; pass --input-range "
                         f"{'|'.join(INPUT_RANGES)} or --mean/--std, as the model's training data was scaled")
    tried = []
    for name in INPUT_RANGES:
        pre = with_input_range(base, input_range=name)
        fitted, _ = _fit_data(data, labels, pre, classes)
        x, y = fitted.x_train[:200], fitted.y_train[:200]
        s = model.predict(fitted.model_inputs(x)).astype(np.float64)
        if not (np.all(s >= -1e-6) and np.allclose(s.sum(axis=1), 1.0, atol=0.05)):  # logits: softmax
            s = np.exp(s - s.max(axis=1, keepdims=True))
        p = s / np.maximum(s.sum(axis=1, keepdims=True), 1e-12)
        nll = float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-7, 1.0))))
        tried.append((nll, float(np.mean(p.argmax(axis=1) == y)), name, pre))
    tried.sort(key=lambda t: t[0])
    said = ", ".join(f"{n}: {100 * a:.0f}% right, cross-entropy {c:.2f}" for c, a, n, _ in tried)
    (best, acc, name, pre), second = tried[0], tried[1]
    if not (best < 0.5 * second[0] and acc >= max(a for _, a, _, _ in tried) - 0.02):
        raise ModelError(f"{path.name} takes {spec.dtype} input and does not say its range, and the data does not "
                         f"tell ({said}); pass --input-range or --mean/--std")
    return pre, (f"input: {spec.dtype}, range not stated; on {len(x)} training pictures {said}: using {name} "
                 "(pass --input-range to choose)")


def _fit_data(data: Dataset, labels: Tuple[str, ...], pre: Preprocessing, classes: int) -> Tuple[Dataset, str]:
    """``data`` in the model's label order with the bundle's preprocessing; DataError when it does not fit."""
    if data.input_shape != tuple(pre.shape):
        raise DataError(f"data input shape={list(data.input_shape)} does not fit the model's input "
                        f"shape={list(pre.shape)}; pass data of that shape (an image folder is resized to it)")
    note = ""
    if set(data.labels) == set(labels) and len(data.labels) == len(labels):
        if data.labels != labels:  # folder names in another order than the model's outputs: follow the labels
            to_model = np.array([labels.index(name) for name in data.labels], dtype=np.int64)
            data = Dataset(data.x_train, to_model[data.y_train], data.x_test, to_model[data.y_test], labels,
                           data.preprocessing, data.name)
            note = "data: classes matched to the labels by name"
    else:
        if len(data.labels) != len(labels):
            raise DataError(f"data has {len(data.labels)} classes ({', '.join(data.labels[:12])}) but --labels "
                            f"gives {len(labels)}; pass data of the model's classes")
        data = data.with_labels(labels)
        note = (f"data: classes {', '.join(data.labels[:6])} taken in folder order as {', '.join(labels[:6])} "
                "(name the class folders after the labels to match them by name)")
    if pre.kind == "image" and data.preprocessing.raw_dtype != pre.raw_dtype:
        pre = replace(pre, raw_dtype=data.preprocessing.raw_dtype)
    return replace(data, preprocessing=pre), note


def _labels(value: Sequence[str] | str) -> Tuple[str, ...]:
    """Labels as given; a labels.txt whose lines are '<index> <name>' (Teachable Machine) gives the names."""
    names = read_labels(value)
    parts = [n.split(None, 1) for n in names]
    if names and all(len(p) == 2 and p[0] == str(i) for i, p in enumerate(parts)):
        names = tuple(p[1] for p in parts)
    return names


def _kinds(interp: Any) -> Tuple[str, str]:
    """What the model computes in: the weights' and the activations' dtype, from its tensors."""
    try:
        dtypes = {np.dtype(t["dtype"]).name for t in interp.get_tensor_details()}
    except Exception:  # noqa: BLE001
        return "unknown", "unknown"
    weights = "int8" if "int8" in dtypes else ("float16" if "float16" in dtypes else "float32")
    return weights, ("int8" if "int8" in dtypes or "uint8" in dtypes else "float32")


def import_tflite(
    model_path: os.PathLike | str,
    *,
    labels: Sequence[str] | str,
    output: os.PathLike | str,
    data: Optional[str | Dataset] = None,
    input_range: Optional[str] = None,
    mean: Optional[float] = None,
    std: Optional[float] = None,
    name: Optional[str] = None,
    version: str = "1",
    baseline: Optional[os.PathLike | str] = None,
    runtimes: Optional[Sequence[str]] = None,
    force: bool = False,
    report: bool = True,
    seed: int = 0,
) -> ImportResult:
    """Make a bundle at ``output`` from the ``.tflite`` at ``model_path``; see the module doc."""
    from .pipeline import prove_bundle, write_report

    path = Path(model_path)
    output = check_output(output, force)
    if baseline is not None:
        load_bundle(baseline)
    model_bytes = _read_model(path)
    label_names = _labels(labels)
    if not label_names:
        raise DataError("--labels is empty; give the class names, one per output score (a file or a comma list)")
    notes = []
    with _open(path) as model:
        ins, outs = model.input_spec, model.output_spec
        if not ins.shape or ins.shape[0] != 1:
            raise ModelError(f"{path.name} takes inputs of shape {list(ins.shape)}; edgekit runs one input at a "
                             "time (batch 1): export the model with batch size 1")
        if len(outs.shape) < 2 or outs.shape[0] != 1 or any(d != 1 for d in outs.shape[1:-1]):
            raise ModelError(f"{path.name} outputs shape {list(outs.shape)}, not a classifier's [1, k] (one score "
                             "per class); edgekit imports classifiers")
        classes = int(outs.shape[-1])
        if classes != len(label_names) and not (classes == 1 and len(label_names) == 2):
            raise DataError(f"{len(label_names)} labels given ({', '.join(label_names[:12])}) but {path.name} "
                            f"outputs {classes} scores; give one label per output, in output order")
        raw_dtype = "uint8"
        dataset: Optional[Dataset] = None
        if data is not None:
            base = _base_preprocessing(ins, raw_dtype)
            dataset = data if isinstance(data, Dataset) else load_dataset(
                str(data), seed=seed, image_shape=tuple(base.shape) if base.kind == "image" else None)
            raw_dtype = dataset.preprocessing.raw_dtype if base.kind == "image" else "float32"
        try:
            pre, note = _preprocessing(path, ins, raw_dtype, input_range, mean, std)
        except ModelError:
            if dataset is None or input_range is not None or mean is not None:
                raise
            pre, note = _range_from_data(path, model, ins, raw_dtype, dataset, label_names, classes)
        notes.append(note)
        if dataset is not None:
            dataset, note = _fit_data(dataset, label_names, pre, classes if classes > 1 else 2)
            notes += [note] if note else []
            probe = dataset.model_inputs(dataset.x_train[:64])
        else:
            rng = np.random.default_rng(seed)
            raw = rng.uniform(0, 255 if pre.raw_dtype == "uint8" else 1, (16,) + tuple(pre.shape))
            probe = (raw.astype(np.float32) * np.float32(pre.scale) + np.float32(pre.offset)).astype(np.float32)
        try:
            activation, why = _activation(model, classes, probe)
        except (RuntimeError, ValueError, InputError) as exc:
            raise ModelError(f"{path.name} does not run on inputs of its own shape ({exc}); export it again") from exc
        notes.append(f"output: {activation}: {why}")
        weights, activations = _kinds(model.interpreter)
    quantization = {
        "mode": "imported",
        "requested_mode": "imported",
        "source": path.name,
        "weights": weights,
        "activations": activations,
        "io": f"{ins.dtype} in, {outs.dtype} out",
        "fallbacks": [],
    }
    with atomic_dir(output, force) as tmp:
        manifest = write_bundle(tmp, model_bytes, name=name or path.stem, version=version, labels=label_names,
                                preprocessing=pre, quantization=quantization, output_activation=activation)
        rep = None
        if dataset is not None:
            manifest, rep = prove_bundle(tmp, manifest, dataset, baseline=baseline, runtimes=runtimes, report=report)
    if rep is not None:
        rep = write_report(output, rep, report)
        if not rep.beats_baseline:
            notes.append(f"WARNING: the model does not beat the baseline on {dataset.name} "
                         f"({100 * rep.int8.accuracy:.1f}% vs {100 * rep.baseline.accuracy:.1f}%): check "
                         "--input-range (how the model's inputs were scaled) and the order of --labels")
    for n in notes:
        log.debug("%s", n)
    return ImportResult(output, manifest, rep, tuple(notes))
