"""Float vs int8, side by side on the test split, through the interpreter the boards run.

int8 (and float TFLite) inference goes through
:class:`device_agent.inference.interpreter.TFLiteModel`, so the host measures the exact
code path of a board. The result is an :class:`EvalReport`; ``.write(dir)``
puts ``report.md``, ``report.json`` and PNG plots there.

The recommended thresholds are derived here (see docs/bundle.md,
"How the threshold is derived").
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from device_agent.inference.interpreter import TFLiteModel, available_runtimes
from device_agent.update.manifest import Bundle, load_bundle

from ..data import Dataset
from ..errors import DataError, ModelError

__all__ = ["ModelMetrics", "Latency", "Baseline", "Thresholds", "Section", "EvalReport", "evaluate", "derive_thresholds",
           "scores_to_probs"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelMetrics:
    """Accuracy figures of one model on the test split."""

    accuracy: float
    macro_f1: float
    precision: Tuple[float, ...]
    recall: Tuple[float, ...]  # = per-class accuracy
    confusion: Tuple[Tuple[int, ...], ...]


@dataclass(frozen=True)
class Latency:
    """Seconds per invoke of one model on one runtime (reported in milliseconds)."""

    runtime: str
    model: str  # "int8" | "float"
    median_ms: float
    p95_ms: float
    runs: int


@dataclass(frozen=True)
class Baseline:
    kind: str  # "bundle" | "majority"
    name: str
    accuracy: float


@dataclass(frozen=True)
class Thresholds:
    """Recommended confidence/margin thresholds and what they do on the test split."""

    confidence: float
    margin: float
    target_accuracy: float
    accepted_fraction: float
    accepted_accuracy: float
    flagged_accuracy: Optional[float]


@dataclass(frozen=True)
class Section:
    """A further part of a report (pruning, distillation): its key in report.json, a title and Markdown."""

    key: str
    title: str
    data: Dict[str, Any]
    markdown: str


@dataclass(frozen=True)
class EvalReport:
    bundle: str
    name: str
    version: str
    quantization: Dict[str, Any]
    data: str
    test_size: int
    labels: Tuple[str, ...]
    int8: ModelMetrics
    float: Optional[ModelMetrics]
    agreement: Optional[float]
    sizes: Dict[str, Optional[int]]
    latency: Tuple[Latency, ...]
    baseline: Baseline
    thresholds: Thresholds
    sections: Tuple[Section, ...] = ()
    #: One line when the float model does not beat the majority baseline: the likely cause and the option that fixes it.
    diagnosis: Optional[str] = None

    @property
    def beats_baseline(self) -> bool:
        return self.int8.accuracy > self.baseline.accuracy

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["labels"] = list(self.labels)
        out["beats_baseline"] = self.beats_baseline
        out.pop("sections", None)
        for section in self.sections:
            out[section.key] = section.data
        return out

    def to_markdown(self) -> str:
        from .report import markdown

        return markdown(self)

    def write(self, directory: os.PathLike | str) -> Path:
        """Write report.json, report.md and the PNG plots into ``directory`` (created); returns it."""
        from .report import plots

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "report.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        plots(self, directory)
        (directory / "report.md").write_text(self.to_markdown(), encoding="utf-8")
        return directory


def scores_to_probs(scores: np.ndarray, activation: str) -> np.ndarray:
    """Scores as probabilities, with the board's own arithmetic (softmax for logits; a quantized
    softmax output normalized to sum to 1), so thresholds derived here mean the same on the board."""
    from device_agent.inference.classify import probabilities_batch

    return probabilities_batch(scores, activation)


def _metrics(y: np.ndarray, pred: np.ndarray, classes: int) -> ModelMetrics:
    from sklearn.metrics import confusion_matrix, f1_score, precision_score, recall_score

    labels = list(range(classes))
    kw = dict(labels=labels, zero_division=0)
    return ModelMetrics(
        accuracy=float(np.mean(pred == y)),
        macro_f1=float(f1_score(y, pred, average="macro", **kw)),
        precision=tuple(float(v) for v in precision_score(y, pred, average=None, **kw)),
        recall=tuple(float(v) for v in recall_score(y, pred, average=None, **kw)),
        confusion=tuple(tuple(int(v) for v in row) for row in confusion_matrix(y, pred, labels=labels)),
    )


def derive_thresholds(probs: np.ndarray, y: np.ndarray) -> Thresholds:
    """The lowest confidence (and margin) at which accepted predictions reach the target accuracy.

    target = accuracy + (1 - accuracy) / 2, i.e. predictions at or above the
    threshold make at most half the errors of the model overall. Candidates
    are 0.30..0.95 (confidence) and 0.05..0.90 (margin) in steps of 0.05; when
    none reaches the target, the highest candidate is taken.
    """
    pred = probs.argmax(axis=1)
    correct = pred == y
    top2 = np.sort(probs, axis=1)[:, -2:] if probs.shape[1] > 1 else np.concatenate([np.zeros_like(probs), probs], 1)
    conf, margin = top2[:, 1], top2[:, 1] - top2[:, 0]
    acc = float(correct.mean())
    target = acc + (1.0 - acc) / 2.0

    def pick(values: np.ndarray, grid: np.ndarray) -> float:
        for t in grid:
            keep = values >= t
            if keep.any() and correct[keep].mean() >= target - 1e-12:
                return float(round(t, 2))
        return float(round(grid[-1], 2))

    t_conf = pick(conf, np.arange(0.30, 0.951, 0.05))
    t_margin = pick(margin, np.arange(0.05, 0.901, 0.05))
    accepted = (conf >= t_conf) & (margin >= t_margin)
    return Thresholds(
        confidence=t_conf,
        margin=t_margin,
        target_accuracy=round(target, 4),
        accepted_fraction=float(accepted.mean()),
        accepted_accuracy=float(correct[accepted].mean()) if accepted.any() else 0.0,
        flagged_accuracy=float(correct[~accepted].mean()) if (~accepted).any() else None,
    )


def _inputs(bundle: Bundle, data: Dataset, x: np.ndarray) -> np.ndarray:
    pre = bundle.manifest.preprocessing
    if pre.shape and tuple(pre.shape) != data.input_shape:
        raise DataError(
            f"data input shape={list(data.input_shape)} does not fit bundle {bundle.manifest.name}'s "
            f"shape={list(pre.shape)}; pass data of that shape"
        )
    classes = bundle.manifest.output.shape[-1]
    binary = classes == 1 and data.num_classes == 2  # one score: a sigmoid's probability or a logit
    if classes != data.num_classes and not binary:
        raise DataError(
            f"data has {data.num_classes} classes but bundle {bundle.manifest.name} outputs {classes} scores; "
            "pass the data the bundle was made for"
        )
    return (np.asarray(x, np.float32) * np.float32(pre.scale) + np.float32(pre.offset)).astype(np.float32)


def _float_tflite(float_model: Any, workdir: Path) -> Tuple[Path, Optional[int]]:
    """A float .tflite path for ``float_model`` (keras model, model path or .tflite) and its Keras file size."""
    from .load import load_model, model_file_size

    if isinstance(float_model, (str, os.PathLike)):
        p = Path(float_model)
        if p.suffix.lower() == ".tflite":
            if not p.is_file():
                raise ModelError(f"float model {p} does not exist; pass a .tflite, .keras, .h5 or SavedModel")
            return p, None
        size = model_file_size(p) if p.exists() else None
        float_model, keras_size = load_model(p), size
    else:
        keras_size = None
    from .quantize import to_tflite_float

    out = workdir / "float.tflite"
    out.write_bytes(to_tflite_float(float_model))
    return out, keras_size


def _open(path: os.PathLike | str, runtime: str) -> TFLiteModel:
    """TFLiteModel.open, without tf.lite's deprecation warning when the runtime is tensorflow."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated", category=UserWarning)
        return TFLiteModel.open(path, runtime=runtime)


def _latency(path: Path, which: str, runtimes: Sequence[str], x: np.ndarray, runs: int) -> list:
    rows = []
    for rt in runtimes:
        try:
            with _open(path, rt) as model:
                t = model.time_invoke(x, runs=runs, warmup=max(5, runs // 10))
        except Exception as exc:  # noqa: BLE001 - a runtime that cannot run this model is reported, not fatal
            log.warning("runtime %s cannot time %s model (%s)", rt, which, exc)
            continue
        rows.append(Latency(rt, which, float(np.median(t) * 1e3), float(np.percentile(t, 95) * 1e3), runs))
    return rows


def evaluate(
    bundle: os.PathLike | str | Bundle,
    data: Dataset,
    *,
    float_model: Any = None,
    baseline: Optional[os.PathLike | str] = None,
    runtimes: Optional[Sequence[str]] = None,
    output_dir: Optional[os.PathLike | str] = None,
    keras_size: Optional[int] = None,
    latency_runs: int = 200,
) -> EvalReport:
    """Evaluate ``bundle`` (int8) against ``float_model`` and a baseline on ``data``'s test split."""
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    m = b.manifest
    x = _inputs(b, data, data.x_test)
    y = data.y_test
    runtimes = list(runtimes) if runtimes else available_runtimes(include_tensorflow=True)
    if not runtimes:
        raise ModelError("no TFLite runtime is installed; pip install ai-edge-litert")
    with _open(b.model_path, runtimes[0]) as model:
        int8_scores = model.predict(x)
    probs = scores_to_probs(int8_scores, m.output_activation)
    int8_pred = probs.argmax(axis=1)
    int8 = _metrics(y, int8_pred, data.num_classes)
    sizes: Dict[str, Optional[int]] = {"int8_tflite": b.model_path.stat().st_size, "float_tflite": None, "keras_file": keras_size}
    latency = _latency(b.model_path, "int8", runtimes, x[0], latency_runs)
    flt: Optional[ModelMetrics] = None
    agreement: Optional[float] = None
    with tempfile.TemporaryDirectory(prefix="edgekit-eval-") as tmp:
        if float_model is not None:
            fpath, ksize = _float_tflite(float_model, Path(tmp))
            sizes["float_tflite"] = fpath.stat().st_size
            if ksize is not None:
                sizes["keras_file"] = ksize
            with _open(fpath, runtimes[0]) as fm:
                float_pred = fm.predict(x).argmax(axis=1)
            flt = _metrics(y, float_pred, data.num_classes)
            agreement = float(np.mean(float_pred == int8_pred))
            latency += _latency(fpath, "float", runtimes, x[0], latency_runs)
            diagnosis = _diagnose(fpath, runtimes[0], data, m, flt.accuracy)
        else:
            diagnosis = _diagnose(b.model_path, runtimes[0], data, m, int8.accuracy)
    if baseline is not None:
        ob = load_bundle(baseline)
        with _open(ob.model_path, runtimes[0]) as om:
            base_pred = om.predict(_inputs(ob, data, data.x_test)).argmax(axis=1)
        base = Baseline("bundle", f"{ob.manifest.name} v{ob.manifest.version}", float(np.mean(base_pred == y)))
    else:
        majority = int(np.bincount(data.y_train, minlength=data.num_classes).argmax())
        base = Baseline("majority", f"always '{data.labels[majority]}'", float(np.mean(y == majority)))
    report = EvalReport(
        bundle=str(b.path),
        name=m.name,
        version=m.version,
        quantization=dict(m.quantization),
        data=data.name,
        test_size=int(len(y)),
        labels=tuple(data.labels),
        int8=int8,
        float=flt,
        agreement=agreement,
        sizes=sizes,
        latency=tuple(latency),
        baseline=base,
        thresholds=derive_thresholds(probs, y),
        diagnosis=diagnosis,
    )
    if diagnosis:
        log.warning("%s", diagnosis)
    if output_dir is not None:
        report.write(output_dir)
    return report


def _diagnose(path: Path, runtime: str, data: Dataset, manifest: Any, accuracy: float) -> Optional[str]:
    """:func:`edgekit.convert.inputs.diagnose` with the model at ``path`` against the majority baseline."""
    from .inputs import DIAGNOSE_MARGIN, diagnose

    majority = int(np.bincount(data.y_train, minlength=data.num_classes).argmax())
    baseline = float(np.mean(data.y_test == majority))
    if accuracy >= baseline + DIAGNOSE_MARGIN:
        return None
    with _open(path, runtime) as model:
        return diagnose(model.predict, data.x_test, data.y_test, manifest.preprocessing, data.labels, baseline, accuracy)
