"""Shadow runs: a candidate pushed with ``shadow: true`` classifies the same inputs beside the current model,
which still decides; the board reports how the two compare.

Real Mosquitto, real interpreters, real bundles: digits v2 (another seed: it agrees with v1 on most
digits), a v1 whose labels are permuted (the same model file: it disagrees on every digit), and v2 with a
preprocessing that refuses the camera's frames (it fails inputs: dropped).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from device_agent.delivery import protocol
from device_agent.update.manifest import load_bundle

from conftest import BUNDLE, DATA, validate, wait_for
from test_probation import _refuses_big_frames, state, versions
from test_update import TOPIC, Running, endless, push, results

V2 = DATA / "digits-bundle-v2"


def permuted(tmp_path: Path) -> Path:
    """v1 with its labels shifted by one: the same model file, every answer another digit's name."""
    out = tmp_path / "permuted"
    shutil.copytree(BUNDLE, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["version"] = "1-permuted"
    manifest["labels"] = manifest["labels"][1:] + manifest["labels"][:1]
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def shadow_message(bundle: Path) -> bytes:
    return json.dumps(protocol.bundle_payload(bundle, shadow=True)).encode()


def last_shadow(sub):
    t = sub.messages("telemetry")
    return t[-1].get("shadow") if t else None


def test_a_shadow_candidate_is_judged_beside_the_current_model_then_promoted(broker, sub_factory, make_config, digits,
                                                                             tmp_path):
    x, _ = digits
    v1, v2 = load_bundle(BUNDLE).manifest, load_bundle(V2).manifest
    sub = sub_factory(broker.port, topic="edgekit/v1/test/dev1/+")
    out = tmp_path / "results.jsonl"
    run = Running(make_config(broker.url, update={"commit_after": 10}), endless(x))
    try:
        assert wait_for(lambda: len(results(out)) >= 5, 15)
        push(broker.port, shadow_message(V2))
        assert sub.wait(lambda s: (last_shadow(s) or {}).get("inferences", 0) >= 100, 60), "no shadow figures"
        shadowed = len(results(out))
        figures = last_shadow(sub)
        assert state(tmp_path)["current"] is None  # not installed: v1 still decides
        push(broker.port, json.dumps(protocol.bundle_payload(V2)).encode())  # promote: the same bundle, installed
        assert wait_for(lambda: (state(tmp_path)["current"] or {}).get("committed"), 30), "v2 not committed"
        assert sub.wait(lambda s: s.messages("telemetry")[-1]["model"] == v2.model_ref
                        and s.messages("telemetry")[-1]["shadow"] is None, 15)
    finally:
        stats = run.finish()

    assert versions(out)[:1] == ["1"] and versions(out) == ["1", "2"]
    assert shadowed >= 100 and all(r["model_version"] == "1" for r in results(out)[:shadowed])
    for m in sub.messages("telemetry"):
        validate(m)
    assert figures["model"] == v2.model_ref
    assert figures["archive_sha256"] == protocol.bundle_payload(V2)["archive_sha256"]
    assert figures["errors"] == 0 and figures["agree"] <= figures["inferences"]
    assert figures["agreement"] > 0.85  # two digits models trained with other seeds agree on most inputs
    assert 0.5 < figures["confidence_mean"] <= 1 and 0.5 < figures["current_confidence_mean"] <= 1
    assert figures["latency_ms"]["p95"] > 0 and figures["current_latency_ms"]["p95"] > 0
    assert "update" not in stats.errors


def clear(port: int) -> None:
    """Clear the retained bundle (an aborted shadow rollout)."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="clearer")
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        info = client.publish(TOPIC, b"", qos=1, retain=True)
        info.wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def test_a_disagreeing_shadow_is_seen_and_one_that_fails_inputs_is_dropped_the_current_model_untouched(
        broker, sub_factory, make_config, digits, tmp_path):
    x, _ = digits
    big = np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)  # 16x16 frames: v1 resizes them
    v1 = load_bundle(BUNDLE).manifest
    sub = sub_factory(broker.port, topic="edgekit/v1/test/dev1/+")
    out = tmp_path / "results.jsonl"
    failing = _refuses_big_frames(tmp_path)
    failing_archive = protocol.bundle_payload(failing)["archive_sha256"]
    run = Running(make_config(broker.url), endless(big))
    try:
        assert wait_for(lambda: len(results(out)) >= 5, 15)
        push(broker.port, shadow_message(permuted(tmp_path)))
        assert sub.wait(lambda s: (last_shadow(s) or {}).get("inferences", 0) >= 50, 60), "no shadow figures"
        bad = last_shadow(sub)
        clear(broker.port)  # abort: the shadow ends, nothing is refused
        assert sub.wait(lambda s: s.messages("telemetry")[-1]["shadow"] is None, 15)
        assert state(tmp_path)["refused"] == [] and state(tmp_path).get("pending") is None

        push(broker.port, shadow_message(failing))
        assert wait_for(lambda: run.agent.stats.errors.get("update", 0) == 1, 30), "the failing shadow was not dropped"
        n = len(results(out))
        assert wait_for(lambda: len(results(out)) >= n + 10, 15), "the current model stopped"
    finally:
        stats = run.finish()

    assert bad["model"]["version"] == "1-permuted" and bad["agreement"] < 0.2
    assert versions(out) == ["1"] and run.agent.manifest.sha256 == v1.sha256 and run.agent.shadow is None
    assert "input" not in stats.errors  # the candidate's failures are its own, not the board's
    s = state(tmp_path)
    assert s["current"] is None and s["refused"][-1]["archive_sha256"] == failing_archive
    assert "failed its shadow run: 3 inputs failed under it" in s["refused"][-1]["reason"]
    dropped = [m for m in sub.messages("status") if "dropped" in m.get("last_update_error", "")]
    assert dropped and dropped[-1]["last_update_archive"] == failing_archive and dropped[-1]["model"] == v1.model_ref
    validate(dropped[-1])
    for m in sub.messages("telemetry"):
        validate(m)


def test_a_shadow_candidate_slower_than_the_limits_is_dropped(broker, make_config, digits, tmp_path):
    x, _ = digits
    v1 = load_bundle(BUNDLE).manifest
    out = tmp_path / "results.jsonl"
    # No real model answers within a nanosecond: the shadow is judged after 100 shadow inferences.
    run = Running(make_config(broker.url, update={"probation_latency_ms": 1e-6}), endless(x))
    try:
        assert wait_for(lambda: len(results(out)) >= 5, 15)
        push(broker.port, shadow_message(V2))
        assert wait_for(lambda: run.agent.stats.errors.get("update", 0) == 1, 30), "the slow shadow was not dropped"
        assert "dropped: its p95 latency" in run.agent.last_update_error
        n = len(results(out))
        assert wait_for(lambda: len(results(out)) >= n + 10, 15), "the current model stopped"
    finally:
        run.finish()
    assert versions(out) == ["1"] and run.agent.manifest.sha256 == v1.sha256 and run.agent.shadow is None
    assert "probation_latency_ms" in state(tmp_path)["refused"][-1]["reason"]
