"""Probation: a swapped-in bundle that errs or is too slow sends the board back to the previous bundle by itself.

Real Mosquitto, real interpreters, real bundles (digits v1 and v2 of tools/make_test_bundle.py; a v3 that is
v2 with a preprocessing that refuses the camera's frames). The retained status and the telemetry are read by
mosquitto_sub, an independent client.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from device_agent.agent import Agent
from device_agent.delivery import protocol
from device_agent.update.manifest import load_bundle
from device_agent.update.probation import MIN_LATENCY_SAMPLES, Probation, ProbationLimits

from conftest import BUNDLE, DATA, validate, wait_for
from test_agent_mqtt import SlowSource
from test_update import Running, endless, push, results

V2 = DATA / "digits-bundle-v2"


def versions(path: Path) -> list:
    v = [r["model_version"] for r in results(path)]
    return [x for i, x in enumerate(v) if i == 0 or x != v[i - 1]]


def state(tmp_path: Path) -> dict:
    path = tmp_path / "current_bundle-dev1.json"
    return json.loads(path.read_text()) if path.exists() else {"current": None, "refused": []}


def test_a_bundle_slower_than_the_limit_is_refused_and_the_configured_one_runs_again(broker, sub_factory, make_config,
                                                                                     digits, tmp_path):
    x, _ = digits
    v1, v2 = load_bundle(BUNDLE).manifest, load_bundle(V2).manifest
    sub = sub_factory(broker.port, topic="edgekit/v1/test/dev1/+")
    # No real model answers within a nanosecond: v2 fails its probation on latency after 50 inferences (the
    # fewest a latency limit is judged on, more than commit_after here).
    config = make_config(broker.url, update={"commit_after": 10, "probation_latency_ms": 1e-6})
    out = tmp_path / "results.jsonl"
    message = json.dumps(protocol.bundle_payload(V2)).encode()
    run = Running(config, endless(x))
    try:
        assert wait_for(lambda: len(results(out)) >= 10, 15)
        push(broker.port, message)
        assert wait_for(lambda: run.agent.rollbacks == 1, 30), "no rollback"
        n = len(results(out))
        assert wait_for(lambda: len(results(out)) >= n + 10, 15), "the previous model does not run"
        push(broker.port, message)  # the same candidate again: refused at once, never swapped in
        assert wait_for(lambda: run.agent.stats.errors.get("update", 0) >= 2, 15)
        assert "was refused before" in run.agent.last_update_error
        n = len(results(out))
        assert wait_for(lambda: len(results(out)) >= n + 10, 15)
    finally:
        stats = run.finish()

    assert versions(out) == ["1", "2", "1"]
    lines = results(out)
    assert sum(r["model_version"] == "2" for r in lines) == 50  # its probation, not one inference more
    assert [r["seq"] for r in lines] == list(range(len(lines)))
    assert stats.errors["update"] == 2 and run.agent.manifest.sha256 == v1.sha256
    s = state(tmp_path)
    assert s["current"] is None  # a restart runs the configured bundle
    assert s["refused"][-1]["archive_sha256"] == json.loads(message)["archive_sha256"]
    assert "failed its probation" in s["refused"][-1]["reason"] and "probation_latency_ms" in s["refused"][-1]["reason"]

    statuses = [m for m in sub.messages("status") if m["state"] == "online"]
    why = next(m for m in statuses if "failed its probation" in m.get("last_update_error", ""))
    validate(why)
    assert why["model"] == v1.model_ref and "digits v2" in why["last_update_error"]
    telemetry = sub.messages("telemetry")
    for m in telemetry:
        validate(m)
    on_probation = [m for m in telemetry if m["model"] == v2.model_ref]
    assert all(m["probation"] is not None for m in on_probation)
    assert telemetry[-1]["rollbacks"] == 1 and telemetry[-1]["probation"] is None
    assert telemetry[-1]["model"] == v1.model_ref

    # A restart starts on v1; the retained v2 it receives again is refused without being staged.
    with Agent(make_config(broker.url, results={"path": str(tmp_path / "restart.jsonl")}),
               source=SlowSource(x[:20], 0.05)) as agent:
        assert agent.manifest.sha256 == v1.sha256
        stats = agent.run()
    assert versions(tmp_path / "restart.jsonl") == ["1"]


def _refuses_big_frames(tmp_path: Path) -> Path:
    """v2 with ``resize: none``: it takes only 8x8 frames, and this camera sends 16x16 ones."""
    bad = tmp_path / "v3-no-resize"
    shutil.copytree(V2, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["version"] = "3"
    manifest["preprocessing"]["resize"] = "none"
    (bad / "manifest.json").write_text(json.dumps(manifest))
    return bad


def test_a_bundle_that_fails_inputs_goes_back_to_the_last_good_bundle_kept_on_disk(broker, sub_factory, make_config,
                                                                                 digits, tmp_path):
    x, _ = digits
    big = np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)  # 16x16 frames: v1 and v2 resize them
    v2 = load_bundle(V2).manifest
    sub = sub_factory(broker.port, topic="edgekit/v1/test/dev1/status")
    config = make_config(broker.url, update={"commit_after": 10, "probation_max_errors": 2})
    out = tmp_path / "results.jsonl"
    run = Running(config, endless(big))
    try:
        assert wait_for(lambda: len(results(out)) >= 5, 15)
        push(broker.port, json.dumps(protocol.bundle_payload(V2)).encode())
        assert wait_for(lambda: (state(tmp_path)["current"] or {}).get("committed"), 30), "v2 not committed"
        push(broker.port, json.dumps(protocol.bundle_payload(_refuses_big_frames(tmp_path))).encode())
        assert wait_for(lambda: run.agent.rollbacks == 1, 30), "no rollback"
        n = len(results(out))
        assert wait_for(lambda: len(results(out)) >= n + 10, 15), "v2 does not run again"
    finally:
        stats = run.finish()

    assert versions(out) == ["1", "2"]  # v3 classified nothing: its 3 inputs failed, then v2 ran them again
    assert stats.errors["input"] == 3 and run.agent.manifest.sha256 == v2.sha256
    s = state(tmp_path)
    assert s["current"]["sha256"] == v2.sha256 and s["current"]["committed"]
    assert "3 inputs failed under it" in s["refused"][-1]["reason"]
    assert Path(s["current"]["path"]).is_dir()
    assert sub.wait(lambda m: any("digits v3" in x.get("last_update_error", "") for x in m.messages()), 10)

    restarted = make_config(broker.url, results={"path": str(tmp_path / "restart.jsonl")})
    with Agent(restarted, source=SlowSource(big[:10], 0.05)) as agent:
        assert agent.manifest.sha256 == v2.sha256 and agent.probation is None  # committed: nothing to prove
        agent.run()
    assert versions(tmp_path / "restart.jsonl") == ["2"]


def test_probation_lasts_n_inferences_and_t_seconds_and_judges_latency_against_the_previous_model():
    lim = ProbationLimits(inferences=3, seconds=10.0, max_errors=1, latency_ratio=2.0, latency_ms=0.0,
                          latency_floor_ms=0.0)
    p = Probation("b", lim, baseline_p95_ms=1.0, now=0.0)
    for _ in range(3):
        p.record(0.0015)  # 1.5 ms: within 2x the previous model's 1 ms
    assert p.verdict(now=10.0) == ("running", "")  # 3 inferences and 10 s, but a p95 of 3 is no p95 yet
    for _ in range(MIN_LATENCY_SAMPLES - 4):
        p.record(0.0015)
    assert p.verdict(now=10.0) == ("running", "")  # 49
    p.record(0.0015)
    assert p.verdict(now=5.0) == ("running", "")  # 50 inferences, but only 5 of 10 s
    assert p.verdict(now=10.0)[0] == "passed"
    nolimit = Probation("b", ProbationLimits(inferences=3, latency_ratio=0.0), baseline_p95_ms=1.0, now=0.0)
    for _ in range(3):
        nolimit.record(0.5)
    assert nolimit.verdict(now=0.0)[0] == "passed"  # no latency limit: commit_after alone
    slow = Probation("b", lim, baseline_p95_ms=1.0, now=0.0)
    for _ in range(MIN_LATENCY_SAMPLES):
        slow.record(0.0025)
    state, why = slow.verdict(now=11.0)
    assert state == "failed" and "2.5x the previous model's 1.000 ms" in why
    errs = Probation("b", lim, now=0.0)
    errs.error()
    assert errs.verdict(now=0.0)[0] == "running"  # one error is allowed
    errs.error()
    assert errs.verdict(now=0.0) == ("failed", "2 inputs failed under it in its first 2 (probation_max_errors=1)")
    floored = Probation("b", ProbationLimits(inferences=1, latency_ratio=3.0), baseline_p95_ms=1.0, now=0.0)
    for _ in range(MIN_LATENCY_SAMPLES):
        floored.record(0.004)  # 4x a 1 ms model, but under 3 x the 5 ms floor: noise on a busy board, not refused
    assert floored.verdict(now=0.0)[0] == "passed"
