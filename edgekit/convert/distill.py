"""Knowledge distillation: a small student learns from a big teacher's softened outputs, then becomes a bundle.

``distill(teacher, data, student="tiny", output="bundles/tiny-v1", mode="qat")``

1. checks that the student and the teacher both fit the data (input shape, one score per class);
2. computes the teacher's logits on the training split once (a softmax teacher's
   probabilities become logits by their logarithm: softmax is unchanged by a constant shift);
3. trains two copies of the student from the *same* initial weights, for the same
   epochs on the same data: the **control** on the true labels alone, the
   **distilled** student on the Hinton loss (:class:`HintonLoss`)::

       loss = alpha * CE(y, softmax(s)) + (1 - alpha) * T^2 * KL(softmax(t / T) || softmax(s / T))

   (``s``, ``t`` the student's and the teacher's logits; the ``T^2`` keeps the soft
   term's gradients on the scale of the hard one as ``T`` changes, Hinton et al. 2015);
4. converts the distilled student to an int8 bundle with :func:`edgekit.convert.convert`
   (the same QAT / PTQ, report and manifest as ``edgekit convert``), and adds a
   *Distillation* section to the report: teacher (float), control (float) and
   distilled student (float and int8) side by side, with a verdict that says
   whether distillation beat training the student alone.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..data import Dataset
from ..errors import ConversionError, DataError, ModelError

__all__ = [
    "STUDENTS",
    "DEFAULT_TEMPERATURE",
    "DEFAULT_ALPHA",
    "DEFAULT_EPOCHS",
    "Arm",
    "DistillResult",
    "HintonLoss",
    "hinton_loss",
    "teacher_logits",
    "build_student",
    "distill",
]

log = logging.getLogger(__name__)

#: Built-in students: ``example`` is the example CNN (or MobileNetV2 alpha 0.35 for images of 32x32 and more),
#: ``tiny`` the same at about a quarter of the filters (MobileNetV2 alpha 0.1).
STUDENTS = ("example", "tiny")
DEFAULT_TEMPERATURE = 2.0
DEFAULT_ALPHA = 0.5
DEFAULT_EPOCHS = 30
#: Probabilities are clipped here before their logarithm (float32's smallest normal number is 1.2e-38).
_TINY = 1e-30


def _logits_of(out: Any, activation: str) -> Any:
    """Logits from a model's output tensor: itself, or the log of its probabilities (softmax's shift invariance)."""
    from .._keras import tf

    if activation == "logits":
        return out
    return tf.math.log(tf.clip_by_value(out, _TINY, 1.0))


def hinton_loss(labels: Any, teacher: Any, student: Any, *, temperature: float, alpha: float) -> Any:
    """Per-example Hinton loss from class indices and the teacher's and the student's logits."""
    from .._keras import tf

    t = float(temperature)
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    hard = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=student)
    p_teacher = tf.nn.softmax(teacher / t, axis=-1)
    kl = tf.reduce_sum(
        p_teacher * (tf.nn.log_softmax(teacher / t, axis=-1) - tf.nn.log_softmax(student / t, axis=-1)), axis=-1
    )
    return float(alpha) * hard + (1.0 - float(alpha)) * (t * t) * kl


def _check_hyper(temperature: float, alpha: float, epochs: int) -> None:
    if not np.isfinite(temperature) or temperature <= 0:
        raise ConversionError(f"temperature={temperature} must be > 0 (1 = the teacher's own probabilities; 2..10 is usual)")
    if not 0.0 <= alpha <= 1.0:
        raise ConversionError(f"alpha={alpha} must be within [0, 1] (the weight of the true labels; the soft targets get 1 - alpha)")
    if epochs < 1:
        raise ConversionError(f"epochs={epochs} must be >= 1")


def HintonLoss(temperature: float = DEFAULT_TEMPERATURE, alpha: float = DEFAULT_ALPHA, student_activation: str = "softmax") -> Any:
    """A Keras loss for ``fit(x, y_packed)``, ``y_packed = [label, teacher logits...]`` per row.

    ``student_activation`` says whether the student's outputs are ``logits`` or ``softmax``
    probabilities (then their logarithm serves as logits).
    """
    from .._keras import keras

    _check_hyper(temperature, alpha, 1)

    class _Hinton(keras.losses.Loss):
        def call(self, y_true: Any, y_pred: Any) -> Any:
            return hinton_loss(
                y_true[:, 0], y_true[:, 1:], _logits_of(y_pred, student_activation), temperature=temperature, alpha=alpha
            )

    return _Hinton(name="hinton")


def teacher_logits(teacher: Any, x: np.ndarray, activation: str, batch_size: int = 256) -> np.ndarray:
    """The teacher's logits on model inputs ``x`` (inference mode)."""
    out = np.asarray(teacher.predict(x, batch_size=batch_size, verbose=0), dtype=np.float64)
    if activation != "logits":
        out = np.log(np.clip(out, _TINY, 1.0))
    return out.astype(np.float32)


def _top1(y_true: Any, y_pred: Any) -> Any:
    """Accuracy on packed targets (the label is column 0), for the progress bar."""
    from .._keras import tf

    return tf.cast(tf.equal(tf.cast(y_true[:, 0], tf.int64), tf.argmax(y_pred, axis=-1)), tf.float32)


# --- students -----------------------------------------------------------------------------------------------------


def _mobilenet(data: Dataset, alpha: float, seed: int) -> Any:
    from .._keras import keras
    from ..models import seed_everything

    seed_everything(seed)
    return keras.applications.MobileNetV2(
        input_shape=tuple(data.input_shape), alpha=alpha, include_top=True, weights=None, classes=data.num_classes,
        classifier_activation="softmax",
    )


def build_student(spec: str, data: Dataset, *, seed: int = 0) -> Any:
    """A built-in student for ``data`` (``example`` or ``tiny``), or the Keras model in file ``spec``.

    Small images (under 32x32, like the digits) get the example CNN: ``example`` at full width
    (85k parameters on digits), ``tiny`` at a quarter of its filters (5.5k). Images of 32x32 and
    more get MobileNetV2 (``weights=None``): alpha 0.35 (``example``), alpha 0.1 (``tiny``, a
    quarter of the parameters).
    """
    from ..models import digits_cnn
    from .load import load_model

    if spec not in STUDENTS:
        try:
            return load_model(spec)
        except ModelError as exc:
            raise ModelError(f"student: {exc}") from exc
    shape = tuple(data.input_shape)
    if len(shape) != 3:
        raise DataError(
            f"the built-in students take images (height, width, channels) but the data's inputs have shape={list(shape)}; "
            "pass your own student model file (--student FILE)"
        )
    if min(shape[:2]) >= 32 and shape[2] in (1, 3):
        model = _mobilenet(data, 0.35 if spec == "example" else 0.1, seed)
    else:
        model = digits_cnn(num_classes=data.num_classes, input_shape=shape, seed=seed, width=32 if spec == "example" else 8)
    if spec == "tiny":
        model._name = f"{model.name}_tiny"  # noqa: SLF001 - Keras 2 names are set at construction only
    return model


def _check_student(student: Any, data: Dataset) -> None:
    name = getattr(student, "name", "?")
    try:
        in_shape, out_shape = student.input_shape, student.output_shape
    except (AttributeError, RuntimeError):
        raise ModelError(f"student {name} is a subclassed model without static shapes; save it as a Sequential or functional model") from None
    if isinstance(in_shape, list) or isinstance(out_shape, list):
        raise ModelError(f"student {name} has several inputs or outputs; a student is a classifier with one of each")
    expected = tuple(in_shape[1:])
    if len(expected) != len(data.input_shape) or any(d is not None and d != g for d, g in zip(expected, data.input_shape)):
        raise DataError(
            f"student {name} takes inputs of shape={list(expected)} but the data's are shape={list(data.input_shape)}; "
            "build the student for the data's input shape"
        )
    if out_shape[-1] != data.num_classes:
        raise DataError(
            f"student {name} outputs {out_shape[-1]} scores but the teacher and the data have {data.num_classes} classes; "
            "give the student one output per class"
        )


def _check_teacher(teacher: Any, data: Dataset) -> None:
    from .quantize import check_fits

    try:
        check_fits(teacher, data)
    except (DataError, ModelError) as exc:
        raise type(exc)(f"teacher {getattr(teacher, 'name', '?')}: {exc}") from exc


# --- the comparison -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arm:
    """One model of the comparison: the teacher, the student alone (control), or the distilled student."""

    role: str  # "teacher" | "control" | "distilled"
    name: str
    precision: str  # "float" | "int8"
    params: int
    accuracy: float
    macro_f1: float
    tflite_bytes: int
    download_bytes: Optional[int]
    latency_ms: Dict[str, float]  # runtime -> median ms per inference


@dataclass(frozen=True)
class DistillResult:
    bundle_path: Path
    manifest: Any
    report: Any  # EvalReport, with the "distillation" section
    arms: Tuple[Arm, ...]
    beats_control: bool
    fallbacks: Tuple[Tuple[str, str], ...]
    #: the float Keras models: the (trained) teacher, the student trained alone, the distilled student
    teacher_model: Any = None
    control_model: Any = None
    student_model: Any = None

    def arm(self, role: str, precision: str = "float") -> Arm:
        return next(a for a in self.arms if a.role == role and a.precision == precision)


def _verdict(arms: Sequence[Arm], temperature: float, alpha: float) -> Tuple[bool, str]:
    by = {(a.role, a.precision): a for a in arms}
    d, c = by[("distilled", "float")], by[("control", "float")]
    delta = 100 * (d.accuracy - c.accuracy)
    if d.accuracy > c.accuracy:
        return True, (f"Distillation **beats** the student trained alone: float top-1 {100 * d.accuracy:.2f}% vs "
                      f"{100 * c.accuracy:.2f}% (**{delta:+.2f} points**), macro F1 {d.macro_f1:.4f} vs {c.macro_f1:.4f}.")
    return False, (
        f"Distillation does **NOT** beat the student trained alone: float top-1 {100 * d.accuracy:.2f}% vs "
        f"{100 * c.accuracy:.2f}% (**{delta:+.2f} points**), macro F1 {d.macro_f1:.4f} vs {c.macro_f1:.4f}. "
        f"On this data the student learns as much from the labels alone: convert the student trained alone "
        f"(`edgekit convert`), or try another temperature (now {temperature:g}) or alpha (now {alpha:g}), "
        "more epochs, or a stronger teacher."
    )


def _section(arms: Sequence[Arm], *, teacher: Any, student: Any, temperature: float, alpha: float, epochs: int,
             learning_rate: float, runtimes: Sequence[str]) -> Any:
    from .evaluate import Section

    by = {(a.role, a.precision): a for a in arms}
    t, bundle = by[("teacher", "float")], by[("distilled", "int8")]
    beats, verdict = _verdict(arms, temperature, alpha)
    ratio = t.params / max(1, bundle.params)
    gap = 100 * (bundle.accuracy - t.accuracy)
    labels = {("teacher", "float"): "teacher, float", ("control", "float"): "student alone, float (control)",
              ("distilled", "float"): "distilled student, float", ("distilled", "int8"): "**distilled student, int8 (this bundle)**"}
    lines = [
        f"Teacher `{teacher.name}` ({t.params:,} parameters) -> student `{student.name}` ({bundle.params:,} parameters, "
        f"1/{ratio:.1f} of the teacher). The student was trained twice from the same initial weights, for {epochs} epochs "
        f"on the same data: alone on the true labels (the control), and distilled: Hinton loss at temperature {temperature:g}, "
        f"weight {alpha:g} on the true labels and {1 - alpha:g} on the teacher's softened outputs (scaled by T^2), "
        f"Adam at {learning_rate:g}.",
        "",
        "| model | parameters | top-1 | macro F1 | model.tflite bytes | download bytes |",
        "|---|---|---|---|---|---|",
    ]
    for a in arms:
        lines.append(f"| {labels[(a.role, a.precision)]} | {a.params:,} | {100 * a.accuracy:.2f}% | {a.macro_f1:.4f} | "
                     f"{a.tflite_bytes:,} | {'n/a' if a.download_bytes is None else f'{a.download_bytes:,}'} |")
    lines += ["", verdict, "",
              f"This bundle is **{gap:+.2f} points** from the float teacher at **1/{ratio:.1f}** of its parameters "
              f"({'within' if gap >= -1.0 else 'NOT within'} 1 point).", ""]
    if runtimes:
        lines += ["Latency per inference (median ms, one thread, measured side by side):", "",
                  "| runtime | " + " | ".join(labels[(a.role, a.precision)].strip("*").replace(" (this bundle)", "")
                                             .replace(" (control)", "") for a in arms) + " |",
                  "|---|" + "---|" * len(arms)]
        for rt in runtimes:
            cells = [f"{a.latency_ms[rt]:.4f}" if rt in a.latency_ms else "n/a" for a in arms]
            lines.append(f"| {rt} | " + " | ".join(cells) + " |")
    data = {
        "teacher": teacher.name,
        "student": student.name,
        "temperature": float(temperature),
        "alpha": float(alpha),
        "epochs": int(epochs),
        "learning_rate": float(learning_rate),
        "arms": [a.__dict__ for a in arms],
        "beats_control": beats,
        "points_vs_control_float": round(100 * (by[("distilled", "float")].accuracy - by[("control", "float")].accuracy), 4),
        "points_vs_teacher_int8": round(gap, 4),
        "parameter_ratio": round(ratio, 4),
    }
    return Section("distillation", "Distillation", data, "\n".join(lines)), beats


def _evaluate_arms(
    models: Sequence[Tuple[str, str, Any]],
    bundle_dir: Path,
    name: str,
    data: Dataset,
    runtimes: Sequence[str],
    latency_runs: int = 200,
) -> Tuple[Arm, ...]:
    """Float arms (role, precision "float", Keras model) through their float TFLite, and the bundle's int8,
    on the board's interpreter: accuracy, F1, bytes, and latency timed side by side per runtime."""
    from .evaluate import _latency, _metrics, _open
    from .prune_measure import download_bytes
    from .quantize import to_tflite_float

    x = data.model_inputs(data.x_test)
    paths: List[Tuple[str, str, Any, Path]] = []
    with tempfile.TemporaryDirectory(prefix="edgekit-distill-") as tmp:
        for role, precision, model in models:
            path = Path(tmp) / f"{role}.tflite"
            path.write_bytes(to_tflite_float(model))
            paths.append((role, precision, model, path))
        paths.append(("distilled", "int8", models[-1][2], bundle_dir / "model.tflite"))
        latency: Dict[Tuple[str, str], Dict[str, float]] = {(r, p): {} for r, p, _, _ in paths}
        for rt in runtimes:  # one runtime at a time, every model in turn: the same machine state for all
            for role, precision, _, path in paths:
                rows = _latency(path, precision, [rt], x[0], latency_runs)
                if rows:
                    latency[(role, precision)][rt] = rows[0].median_ms
        arms = []
        for role, precision, model, path in paths:
            with _open(path, runtimes[0]) as m:
                pred = m.predict(x).argmax(axis=1)
            metrics = _metrics(data.y_test, pred, data.num_classes)
            arms.append(Arm(
                role=role, name=model.name, precision=precision, params=int(model.count_params()),
                accuracy=metrics.accuracy, macro_f1=metrics.macro_f1, tflite_bytes=path.stat().st_size,
                download_bytes=download_bytes(bundle_dir, name) if precision == "int8" else None,
                latency_ms=latency[(role, precision)],
            ))
    return tuple(arms)


def distill(
    teacher: Any,
    data: Dataset,
    *,
    output: os.PathLike | str,
    student: Any = "tiny",
    mode: str = "qat",
    temperature: float = DEFAULT_TEMPERATURE,
    alpha: float = DEFAULT_ALPHA,
    epochs: int = DEFAULT_EPOCHS,
    learning_rate: float = 1e-3,
    batch_size: int = 32,
    teacher_epochs: int = 15,
    qat_epochs: int = 3,
    calibration_samples: int = 200,
    name: Optional[str] = None,
    version: str = "1",
    labels: Optional[Sequence[str] | str] = None,
    baseline: Optional[os.PathLike | str] = None,
    force: bool = False,
    fallback: str = "ptq",
    progress: bool = True,
    runtimes: Optional[Sequence[str]] = None,
    seed: int = 0,
    input_range: Optional[str] = None,
    mean: Optional[float] = None,
    std: Optional[float] = None,
) -> DistillResult:
    """Distill ``teacher`` (a Keras model, a model file, or ``"example"``) into ``student`` (``"example"``,
    ``"tiny"``, a model file or a Keras model) on ``data``, and convert the student to an int8 bundle at ``output``.

    Inputs follow the teacher (edgekit.convert.inputs): a teacher that normalizes its own input (the tutorials'
    Rescaling at the start) has it moved out and everyone, teacher, control and student, is fed raw pixels mapped as
    it did; ``input_range`` or ``mean``/``std`` override that, as in `edgekit convert`. The student's bundle keeps
    that recipe."""
    from device_agent.inference.interpreter import available_runtimes
    from device_agent.update.manifest import load_bundle, read_labels

    from .._keras import keras
    from ..models import digits_cnn, seed_everything, train
    from .bundle import check_output
    from .load import load_model
    from .pipeline import MODES, convert
    from .quantize import output_activation

    _check_hyper(temperature, alpha, epochs)
    if mode not in MODES:
        raise ConversionError(f"mode={mode!r} is not supported; use 'qat' or 'ptq'")
    if teacher_epochs < 0 or qat_epochs < 0:
        raise ConversionError(f"teacher_epochs={teacher_epochs} and qat_epochs={qat_epochs} must be >= 0")
    if batch_size < 1 or not learning_rate > 0:
        raise ConversionError(f"batch_size={batch_size} must be >= 1 and learning_rate={learning_rate} > 0")
    output = check_output(output, force)
    if baseline is not None:
        load_bundle(baseline)  # a bad baseline fails before the slow work
    label_names = read_labels(labels)
    if label_names:
        data = data.with_labels(label_names)
    started = time.perf_counter()

    # every check before any training
    student_model = student if not isinstance(student, (str, os.PathLike)) else build_student(str(student), data, seed=seed)
    _check_student(student_model, data)
    if isinstance(teacher, str) and teacher == "example":
        if len(data.input_shape) == 3 and min(data.input_shape[:2]) >= 32 and data.input_shape[2] in (1, 3):
            teacher_model = _mobilenet(data, 0.35, seed)
        else:
            teacher_model = digits_cnn(num_classes=data.num_classes, input_shape=data.input_shape, seed=seed)
        train_teacher = True
    elif isinstance(teacher, (str, os.PathLike)):
        try:
            teacher_model = load_model(teacher)
        except ModelError as exc:
            raise ModelError(f"teacher: {exc}") from exc
        train_teacher = False
    else:
        teacher_model, train_teacher = teacher, False
    _check_teacher(teacher_model, data)
    from dataclasses import replace

    from .pipeline import _inputs

    teacher_model, choice = _inputs(teacher_model, data, input_range, mean, std, follow_model=True)
    data = replace(data, preprocessing=choice.preprocessing)
    log.info("input (from the teacher): %s", choice.detail)
    try:
        init = student_model.get_weights()
        control = keras.models.clone_model(student_model)
        control.set_weights(init)
    except Exception as exc:  # noqa: BLE001 - a subclassed student cannot be cloned
        raise ModelError(
            f"student {student_model.name} cannot be copied for the control run ({type(exc).__name__}); "
            "save it as a Sequential or functional model"
        ) from exc
    if train_teacher:
        log.info("training the example teacher (%s parameters) for %d epochs", f"{teacher_model.count_params():,}", teacher_epochs)
        train(teacher_model, data, teacher_epochs, seed=seed, progress=progress)

    t_act = output_activation(teacher_model, data)
    s_act = output_activation(student_model, data)
    x = data.model_inputs(data.x_train)
    soft = teacher_logits(teacher_model, x, t_act)
    packed = np.concatenate([data.y_train[:, None].astype(np.float32), soft], axis=1)

    log.info("control: student %s alone on the labels, %d epochs", control.name, epochs)
    train(control, data, epochs, batch_size=batch_size, learning_rate=learning_rate, seed=seed, progress=progress,
          from_logits=s_act == "logits")
    log.info("distilling %s into %s: T=%g, alpha=%g, %d epochs", teacher_model.name, student_model.name, temperature, alpha, epochs)
    seed_everything(seed)
    student_model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                          loss=HintonLoss(temperature, alpha, s_act), metrics=[_top1])
    student_model.fit(x, packed, epochs=int(epochs), batch_size=int(batch_size), shuffle=True, verbose=1 if progress else 0)
    distilled = keras.models.clone_model(student_model)  # the same weights, without the training-only loss
    distilled.set_weights(student_model.get_weights())
    student_model = distilled

    rts = list(runtimes) if runtimes else available_runtimes(include_tensorflow=True)
    found: Dict[str, Any] = {}

    def sections(bundle_dir: Path, bundle_name: str, rep: Any) -> List[Any]:
        arms = _evaluate_arms([("teacher", "float", teacher_model), ("control", "float", control),
                               ("distilled", "float", student_model)], bundle_dir, bundle_name, data, rts)
        section, beats = _section(arms, teacher=teacher_model, student=student_model, temperature=temperature,
                                  alpha=alpha, epochs=epochs, learning_rate=learning_rate, runtimes=rts)
        found.update(arms=arms, beats=beats)
        return [section]

    result = convert(
        student_model, data, mode=mode, output=output, epochs=qat_epochs, calibration_samples=calibration_samples,
        name=name or student_model.name, version=version, baseline=baseline, force=force, fallback=fallback,
        progress=progress, runtimes=rts, seed=seed, sections=sections, follow_model=False,
    )
    log.info("distilled in %.1fs", time.perf_counter() - started)
    return DistillResult(result.bundle_path, result.manifest, result.report, found["arms"], found["beats"], result.fallbacks,
                         teacher_model=teacher_model, control_model=control, student_model=student_model)
