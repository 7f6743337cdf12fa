"""``edgekit convert``: a Keras model and data become a proven int8 bundle.

Steps: load the model, check the data fits it, quantize (QAT with tfmot, or
PTQ), convert to full-integer int8 TFLite, write ``model.tflite`` and
``manifest.json`` into a temporary directory beside the output, evaluate
float vs int8 (``report/``), fill the measured metrics, thresholds and
reference statistics into the manifest, then rename the directory into place.
On any failure nothing is left behind.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from device_agent.update.manifest import Manifest, load_bundle, read_labels

from .bundle import FLOAT_MODEL_NAME, atomic_dir, check_output, rewrite_manifest, write_bundle
from ..data import Dataset
from ..errors import ConversionError
from .evaluate import EvalReport, Section, evaluate, scores_to_probs
from .load import load_model, model_file_size

if TYPE_CHECKING:  # pragma: no cover
    from .prune import PruneSpec

#: Called with the staged bundle directory, the bundle's final name and its report; returns report sections.
SectionsHook = Callable[[Path, str, EvalReport], Sequence[Section]]

__all__ = ["ConvertResult", "convert", "load_model", "reference_stats", "MODES"]

log = logging.getLogger(__name__)

MODES = ("qat", "ptq")
REPORT_DIR = "report"


@dataclass(frozen=True)
class ConvertResult:
    bundle_path: Path
    manifest: Manifest
    report: EvalReport
    fallbacks: Tuple[Tuple[str, str], ...]


def _hist(values: np.ndarray, bins: int, lo: float, hi: float) -> Dict[str, Any]:
    if hi <= lo:
        hi = lo + 1.0
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    return {"edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in counts]}


def reference_stats(model_inputs: np.ndarray, probs: np.ndarray, bins: int = 20) -> Dict[str, Any]:
    """Statistics of the training inputs (model units, per channel) and of the model's confidence on them."""
    x = np.asarray(model_inputs, dtype=np.float64)
    flat = x.reshape(len(x), -1, x.shape[-1]) if x.ndim >= 3 else x.reshape(len(x), -1, 1)
    per_channel = flat.transpose(2, 0, 1).reshape(flat.shape[2], -1)
    lo, hi = float(x.min()), float(x.max())
    conf = np.asarray(probs).max(axis=1)
    top2 = np.sort(probs, axis=1)[:, -2:]
    margin = top2[:, -1] - top2[:, 0] if probs.shape[1] > 1 else conf
    q = [0.05, 0.25, 0.5, 0.75, 0.95]
    return {
        "samples": int(len(x)),
        "units": "model input (after preprocessing)",
        "input": {
            "mean": [round(float(v), 6) for v in per_channel.mean(axis=1)],
            "std": [round(float(v), 6) for v in per_channel.std(axis=1)],
            "min": [round(float(v), 6) for v in per_channel.min(axis=1)],
            "max": [round(float(v), 6) for v in per_channel.max(axis=1)],
            "histogram": _hist(x, bins, lo, hi),
        },
        "confidence": {
            "mean": round(float(conf.mean()), 6),
            "quantiles": {str(k): round(float(v), 6) for k, v in zip(q, np.quantile(conf, q))},
            "histogram": _hist(conf, bins, 0.0, 1.0),
            "margin_mean": round(float(margin.mean()), 6),
        },
    }


def convert(
    model: Any,
    data: Dataset,
    *,
    mode: str,
    output: os.PathLike | str,
    epochs: int = 3,
    calibration_samples: int = 200,
    name: Optional[str] = None,
    version: str = "1",
    labels: Optional[Sequence[str] | str] = None,
    baseline: Optional[os.PathLike | str] = None,
    force: bool = False,
    fallback: str = "ptq",
    progress: bool = True,
    runtimes: Optional[Sequence[str]] = None,
    report: bool = True,
    seed: int = 0,
    save_float: bool = True,
    prune: Optional["PruneSpec"] = None,
    sections: Optional[SectionsHook] = None,
    input_range: Optional[str] = None,
    mean: Optional[float] = None,
    std: Optional[float] = None,
    follow_model: bool = True,
) -> ConvertResult:
    """Convert ``model`` (a Keras model or a path) to an int8 bundle at ``output``; see the module doc.

    ``prune``: magnitude pruning while fine-tuning before quantization (:mod:`edgekit.convert.prune`);
    ``sections``: adds sections to the report (``edgekit distill`` adds its comparison).
    ``input_range`` (``0..1``, ``-1..1``, ``0..255``) or ``mean``/``std``: the model's input for raw pixels;
    by default it follows the model (:mod:`edgekit.convert.inputs`), or with ``follow_model=False`` the
    data's own preprocessing is kept (retraining a bundle keeps the bundle's).
    """
    from . import quantize as q
    from ..models import seed_everything

    if mode not in MODES:
        raise ConversionError(f"mode={mode!r} is not supported; use 'qat' or 'ptq'")
    if fallback not in ("ptq", "fail"):
        raise ConversionError(f"fallback={fallback!r} is not supported; use 'ptq' or 'fail'")
    if epochs < 0:
        raise ConversionError(f"epochs={epochs} must be >= 0")
    if calibration_samples <= 0:
        raise ConversionError(f"calibration_samples={calibration_samples} must be > 0")
    output = check_output(output, force)
    if baseline is not None:
        load_bundle(baseline)  # a bad baseline fails before the slow work
    label_names = read_labels(labels)
    if label_names:
        data = data.with_labels(label_names)
    keras_size: Optional[int] = None
    if isinstance(model, (str, os.PathLike)):
        keras_size = model_file_size(model) if Path(model).exists() else None
        model = load_model(model)
    q.check_fits(model, data)
    from .flatten import nested_models

    nested = nested_models(model)  # flattened below or by QAT: the coverage names them
    model, choice = _inputs(model, data, input_range, mean, std, follow_model)
    nested = [] if nested_models(model) else nested  # not flattened here: QAT flattens and names them itself
    data = replace(data, preprocessing=choice.preprocessing)
    log.info("input: %s", choice.detail)
    seed_everything(seed)
    activation = q.output_activation(model, data)
    calibration = q.representative_inputs(data, calibration_samples, seed)
    pruned = None
    if prune is not None:
        from .prune import prune_model

        pruned = prune_model(model, data, prune, from_logits=activation == "logits", calibration=calibration,
                             progress=progress, seed=seed)
        model = pruned.model
    float_bytes = q.to_tflite_float(model)
    if keras_size is None:
        with tempfile.TemporaryDirectory(prefix="edgekit-keras-") as tmp:
            try:
                model.save(os.path.join(tmp, "model.keras"))
                keras_size = model_file_size(os.path.join(tmp, "model.keras"))
            except Exception as exc:  # noqa: BLE001 - a subclassed model may not serialize; size is then unknown
                log.info("Keras file size unknown (%s)", exc)
    fallbacks: Tuple[Tuple[str, str], ...] = ()
    used = mode
    qat_coverage: Optional[Dict[str, Any]] = None
    if mode == "qat":
        qat = q.quantize_aware(
            model, data, epochs=epochs, fallback=fallback, progress=progress, from_logits=activation == "logits", seed=seed,
            scheme=pruned.qat_scheme() if pruned is not None else None, flattened=nested,
        )
        fallbacks, used, qat_coverage = qat.fallbacks, qat.mode, dict(qat.coverage)
        if qat.model is not None:
            try:
                int8_bytes = q.to_tflite_int8(qat.model, calibration)
            except ConversionError as exc:
                if fallback == "fail":
                    raise
                fallbacks += ((model.name, f"QAT model did not convert ({exc}); whole model converted with PTQ"),)
                used = "ptq"
                qat_coverage = q.all_float_coverage(model, "the QAT model did not convert")
        if used == "ptq":
            int8_bytes = q.to_tflite_int8(model, calibration)
    else:
        int8_bytes = q.to_tflite_int8(model, calibration)
    quantization = {
        "mode": used,
        "requested_mode": mode,
        "weights": "int8 per-channel",
        "activations": "int8",
        "calibration_samples": int(len(calibration)),
        "qat_epochs": int(epochs) if used == "qat" else 0,
        "fallbacks": [{"layer": n, "action": a} for n, a in fallbacks],
        "input": choice.to_dict(),
    }
    if qat_coverage is not None:
        quantization["qat_coverage"] = qat_coverage
        loud = q.coverage_warning(quantization)
        if loud:
            log.warning("%s", loud)
    pruned_layers = None
    if pruned is not None:
        from .prune_measure import manifest_entry, measure

        pruned_layers = measure(pruned, int8_bytes)
        quantization["pruning"] = manifest_entry(pruned, pruned_layers, used)
    bundle_name = name or getattr(model, "name", None) or data.name
    with atomic_dir(output, force) as tmp:
        manifest = write_bundle(
            tmp,
            int8_bytes,
            name=bundle_name,
            version=version,
            labels=data.labels,
            preprocessing=data.preprocessing,
            quantization=quantization,
            output_activation=activation,
        )
        float_path = Path(tempfile.mkdtemp(prefix="edgekit-float-")) / "float.tflite"
        try:
            float_path.write_bytes(float_bytes)
            manifest, rep = prove_bundle(tmp, manifest, data, float_model=float_path, baseline=baseline,
                                         runtimes=runtimes, report=report, keras_size=keras_size)
        finally:
            float_path.unlink(missing_ok=True)
            float_path.parent.rmdir()
        if save_float:
            _save_float(model, tmp / FLOAT_MODEL_NAME)
        extra = []
        if pruned is not None:
            from .prune_measure import report_section

            extra.append(report_section(pruned, pruned_layers, tmp, output.name, rep, data, runtimes, baseline))
        if sections is not None:
            extra.extend(sections(tmp, output.name, rep))
        rep = replace(rep, sections=tuple(extra))
    log.info("bundle written to %s (int8 top-1 %.2f%%)", output, 100 * rep.int8.accuracy)
    report_obj = write_report(output, rep, report)
    return ConvertResult(bundle_path=output, manifest=manifest, report=report_obj, fallbacks=fallbacks)


def prove_bundle(staged: Path, manifest: Manifest, data: Dataset, *, float_model: Any = None,
                 baseline: Optional[os.PathLike | str] = None, runtimes: Optional[Sequence[str]] = None,
                 report: bool = True, keras_size: Optional[int] = None) -> Tuple[Manifest, EvalReport]:
    """Measure the bundle staged in ``staged`` on ``data`` and write what was measured into its manifest.

    The evaluation (``float_model`` vs the bundle's model and a baseline, on the test split; plots in
    ``report/``), the thresholds derived from it, the metrics, and the reference statistics of the
    training inputs (through the board's interpreter adapter). ``convert`` and ``import`` share it.
    """
    from device_agent.inference.interpreter import TFLiteModel

    rep = evaluate(staged, data, float_model=float_model, baseline=baseline, runtimes=runtimes,
                   output_dir=(staged / REPORT_DIR) if report else None, keras_size=keras_size)
    with TFLiteModel.open(staged / manifest.model_file) as tm:
        train_probs = scores_to_probs(tm.predict(data.model_inputs(data.x_train)), manifest.output_activation)
    manifest = replace(
        manifest,
        confidence_threshold=rep.thresholds.confidence,
        margin_threshold=rep.thresholds.margin,
        metrics=_metrics(rep),
        reference=reference_stats(data.model_inputs(data.x_train), train_probs),
    )
    rewrite_manifest(staged, manifest)
    return manifest, rep


def write_report(output: Path, rep: EvalReport, report: bool = True) -> EvalReport:
    """The report of the bundle now at ``output``: ``report/report.json`` and ``report.md`` (when ``report``)."""
    report_obj = replace(rep, bundle=str(output))
    if report:
        (output / REPORT_DIR / "report.json").write_text(json.dumps(report_obj.to_dict(), indent=2) + "\n", encoding="utf-8")
        (output / REPORT_DIR / "report.md").write_text(report_obj.to_markdown(), encoding="utf-8")
    return report_obj


def _inputs(model: Any, data: Dataset, input_range: Optional[str], mean: Optional[float], std: Optional[float],
            follow_model: bool) -> Tuple[Any, Any]:
    """The model to convert and the input choice (:func:`edgekit.convert.inputs.resolve`) on its flat graph."""
    from ..errors import ModelError
    from .flatten import flatten_model
    from .inputs import resolve

    options = input_range is not None or mean is not None or std is not None
    if follow_model and not options:
        try:
            model = flatten_model(model)  # a Rescaling inside a nested base counts
        except ModelError as exc:
            log.info("model not flattened (%s)", exc)
    return resolve(model, data.preprocessing, input_range=input_range, mean=mean, std=std, follow_model=follow_model)


def _save_float(model: Any, path: Path) -> None:
    """Keep the float model beside the bundle (workstation only) so `edgekit retrain` can start from it."""
    try:
        model.save(str(path))
    except Exception as exc:  # noqa: BLE001 - a subclassed model may not serialize; the bundle is still whole
        path.unlink(missing_ok=True)
        log.warning("float model not saved beside the bundle (%s); pass --float-model to `edgekit retrain`", exc)


def _metrics(rep: EvalReport) -> Dict[str, Any]:
    lat = {f"{x.runtime}_{x.model}_median_ms": round(x.median_ms, 5) for x in rep.latency}
    lat.update({f"{x.runtime}_{x.model}_p95_ms": round(x.p95_ms, 5) for x in rep.latency})
    return {
        "data": rep.data,
        "test_size": rep.test_size,
        "accuracy_float": rep.float.accuracy if rep.float else None,
        "accuracy_int8": rep.int8.accuracy,
        "macro_f1_int8": rep.int8.macro_f1,
        "agreement": rep.agreement,
        "baseline_accuracy": rep.baseline.accuracy,
        "size_bytes": dict(rep.sizes),
        "latency_ms": lat,
    }
