"""Real conversions on the real digits: int8 tensors, sha256, reference-kernel agreement, accuracy margins."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from device_agent.inference.interpreter import TFLiteModel
from device_agent.update.manifest import load_bundle
from edgekit.convert.bundle import pack


def _all_tensor_dtypes(path):
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))
    return interp, interp.get_tensor_details()


@pytest.mark.parametrize("which", ["ptq_result", "qat_result"])
def test_bundle_tensors_are_int8(request, which):
    result = request.getfixturevalue(which)
    bundle = load_bundle(result.bundle_path)
    m = bundle.manifest
    assert m.input.dtype == "int8" and m.output.dtype == "int8"
    assert m.input.scale > 0 and m.output.scale > 0
    _, details = _all_tensor_dtypes(bundle.model_path)
    dtypes = {np.dtype(d["dtype"]).name for d in details}
    assert "float32" not in dtypes, f"float tensors left in the int8 model: {dtypes}"
    assert dtypes <= {"int8", "int32"}
    # per-channel weights: the first convolution's kernel has one scale per output channel
    kernels = [d for d in details if len(d["quantization_parameters"]["scales"]) > 1]
    assert kernels, "no per-channel quantized weights found"


def test_sha256_in_manifest_matches_model_file(ptq_result):
    data = json.loads((ptq_result.bundle_path / "manifest.json").read_text())
    digest = hashlib.sha256((ptq_result.bundle_path / "model.tflite").read_bytes()).hexdigest()
    assert data["model"]["sha256"] == digest == ptq_result.manifest.sha256
    assert data["model"]["size_bytes"] == (ptq_result.bundle_path / "model.tflite").stat().st_size


def _logits_and_scores(path, x):
    """Every row's int8 scores (the model output) through LiteRT and through TF's reference kernels,
    plus the largest difference over every intermediate tensor before the final softmax."""
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    fast = Interpreter(model_path=str(path), num_threads=1, experimental_preserve_all_tensors=True)
    ref = tf.lite.Interpreter(
        model_path=str(path),
        experimental_op_resolver_type=tf.lite.experimental.OpResolverType.BUILTIN_REF,
        experimental_preserve_all_tensors=True,
    )
    fast.allocate_tensors()
    ref.allocate_tensors()
    inp, out = ref.get_input_details()[0], ref.get_output_details()[0]
    ops = ref._get_ops_details()
    assert ops[-1]["op_name"] == "SOFTMAX"
    softmax_in = ops[-1]["inputs"][0]
    worst = 0
    scale, zero = inp["quantization"]
    for row in x:
        q = np.clip(np.round(row / scale) + zero, -128, 127).astype(np.int8)[None]
        for it in (fast, ref):
            it.set_tensor(inp["index"], q)
            it.invoke()
        a = fast.get_tensor(softmax_in).astype(np.int32)
        b = ref.get_tensor(softmax_in).astype(np.int32)
        worst = max(worst, int(np.abs(a - b).max()))
    return worst


@pytest.mark.parametrize("which", ["ptq_result", "qat_result"])
def test_int8_outputs_match_tensorflow_reference_kernels(request, digits, which):
    path = request.getfixturevalue(which).bundle_path / "model.tflite"
    x = digits.model_inputs(digits.x_test)
    # the logits (the final softmax's input) agree within two quantization steps: each layer's kernels
    # round within one step of the reference, and one-step differences can compound over five layers
    assert _logits_and_scores(path, x) <= 2
    # the scores the board sees, through the board's adapter: same top-1 everywhere, and within one step
    # on almost every input (TFLite's optimized int8 softmax uses a lookup table, the reference kernel a
    # fixed-point exp; they differ by a few steps on a few inputs)
    with TFLiteModel.open(path, runtime="ai_edge_litert") as fast, TFLiteModel.open(
        path, runtime="tensorflow", reference_kernels=True
    ) as ref:
        diffs, same_top1 = [], 0
        for row in x:
            a, b = fast(row), ref(row)
            same_top1 += int(a.argmax() == b.argmax())
            diffs.append(int(np.abs(fast.raw_output().astype(np.int32) - ref.raw_output().astype(np.int32)).max()))
    diffs = np.asarray(diffs)
    assert same_top1 == len(x)
    assert np.mean(diffs <= 1) >= 0.97, f"rows off by more than one step: {np.sum(diffs > 1)}"
    assert diffs.max() <= 16


def test_qat_within_half_a_point_of_float(qat_result):
    r = qat_result.report
    assert r.float is not None
    assert r.int8.accuracy >= r.float.accuracy - 0.005, (r.float.accuracy, r.int8.accuracy)
    assert r.int8.accuracy > 0.95
    assert qat_result.manifest.quantization["mode"] == "qat"


def test_ptq_within_one_and_a_half_points_of_float(ptq_result):
    r = ptq_result.report
    assert r.int8.accuracy >= r.float.accuracy - 0.015, (r.float.accuracy, r.int8.accuracy)
    assert r.agreement > 0.97


def test_int8_is_under_a_third_of_float_tflite(ptq_result):
    sizes = ptq_result.report.sizes
    assert sizes["int8_tflite"] <= 0.30 * sizes["float_tflite"]
    assert sizes["keras_file"] and sizes["keras_file"] > sizes["int8_tflite"]


def test_manifest_carries_metrics_thresholds_and_reference(qat_result, digits):
    m = load_bundle(qat_result.bundle_path).manifest
    assert m.labels == digits.labels
    assert m.preprocessing.scale == pytest.approx(1 / 255) and m.preprocessing.shape == (8, 8, 1)
    assert 0.3 <= m.confidence_threshold <= 0.95 and 0.05 <= m.margin_threshold <= 0.9
    assert m.metrics["accuracy_int8"] == pytest.approx(qat_result.report.int8.accuracy)
    assert m.metrics["accuracy_float"] == pytest.approx(qat_result.report.float.accuracy)
    assert any(k.endswith("int8_median_ms") for k in m.metrics["latency_ms"])
    ref = m.reference
    assert ref["samples"] == len(digits.x_train)
    assert len(ref["input"]["mean"]) == 1 and 0 < ref["input"]["mean"][0] < 1
    assert sum(ref["input"]["histogram"]["counts"]) == digits.x_train.size
    assert sum(ref["confidence"]["histogram"]["counts"]) == len(digits.x_train)
    assert 0.5 < ref["confidence"]["quantiles"]["0.5"] <= 1.0
    # the threshold does what the docs say: accepted predictions beat the overall accuracy
    t = qat_result.report.thresholds
    assert t.accepted_accuracy >= qat_result.report.int8.accuracy


def test_report_files_and_baseline(qat_result):
    d = qat_result.bundle_path / "report"
    for name in ("report.md", "report.json", "confusion.png", "per_class.png", "latency.png"):
        assert (d / name).is_file() and (d / name).stat().st_size > 0, name
    data = json.loads((d / "report.json").read_text())
    assert data["baseline"]["kind"] == "majority" and data["baseline"]["accuracy"] < 0.2
    assert data["beats_baseline"] is True
    assert {row["runtime"] for row in data["latency"]} >= {"ai_edge_litert", "tensorflow"}
    assert {row["model"] for row in data["latency"]} == {"int8", "float"}
    md = (d / "report.md").read_text()
    assert "macro F1" in md and "agreement" in md and "Baseline" in md


def test_evaluate_against_a_previous_bundle(ptq_result, qat_result, digits, tmp_path):
    from edgekit.convert.evaluate import evaluate

    r = evaluate(qat_result.bundle_path, digits, baseline=ptq_result.bundle_path, runtimes=["ai_edge_litert"], output_dir=tmp_path / "ev")
    assert r.baseline.kind == "bundle"
    assert r.baseline.accuracy == pytest.approx(ptq_result.report.int8.accuracy)
    assert r.float is None and (tmp_path / "ev" / "report.md").is_file()


def test_packed_bundle_loads_and_holds_only_what_a_board_needs(ptq_result, tmp_path):
    archive = pack(ptq_result.bundle_path, tmp_path / "b.tar.gz")
    b = load_bundle(archive)
    assert b.manifest.sha256 == ptq_result.manifest.sha256
    with tarfile.open(archive) as tar:
        names = sorted(Path(n).name for n in tar.getnames() if "/" in n)
    assert names == ["manifest.json", "model.tflite"]


def test_the_float_model_is_kept_beside_the_bundle_for_retraining(ptq_result, digits):
    from edgekit.convert import load_model

    kept = load_model(ptq_result.bundle_path / "float_model.keras")
    x = digits.model_inputs(digits.x_test[:50])
    assert (kept.predict(x, verbose=0).argmax(1) == digits.y_test[:50]).mean() > 0.9
