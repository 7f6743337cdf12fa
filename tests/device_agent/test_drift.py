"""Drift against the bundle's reference statistics: stable on data like the training data, loud on shifted data.

The monitor is checked on its own (inputs drawn from the reference, then shifted),
then inside the agent on the 300 real digits and on the same digits with their
contrast, brightness or noise changed in numpy, and on a real Mosquitto: the
telemetry a board sends carries a schema-valid ``drift`` object.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

from device_agent.agent import Agent
from device_agent.sampling.drift import DriftMonitor, monitor_for, psi, psi_level
from device_agent.inference.interpreter import TFLiteModel
from device_agent.update.manifest import load_bundle
from device_agent.sources import ArraySource
from device_agent.update.updater import Staged

from conftest import BUNDLE, DATA, validate

REFERENCE = load_bundle(BUNDLE).manifest.reference


def draw_confidences(reference, n, rng):
    """Confidences distributed like the reference histogram (uniform within a bin)."""
    hist = reference["confidence"]["histogram"]
    edges, counts = np.asarray(hist["edges"]), np.asarray(hist["counts"], float)
    bins = rng.choice(len(counts), size=n, p=counts / counts.sum())
    return edges[bins] + rng.random(n) * (edges[bins + 1] - edges[bins])


def test_inputs_like_the_reference_are_stable_and_shifted_ones_are_not():
    rng = np.random.default_rng(0)
    mean, std = REFERENCE["input"]["mean"][0], REFERENCE["input"]["std"][0]
    like = DriftMonitor(REFERENCE, window=500)
    for c in draw_confidences(REFERENCE, 500, rng):
        like.update(rng.normal(mean, std / 8), c)  # per-input means scatter around the reference mean
    d = like.snapshot()
    assert d.samples == 500 and d.confidence_psi < 0.1 and d.level == "stable"
    assert d.input_z_max < 0.1
    assert abs(d.confidence_mean - REFERENCE["confidence"]["mean"]) < 0.02

    shifted = DriftMonitor(REFERENCE, window=500)
    for c in rng.uniform(0.3, 0.8, 500):  # a model that is rarely sure any more, on brighter inputs
        shifted.update(mean + 0.5 * std, c)
    d = shifted.snapshot()
    assert d.confidence_psi > 0.25 and d.level == "significant"
    assert d.input_z == (0.5,) and d.input_z_max == 0.5
    assert d.confidence_mean < 0.6 < d.confidence_mean_ref


def test_the_window_forgets_old_inferences_and_reset_starts_over():
    m = DriftMonitor(REFERENCE, window=50)
    for _ in range(200):
        m.update(0.0, 0.1)  # long ago: dark inputs, unsure
    for _ in range(50):
        m.update(REFERENCE["input"]["mean"][0], 0.99)
    d = m.snapshot()
    assert d.samples == 50 and d.input_z_max == 0.0 and d.confidence_mean == 0.99
    m.reset()
    d = m.snapshot()
    assert d.samples == 0 and d.confidence_psi is None and d.input_z is None and d.level is None


def test_psi_formula_and_reading():
    assert psi([10, 20, 70], [10, 20, 70]) == 0.0
    p, q = np.array([0.5, 0.5]), np.array([0.1, 0.9])
    assert psi([50, 50], [10, 90]) == pytest.approx(float(np.sum((p - q) * np.log(p / q))))
    assert [psi_level(v) for v in (0.05, 0.2, 0.3, None)] == ["stable", "moderate", "significant", None]


@pytest.mark.parametrize("reference", [
    {},
    None,
    {"samples": 10},
    {"input": {"mean": [0.3], "std": [0.0]}, "confidence": {"histogram": {"edges": [0, 1], "counts": [0]}}},
    {"confidence": {"histogram": {"edges": [0, 0.5], "counts": [1, 2]}}},  # edges do not fit the counts
])
def test_no_usable_reference_means_no_monitor(reference):
    assert monitor_for(reference) is None


def test_half_a_reference_gives_the_half_it_can():
    m = monitor_for({"confidence": REFERENCE["confidence"]})
    m.update(123.0, 0.99)
    d = m.snapshot()
    assert d.input_z is None and d.input_z_max is None and d.confidence_psi is not None


def agent_drift(make_config, xs, **tables):
    with Agent(make_config("", **tables), source=ArraySource(list(xs))) as agent:
        agent.run()
        return agent, agent.telemetry()["drift"]


def test_the_agent_reports_real_digits_as_stable_and_changed_ones_as_drift(make_config, digits):
    x, _ = digits
    _, same = agent_drift(make_config, x)
    assert same["samples"] == 300 and same["confidence_psi"] < 0.1 and same["input_z_max"] < 0.1

    low_contrast = np.clip(x.astype(np.float32) * 0.4 + 60, 0, 255).astype(np.uint8)
    _, washed = agent_drift(make_config, low_contrast)
    assert washed["confidence_psi"] > 0.25 and washed["level"] == "significant"
    assert washed["confidence_mean"] < same["confidence_mean"] - 0.05

    noisy = np.clip(x + np.random.default_rng(1).normal(0, 60, x.shape), 0, 255).astype(np.uint8)
    _, noise = agent_drift(make_config, noisy)
    assert noise["confidence_psi"] > 0.25

    brighter = np.clip(x.astype(np.int16) + 100, 0, 255).astype(np.uint8)
    _, bright = agent_drift(make_config, brighter)
    assert bright["input_z_max"] > 0.5 and bright["input_z"][0] > 0.5  # the input moved, up
    # The general path (2-D images, preprocessed in float) measures the same input mean as the lookup-table path.
    _, flat = agent_drift(make_config, [xi[:, :, 0] for xi in brighter])
    assert flat["input_z"] == pytest.approx(bright["input_z"], abs=1e-3)


def test_a_bundle_without_reference_reports_null_drift(make_config, digits, tmp_path):
    old = tmp_path / "old-bundle"
    shutil.copytree(BUNDLE, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["reference"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    config = make_config("")
    config = replace(config, bundle=replace(config.bundle, path=str(old)))
    with Agent(config, source=ArraySource(list(digits[0][:20]))) as agent:
        stats = agent.run()
        payload = agent.telemetry()
    assert stats.inferences == 20 and payload["drift"] is None
    validate(payload)


def test_a_swapped_in_bundle_starts_a_fresh_window_against_its_own_reference(make_config, digits, expected_runtime):
    x, _ = digits
    with Agent(make_config(""), source=ArraySource(list(x[:100]))) as agent:
        agent.run()
        assert agent.telemetry()["drift"]["samples"] == 100
        v2 = load_bundle(DATA / "digits-bundle-v2")
        agent.updater.ready.put(Staged(v2, TFLiteModel.open(v2.model_path, expected_runtime)))
        agent._apply_updates()  # what the loop does between two inferences
        assert agent.manifest.sha256 == v2.manifest.sha256
        drift = agent.telemetry()["drift"]
    assert drift["samples"] == 0 and drift["confidence_psi"] is None
    assert drift["confidence_mean_ref"] == v2.manifest.reference["confidence"]["mean"]


def test_telemetry_on_the_wire_carries_a_schema_valid_drift_object(broker, sub_factory, make_config, digits):
    x, _ = digits
    sub = sub_factory(broker.port, topic="edgekit/v1/test/dev1/telemetry")
    with Agent(make_config(broker.url), source=ArraySource(list(x))) as agent:
        agent.run()
    assert sub.wait(lambda s: any(m["inferences"] == 300 for m in s.messages("telemetry")), 10)
    last = next(m for m in sub.messages("telemetry") if m["inferences"] == 300)
    validate(last)
    drift = last["drift"]
    assert drift["samples"] == 300 and drift["window"] == 500 and 0 <= drift["confidence_psi"] < 0.1
    assert drift["level"] == "stable" and len(drift["input_z"]) == 1
