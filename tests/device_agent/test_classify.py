"""Scores to predictions: the board's arithmetic, and the host's batch version of it, agree."""

from __future__ import annotations

import math

import numpy as np
import pytest

from device_agent.inference.classify import classify, probabilities, probabilities_batch
from device_agent.inference.interpreter import dequantize
from device_agent.update.manifest import TensorSpec


@pytest.mark.parametrize("activation", ["softmax", "logits"])
@pytest.mark.parametrize("classes", [2, 10, 200])
def test_one_prediction_matches_the_batch_arithmetic_the_host_derives_thresholds_with(activation, classes):
    rng = np.random.default_rng(classes)
    scores = rng.random((40, classes)).astype(np.float32) * (8 if activation == "logits" else 1)
    batch = probabilities_batch(scores, activation)
    assert np.allclose(batch.sum(axis=1), 1.0)
    labels = [f"c{i}" for i in range(classes)]
    for row, p in zip(scores, batch):
        pred = classify(row, labels, activation, top_k=3)
        order = np.argsort(-p, kind="stable")
        assert pred.index == order[0] and pred.label == labels[order[0]]
        assert pred.confidence == pytest.approx(p[order[0]], abs=1e-12)
        assert pred.margin == pytest.approx(p[order[0]] - p[order[1]], abs=1e-12)
        assert pred.entropy == pytest.approx(-(p * np.log(p)).sum(), abs=1e-9)
        assert [c.index for c in pred.top_k] == list(order[:3])


def test_a_quantized_softmax_that_does_not_sum_to_one_is_normalized():
    # int8 softmax outputs: 0.5, 0.25, 0.2 (sum 0.95)
    pred = classify(np.array([0.5, 0.25, 0.2], np.float32), ["a", "b", "c"])
    assert pred.confidence == pytest.approx(0.5 / 0.95) and pred.margin == pytest.approx(0.25 / 0.95)


def test_ties_keep_the_lower_index_first_and_an_all_zero_output_is_uniform():
    pred = classify(np.zeros(4, np.float32), list("abcd"))
    assert pred.index == 0 and pred.confidence == 0.25 and pred.margin == 0.0
    assert pred.entropy == pytest.approx(math.log(4))
    assert probabilities(np.zeros(4)).tolist() == [0.25] * 4


def test_sigmoid_single_output_becomes_two_classes():
    pred = classify(np.array([0.9], np.float32), ["no", "yes"], "sigmoid")
    assert pred.label == "yes" and pred.confidence == pytest.approx(0.9, abs=1e-6)
    assert probabilities_batch(np.array([[0.9], [0.2]]), "sigmoid")[:, 1] == pytest.approx([0.9, 0.2])


def test_a_single_logit_is_a_binary_classifier():
    """Dense(1) with from_logits=True (TF's transfer-learning tutorial): the logistic function, even for a logit
    that happens to lie in 0..1 (0.3 is 57% 'yes', not 30%)."""
    for v in (0.3, -4.0, 2.5, 800.0, -800.0):
        p = 1.0 / (1.0 + np.exp(-np.float64(v)))
        pred = classify(np.array([v], np.float32), ["no", "yes"], "logits")
        assert pred.label == ("yes" if p > 0.5 else "no") and pred.confidence == pytest.approx(max(p, 1 - p), abs=1e-6)
    batch = probabilities_batch(np.array([[0.3], [-4.0], [800.0]]), "logits")
    assert batch[:, 1] == pytest.approx(1.0 / (1.0 + np.exp(-np.array([0.3, -4.0, 800.0]))))


def test_dequantize_in_float32_equals_the_float64_formula():
    q = np.arange(-128, 128, dtype=np.int8)
    for scale, zp in [(1 / 256, -128), (0.0123456789, 3), (1 / 255, -128)]:
        spec = TensorSpec("out", (256,), "int8", float(np.float32(scale)), zp)
        reference = (spec.scale * (q.astype(np.int64) - zp)).astype(np.float32)
        assert np.array_equal(dequantize(q, spec), reference)
