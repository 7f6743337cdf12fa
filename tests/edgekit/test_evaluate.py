"""Threshold derivation and the report's serialisations."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgekit.convert.evaluate import derive_thresholds, scores_to_probs


def _probs(conf):
    """Two-class probabilities with the given top-1 confidence for class 0."""
    conf = np.asarray(conf, dtype=np.float64)
    return np.stack([conf, 1 - conf], axis=1)


def test_threshold_is_the_lowest_that_halves_the_error_rate():
    # 10 inputs, 80% right; the two errors sit at confidence 0.55 and 0.62
    conf = [0.55, 0.62, 0.7, 0.75, 0.8, 0.85, 0.9, 0.93, 0.97, 0.99]
    y = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    t = derive_thresholds(_probs(conf), y)
    assert t.target_accuracy == pytest.approx(0.9)
    # at 0.60 one error is left among 9 accepted (88.9% < 90%); at 0.65 none is left
    assert t.confidence == pytest.approx(0.65)
    assert t.accepted_accuracy == 1.0 and t.flagged_accuracy == 0.0
    assert t.accepted_fraction == pytest.approx(0.8)


def test_threshold_when_nothing_reaches_the_target_is_the_highest_candidate():
    conf = [0.99, 0.98, 0.6, 0.55]
    y = np.array([1, 1, 0, 0])  # the most confident are wrong
    t = derive_thresholds(_probs(conf), y)
    assert t.confidence == pytest.approx(0.95)


def test_logits_become_probabilities():
    p = scores_to_probs(np.array([[2.0, 0.0, -1.0]]), "logits")
    assert p.sum() == pytest.approx(1.0) and p.argmax() == 0
    same = np.array([[0.2, 0.8]])
    np.testing.assert_array_equal(scores_to_probs(same, "softmax"), same)


def test_report_json_round_trips_and_markdown_names_every_class(qat_result, tmp_path):
    r = qat_result.report
    out = r.write(tmp_path / "rep")
    data = json.loads((out / "report.json").read_text())
    assert data["int8"]["accuracy"] == pytest.approx(r.int8.accuracy)
    assert len(data["int8"]["confusion"]) == len(r.labels)
    assert sum(map(sum, data["int8"]["confusion"])) == r.test_size
    md = r.to_markdown()
    for label in r.labels:
        assert f"| {label} |" in md
    assert "int8 / float median latency" in md


def test_evaluate_cli_bad_inputs_are_one_line(capsys, tmp_path, ptq_result):
    from edgekit.cli import main

    data = tmp_path / "three.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x_train=rng.integers(0, 255, (30, 8, 8, 1)), y_train=np.arange(30) % 3,
             x_test=rng.integers(0, 255, (9, 8, 8, 1)), y_test=np.arange(9) % 3)
    out = tmp_path / "ev"
    assert main(["evaluate", str(ptq_result.bundle_path), "--data", str(data), "-o", str(out)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("DataError")]
    assert len(err) == 1 and "3 classes" in err[0] and not out.exists()

    assert main(["evaluate", str(tmp_path / "nobundle"), "--data", "digits"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("BundleError: ")

    out.mkdir()
    assert main(["evaluate", str(ptq_result.bundle_path), "--data", "digits", "-o", str(out)]) == 1
    assert "--force" in capsys.readouterr().err
