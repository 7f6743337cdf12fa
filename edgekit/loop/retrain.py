"""Retrain: the float model, fine-tuned on the original data plus what the fleet flagged.

``retrain(bundle, float_model=..., data=..., feedback=store_url, output=...)``

1. reads the current bundle (its labels, version and model), the float model it
   came from, the original data set and the *labeled* samples of the store;
2. splits the feedback into train and held-out by a hash of each sample id, so
   the split is deterministic and a sample held out once stays held out when
   more feedback arrives;
3. fine-tunes a copy of the float model on original train + feedback train
   (:func:`fine_tune`: the feedback is repeated so it makes up
   ``feedback_share`` of every epoch; the first ``freeze`` layers can be frozen);
4. runs QAT and the int8 conversion through :func:`edgekit.convert.convert`
   with the version bumped, with the current bundle as the baseline to beat;
5. compares new and current int8 models, through the board's own interpreter,
   on the original test split and on the held-out feedback separately, and
   writes the verdict (``promote`` or ``do not promote`` with the reason) to
   ``retrain.md`` / ``retrain.json`` in the new bundle, beside ``float_model.keras``
   (the start of the next retrain).

Nothing is left behind on failure: everything is built in a staging directory
next to ``output`` and moved into place at the end.
"""

from __future__ import annotations

import hashlib
import logging
import re
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..convert.bundle import FLOAT_MODEL_NAME
from ..errors import DataError, ModelError

__all__ = ["Feedback", "Verdict", "RetrainResult", "bump_version", "load_feedback", "split_feedback", "fine_tune",
           "judge", "retrain", "write_reports", "bundle_accuracy", "FLOAT_MODEL_NAME"]

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Feedback:
    """Labeled samples from the store, in raw units, with class indices."""

    x: np.ndarray
    y: np.ndarray
    ids: Tuple[str, ...]

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, mask: np.ndarray) -> "Feedback":
        return Feedback(self.x[mask], self.y[mask], tuple(i for i, m in zip(self.ids, mask) if m))


@dataclass(frozen=True)
class Verdict:
    promote: bool
    reason: str

    @property
    def word(self) -> str:
        return "promote" if self.promote else "do not promote"


@dataclass(frozen=True)
class RetrainResult:
    bundle_path: Path
    float_model_path: Path
    version: str
    previous_version: str
    verdict: Verdict
    metrics: Mapping[str, Mapping[str, Optional[float]]]  # {"current"|"new": {"test", "feedback", "combined"}}
    counts: Mapping[str, int]
    report_path: Path
    seconds: float = 0.0
    details: Mapping[str, Any] = field(default_factory=dict)


def bump_version(version: str) -> str:
    """The next version: the last number goes up by one (``1`` -> ``2``, ``1.3`` -> ``1.4``, ``v7`` -> ``v8``)."""
    match = re.search(r"(\d+)(?!.*\d)", version)
    if not match:
        raise DataError(f"version {version!r} has no number to bump; pass --version")
    return version[: match.start()] + str(int(match.group(1)) + 1) + version[match.end():]


def load_feedback(store_url: str, labels: Sequence[str], preprocessing: Any) -> Feedback:
    """Every labeled sample of the store as model-shaped raw inputs and class indices.

    Labels are class names; one that is not in ``labels`` is an error naming it.
    """
    from device_agent.inference.preprocess import preprocess

    from .store import INVALID_LABEL, open_store

    with open_store(store_url) as store:
        records = [r for r in store.list_samples(labeled=True) if r.label != INVALID_LABEL]  # "none of these": no class
    if not records:
        raise DataError(f"store {store_url} has no labeled samples; label some with `edgekit samples label` first")
    index = {name: i for i, name in enumerate(labels)}
    unknown = sorted({r.label for r in records if r.label not in index})
    if unknown:
        raise DataError(
            f"label {unknown[0]!r} in store {store_url} is not one of the bundle's labels {list(labels)}"
            + (f" ({len(unknown)} unknown labels in all)" if len(unknown) > 1 else "")
            + "; relabel those samples with `edgekit samples label`"
        )
    # Bring each raw input to the model's raw shape with the board's own recipe,
    # then back to raw units (the recipe's scale/offset), so feedback and
    # original data share one preprocessing.
    pre = preprocessing
    xs = []
    for r in records:
        try:
            model_in = preprocess(r.array(), pre)
        except Exception as exc:  # InputError, shape mismatch
            raise DataError(f"sample {r.sample_id} does not fit the model ({exc}); remove or relabel it") from exc
        xs.append((model_in - np.float32(pre.offset)) / np.float32(pre.scale))
    x = np.stack(xs).astype(np.float32)
    y = np.array([index[r.label] for r in records], dtype=np.int64)
    return Feedback(x, y, tuple(r.sample_id for r in records))


def _unit_hash(sample_id: str) -> float:
    return int.from_bytes(hashlib.sha256(sample_id.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_feedback(feedback: Feedback, holdout_fraction: float) -> Tuple[Feedback, Feedback]:
    """(train, held-out) by a hash of the sample id: deterministic and stable as feedback grows.

    With at least two samples and a non-zero fraction, each side gets at least one.
    """
    if not 0.0 <= holdout_fraction < 1.0:
        raise DataError(f"holdout_fraction={holdout_fraction} must be within [0, 1)")
    h = np.array([_unit_hash(i) for i in feedback.ids])
    held = h < holdout_fraction
    if holdout_fraction > 0 and len(h) >= 2:
        if not held.any():
            held[int(np.argmin(h))] = True
        if held.all():
            held[int(np.argmax(h))] = False
    return feedback.take(~held), feedback.take(held)


def fine_tune(
    model: Any,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_feedback: np.ndarray,
    y_feedback: np.ndarray,
    *,
    epochs: int = 10,
    freeze: int = 0,
    feedback_share: float = 0.5,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    from_logits: bool = False,
    seed: int = 0,
    progress: bool = False,
) -> Tuple[Any, Dict[str, Any]]:
    """A fine-tuned copy of ``model`` (inputs are model inputs, already scaled).

    The feedback is repeated ``k`` times, ``k`` chosen so it makes up about
    ``feedback_share`` of each epoch (at least once); the first ``freeze``
    layers keep their weights. Returns the new model and what was done.
    """
    from .._keras import keras
    from ..models import seed_everything

    if epochs < 0:
        raise DataError(f"epochs={epochs} must be >= 0")
    if not 0.0 <= feedback_share < 1.0:
        raise DataError(f"feedback_share={feedback_share} must be within [0, 1)")
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    if not 0 <= freeze <= len(layers):
        raise DataError(f"freeze={freeze} but the model has {len(layers)} layers; pass 0..{len(layers)}")
    seed_everything(seed)
    tuned = keras.models.clone_model(model)
    tuned.set_weights(model.get_weights())
    tuned_layers = [layer for layer in tuned.layers if not isinstance(layer, keras.layers.InputLayer)]
    for layer in tuned_layers[:freeze]:
        layer.trainable = False
    n_fb = len(x_feedback)
    repeats = 1
    if n_fb and feedback_share > 0:
        wanted = feedback_share * len(x_train) / (1.0 - feedback_share)
        repeats = max(1, int(round(wanted / n_fb)))
    xs = [x_train] + [x_feedback] * (repeats if n_fb else 0)
    ys = [y_train] + [y_feedback] * (repeats if n_fb else 0)
    x = np.concatenate(xs).astype(np.float32)
    y = np.concatenate(ys).astype(np.int64)
    tuned.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits),
        metrics=["accuracy"],
    )
    if epochs:
        tuned.fit(x, y, epochs=int(epochs), batch_size=int(batch_size), shuffle=True, verbose=1 if progress else 0)
    info = {
        "epochs": int(epochs),
        "frozen_layers": [layer.name for layer in tuned_layers[:freeze]],
        "feedback_samples": int(n_fb),
        "feedback_repeats": int(repeats if n_fb else 0),
        "feedback_share": round(float(n_fb * repeats / len(x)) if n_fb else 0.0, 4),
        "learning_rate": float(learning_rate),
        "examples_per_epoch": int(len(x)),
    }
    return tuned, info


def bundle_accuracy(bundle_path: Path, x_raw: np.ndarray, y: np.ndarray) -> Optional[float]:
    """Top-1 accuracy of an int8 bundle through the board's interpreter and preprocessing."""
    from device_agent.inference.classify import classify
    from device_agent.inference.interpreter import TFLiteModel
    from device_agent.update.manifest import load_bundle
    from device_agent.inference.preprocess import preprocess

    if len(y) == 0:
        return None
    bundle = load_bundle(bundle_path)
    m = bundle.manifest
    with TFLiteModel.open(bundle.model_path) as model:
        hits = 0
        for raw, truth in zip(x_raw, y):
            pred = classify(model(preprocess(raw, m.preprocessing)), m.labels, m.output_activation)
            hits += int(pred.index == int(truth))
    return hits / len(y)


def judge(current: Mapping[str, Optional[float]], new: Mapping[str, Optional[float]], *,
          max_regression: float = 1.0) -> Verdict:
    """Promote when the new model is better on the held-out feedback (the data it was retrained for)
    and loses at most ``max_regression`` points on the original test split."""
    def pts(v: float) -> str:
        return f"{100 * v:.1f}%"

    drop = 100 * (current["test"] - new["test"])
    test_part = f"original test {pts(current['test'])} -> {pts(new['test'])}"
    if drop > max_regression:
        return Verdict(False, f"{test_part}: it lost {drop:.2f} points, more than the {max_regression:g} allowed")
    if new.get("feedback") is None:
        better = new["test"] > current["test"]
        return Verdict(better, f"no held-out feedback to judge on; {test_part} "
                               + ("improved" if better else "did not improve"))
    fb_part = f"held-out feedback {pts(current['feedback'])} -> {pts(new['feedback'])}"
    if new["feedback"] > current["feedback"]:
        return Verdict(True, f"{fb_part}, and {test_part} (at most {max_regression:g} point"
                               f"{'' if max_regression == 1 else 's'} may be lost)")
    return Verdict(False, f"{fb_part}: no better on the data it was retrained for ({test_part})")


def _pct(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def write_reports(directory: Path, *, verdict: Verdict, metrics: Mapping[str, Mapping[str, Optional[float]]],
                  counts: Mapping[str, int], details: Mapping[str, Any]) -> None:
    """``retrain.json`` (everything) and ``retrain.md`` (what a person reads) in ``directory``."""
    import json

    doc = {"schema": "edgekit.loop.retrain/1", "verdict": verdict.word, "promote": verdict.promote,
           "reason": verdict.reason, "accuracy": metrics, "counts": dict(counts), **details}
    (directory / "retrain.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    cur, new = details["current"], details["new"]
    tune = details["fine_tune"]
    rows = [("original test split", "test", counts["original_test"]),
            ("held-out feedback (what the fleet flagged)", "feedback", counts["feedback_holdout"]),
            ("both together", "combined", counts["original_test"] + counts["feedback_holdout"])]
    lines = [
        f"# Retrain: version {cur['version']} -> {new['version']}",
        "",
        f"**Verdict: {verdict.word}.** {verdict.reason[0].upper() + verdict.reason[1:]}.",
        "",
        f"The current bundle (version {cur['version']}, sha256 `{cur['sha256'][:12]}`) is the baseline to beat; "
        f"the new one is version {new['version']}, sha256 `{new['sha256'][:12]}`. Both int8 models run through "
        "the board's own interpreter and preprocessing.",
        "",
        f"| held-out set | inputs | current v{cur['version']} | new v{new['version']} | change |",
        "|---|---:|---:|---:|---:|",
    ]
    for title, key, n in rows:
        c, w = metrics["current"][key], metrics["new"][key]
        change = "n/a" if c is None or w is None else f"{100 * (w - c):+.1f} points"
        lines.append(f"| {title} | {n} | {_pct(c)} | {_pct(w)} | {change} |")
    lines += [
        "",
        "## How it was trained",
        "",
        f"- Fine-tuned from `{details['float_model']}` for {tune['epochs']} epochs on {counts['original_train']} "
        f"original training inputs plus {counts['feedback_train']} labeled feedback samples; the feedback was "
        f"repeated x{tune['feedback_repeats']} so it made up {100 * tune['feedback_share']:.0f}% of each epoch.",
        f"- Frozen layers: {', '.join(tune['frozen_layers']) or 'none'}.",
        f"- Then quantization-aware training for {details['qat_epochs']} epochs on the same mix and full int8 conversion "
        "(see `report/report.md` for float vs int8 and the comparison with the current bundle).",
        f"- Feedback split by a hash of each sample id: {counts['feedback_train']} to train, "
        f"{counts['feedback_holdout']} held out ({100 * details['holdout_fraction']:.0f}% asked); "
        "the ids are listed in `retrain.json`.",
        f"- The float model is saved as `{FLOAT_MODEL_NAME}` here: pass it as `--float-model` to the next retrain.",
        "",
    ]
    (directory / "retrain.md").write_text("\n".join(lines), encoding="utf-8")


def retrain(
    bundle: str | Path,
    *,
    float_model: Optional[str | Path] = None,
    data: str,
    feedback: str,
    output: str | Path,
    epochs: int = 10,
    freeze: int = 0,
    holdout_fraction: float = 0.3,
    feedback_share: float = 0.5,
    learning_rate: float = 1e-3,
    qat_epochs: int = 3,
    version: Optional[str] = None,
    max_regression: float = 1.0,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
) -> RetrainResult:
    """Fine-tune on original + labeled feedback, QAT to int8, compare with the current bundle.

    ``float_model`` defaults to the ``float_model.keras`` that `edgekit convert` and `edgekit retrain`
    keep inside the bundle directory.
    """
    from device_agent.update.manifest import load_bundle

    from ..convert.bundle import atomic_dir, check_output
    from ..convert.pipeline import convert, load_model
    from ..data import Dataset, is_image_folder, load_dataset
    from ..convert.quantize import check_fits

    t0 = time.perf_counter()
    output = Path(output)
    check_output(output, force)
    current = load_bundle(bundle)
    m = current.manifest
    if float_model is None:
        float_model = current.path / FLOAT_MODEL_NAME
        if not float_model.is_file():
            raise ModelError(f"{current.path} holds no {FLOAT_MODEL_NAME}; pass the float Keras model with --float-model")
    new_version = version or bump_version(m.version)
    if new_version == m.version:
        raise DataError(f"version {new_version!r} is the current bundle's; pass another --version")
    pre = m.preprocessing  # an image folder is read at the bundle's input size, as its boards resize pictures
    image_shape = tuple(pre.shape) if pre.kind == "image" and len(pre.shape) == 3 and is_image_folder(data) else None
    dataset = load_dataset(data, seed=seed, image_shape=image_shape)
    if tuple(dataset.labels) != tuple(m.labels):
        if len(dataset.labels) != len(m.labels):
            raise DataError(f"data {data!r} has {len(dataset.labels)} classes but the bundle has {len(m.labels)}; "
                            "pass the data the bundle was made from")
        dataset = dataset.with_labels(tuple(m.labels))
    if dataset.preprocessing.kind == m.preprocessing.kind == "image" and dataset.preprocessing.raw_dtype == m.preprocessing.raw_dtype:
        # the float model takes what the bundle's preprocessing makes (a model's own Rescaling may have moved there)
        dataset = replace(dataset, preprocessing=m.preprocessing)
    fb = load_feedback(feedback, m.labels, dataset.preprocessing)
    if fb.x.shape[1:] != dataset.x_train.shape[1:]:
        raise DataError(f"feedback input shape={list(fb.x.shape[1:])} but data shape={list(dataset.x_train.shape[1:])}")
    fb_train, fb_held = split_feedback(fb, holdout_fraction)
    if len(fb_train) == 0:
        raise DataError(f"all {len(fb)} labeled samples were held out; lower --holdout-fraction or label more")
    model = load_model(float_model)
    check_fits(model, dataset)  # a float model that does not match the bundle's data: one line, before training
    log.info("fine-tuning on %d original + %d feedback inputs (%d held out)",
             len(dataset.x_train), len(fb_train), len(fb_held))
    tuned, tune_info = fine_tune(
        model, dataset.model_inputs(dataset.x_train), dataset.y_train,
        dataset.model_inputs(fb_train.x), fb_train.y,
        epochs=epochs, freeze=freeze, feedback_share=feedback_share, learning_rate=learning_rate,
        from_logits=m.output_activation == "logits", seed=seed, progress=progress,
    )
    # The converter's QAT trains on the same mix as the fine-tuning (feedback repeated as
    # often), so it does not wash the feedback out; its evaluation sees original test +
    # held-out feedback.
    repeats = max(1, tune_info["feedback_repeats"])
    mixed = Dataset(
        x_train=np.concatenate([dataset.x_train] + [fb_train.x] * repeats),
        y_train=np.concatenate([dataset.y_train] + [fb_train.y] * repeats),
        x_test=np.concatenate([dataset.x_test, fb_held.x]),
        y_test=np.concatenate([dataset.y_test, fb_held.y]),
        labels=tuple(m.labels), preprocessing=dataset.preprocessing, name=f"{dataset.name}+feedback",
    )
    with atomic_dir(output, force) as staged:
        conv_dir = staged / "converted"
        result = convert(tuned, mixed, mode="qat", output=conv_dir, epochs=qat_epochs, name=m.name,
                         version=new_version, labels=list(m.labels), baseline=current.path, progress=progress,
                         seed=seed, save_float=False, follow_model=False)
        for item in conv_dir.iterdir():
            os.replace(item, staged / item.name)
        conv_dir.rmdir()
        tuned.save(str(staged / FLOAT_MODEL_NAME))
        parts = {"test": (dataset.x_test, dataset.y_test), "feedback": (fb_held.x, fb_held.y),
                 "combined": (mixed.x_test, mixed.y_test)}
        metrics = {
            "current": {part: bundle_accuracy(current.path, *xy) for part, xy in parts.items()},
            "new": {part: bundle_accuracy(staged, *xy) for part, xy in parts.items()},
        }
        verdict = judge(metrics["current"], metrics["new"], max_regression=max_regression)
        counts = {"original_train": len(dataset.x_train), "original_test": len(dataset.x_test),
                  "feedback": len(fb), "feedback_train": len(fb_train), "feedback_holdout": len(fb_held)}
        details = {
            "bundle": str(bundle), "float_model": str(float_model), "data": str(data), "feedback": feedback,
            "fine_tune": tune_info, "qat_epochs": qat_epochs, "holdout_fraction": holdout_fraction,
            "max_regression_points": max_regression, "seed": seed,
            "current": {"version": m.version, "sha256": m.sha256},
            "new": {"version": new_version, "sha256": result.manifest.sha256},
            "feedback_train_ids": list(fb_train.ids), "feedback_holdout_ids": list(fb_held.ids),
            "conversion_fallbacks": [f"{layer}: {action}" for layer, action in result.fallbacks],
        }
        write_reports(staged, verdict=verdict, metrics=metrics, counts=counts, details=details)
    return RetrainResult(
        bundle_path=output, float_model_path=output / FLOAT_MODEL_NAME, version=new_version,
        previous_version=m.version, verdict=verdict, metrics=metrics, counts=counts,
        report_path=output / "retrain.md", seconds=time.perf_counter() - t0, details=details,
    )
