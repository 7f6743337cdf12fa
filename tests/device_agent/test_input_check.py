"""Inputs in the wrong units (floats scaled to 0..1 into a bundle of 0..255 pixels, and the reverse) are warned
about once, counted in telemetry and kept out of the outbox; well-formed inputs are not touched."""

from __future__ import annotations

import json
import logging
import threading

import numpy as np

from device_agent.agent import Agent
from device_agent.inference.inputcheck import InputCheck
from device_agent.update.manifest import Preprocessing

from conftest import validate, wait_for


def _run(agent):
    stop = threading.Event()
    out = {}
    th = threading.Thread(target=lambda: out.setdefault("stats", agent.run(stop)))
    th.start()
    return stop, th, out


def test_scaled_npy_files_warn_once_are_counted_in_telemetry_and_not_flagged(
    broker, sub_factory, make_config, digits, tmp_path, caplog
):
    x, _ = digits
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    n = 40
    for i in range(n):  # what a camera script that divides by 255 writes: float32 in 0..1
        np.save(inbox / f"a{i:03d}.npy", (x[i].astype(np.float32) / 255.0))
    sub = sub_factory(broker.port)
    config = make_config(broker.url, source={"kind": "folder", "path": str(inbox)},
                         policy={"random_fraction": 0.0})
    caplog.set_level(logging.WARNING)
    with Agent(config) as agent:
        stats = agent.run()
        telemetry = agent.telemetry()
    assert stats.inferences == n  # the loop went on through all of them
    assert dict(stats.input_mismatch) == {"scaled": n}
    assert stats.flagged == 0 and stats.pending == 0  # nothing of this reached the outbox
    assert dict(stats.errors) == {}
    validate(telemetry)
    assert telemetry["input_mismatch"] == {"scaled": n}
    # The telemetry the fleet sees over MQTT says it too.
    assert sub.wait(lambda s: any(m.get("input_mismatch") == {"scaled": n} for m in s.messages("telemetry")), 20)
    assert sub.samples() == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "input_mismatch" in
                r.getMessage()]
    assert len(warnings) == 1, warnings
    w = warnings[0]
    assert "a000.npy" in w and "float32 in 0..1" in w and "expects uint8 in 0..255" in w
    assert "send the raw values" in w and "\n" not in w
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(lines) == n and all(line["input_mismatch"] == "scaled" and not line["flagged"] for line in lines)
    # Without the check every one of them was flagged: the low-confidence flood the check stops.
    assert all(line.get("skipped") == "input_mismatch" for line in lines)


def test_well_formed_uint8_input_is_not_counted_and_flags_as_before(make_config, digits, tmp_path, caplog):
    from device_agent.sources import ArraySource

    x, _ = digits
    caplog.set_level(logging.WARNING)
    # uint8 (the fast path), and float32 holding the same 0..255 pixel values (the general path): both fit.
    inputs = list(x[:100]) + [xi.astype(np.float32) for xi in x[100:150]]
    with Agent(make_config("", policy={"random_fraction": 0.0}), source=ArraySource(inputs)) as agent:
        stats = agent.run()
        telemetry = agent.telemetry()
    assert stats.inferences == 150 and dict(stats.input_mismatch) == {}
    assert "input_mismatch" not in json.dumps([json.loads(v) for v in
                                               (tmp_path / "results.jsonl").read_text().splitlines()])
    assert telemetry["input_mismatch"] == {}
    validate(telemetry)
    assert not [r for r in caplog.records if "input_mismatch" in r.getMessage()]
    lines = [json.loads(v) for v in (tmp_path / "results.jsonl").read_text().splitlines()]
    p = agent.policy
    low = sum(line["confidence"] < p.confidence_threshold or line["margin"] < p.margin_threshold for line in lines)
    assert stats.flagged == sum(line["flagged"] for line in lines) == low > 0


def test_a_bundle_of_floats_in_0_1_tells_raw_pixels_and_other_units_apart():
    pre = Preprocessing(kind="image", shape=(8, 8, 1), scale=1.0, offset=0.0, raw_dtype="float32")
    ref = {"input": {"min": [0.0], "max": [1.0]}}
    check = InputCheck(pre, ref)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (8, 8, 1), dtype=np.uint8)
    assert check(pixels / np.float32(255)) is None  # what it was made for
    assert check(pixels) == "range"  # raw 0..255 pixels
    assert check(pixels.astype(np.float32)) == "range"
    assert check(pixels / np.float32(127.5) - 1) == "range"  # -1..1
    assert "float32 in 0..1" in check.message("range", pixels, "cam", "b v1")
    # An array bundle (sensor readings in -3..5, model units x*0.5+1): drift is not a unit error, x100 is.
    arr = Preprocessing(kind="array", shape=(4,), scale=0.5, offset=1.0, raw_dtype="float32")
    check = InputCheck(arr, {"input": {"min": [-0.5, 0.0], "max": [2.0, 3.5]}})
    assert check.range == (-11.0, 13.0)
    assert check(np.array([-6.0, 0.0, 8.0, 9.0], np.float32)) is None
    assert check(np.array([-300.0, 0.0, 500.0, 9.0], np.float32)) == "range"
    # No reference statistics: nothing to check a float bundle against.
    assert InputCheck(arr, {})(np.array([1e6, 0, 0, 0], np.float32)) is None
    # A uint8 bundle: other integer dtypes are checked by value, NaN is left to preprocess's own error.
    u8 = InputCheck(Preprocessing(shape=(8, 8, 1)), {})
    assert u8(pixels.astype(np.int16)) is None and u8(pixels.astype(np.int16) - 10) == "range"
    assert u8(np.full((8, 8, 1), np.nan, np.float32)) is None
