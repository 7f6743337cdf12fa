"""Model updates over MQTT: a bundle pushed retained on the device's bundle topic replaces the running model.

Real Mosquitto, real interpreters, two real bundles (digits-bundle v1 and
digits-bundle-v2, a model trained with another seed by tools/make_test_bundle.py).
The payloads are built with device_agent.delivery.protocol and published with paho,
as `edgekit fleet push` does; mosquitto_sub (an independent client) checks
what the agent sends back.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from device_agent import cli
from device_agent.delivery import protocol
from device_agent.agent import Agent
from device_agent.update.manifest import load_bundle

from conftest import BUNDLE, DATA, validate, wait_for
from craft import edited_bundle
from test_agent_mqtt import SlowSource

V2 = DATA / "digits-bundle-v2"
FLAG_ALL = {"random_fraction": 1.0, "dedupe": False}
TOPIC = protocol.topic("test", "dev1", "bundle")


def push(port: int, payload: bytes, retain: bool = True) -> None:
    """Publish like `edgekit fleet push`: QoS 1, retained, and wait for the PUBACK."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"pusher-{time.monotonic_ns()}")
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        info = client.publish(TOPIC, payload, qos=1, retain=retain)
        info.wait_for_publish(10)
        assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


def results(path: Path) -> list:
    if not path.exists():
        return []
    # Only whole lines: the agent appends while this reads, and a read can end inside a write.
    return [json.loads(line) for line in path.read_text().split("\n")[:-1] if line.strip()]


class Running:
    """An agent running its loop in a thread until stopped."""

    def __init__(self, config, source):
        self.agent = Agent(config, source=source)
        self.stop = threading.Event()
        self.stats = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        self.stats = self.agent.run(self.stop)

    def finish(self):
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive()
        self.agent.close()
        return self.stats


def endless(x):
    """300 digits over and over, a new one every 10 ms: a board that never runs out of input."""
    return SlowSource(np.concatenate([x] * 20), period_s=0.01)


def test_a_pushed_bundle_is_swapped_in_and_a_restart_runs_it(broker, sub_factory, make_config, digits, tmp_path,
                                                             capsys):
    x, _ = digits
    v1, v2 = load_bundle(BUNDLE).manifest, load_bundle(V2).manifest
    assert v1.sha256 != v2.sha256 and (v1.version, v2.version) == ("1", "2")
    sub = sub_factory(broker.port)
    config = make_config(broker.url, policy=FLAG_ALL)
    out = tmp_path / "results.jsonl"
    run = Running(config, endless(x))
    try:
        assert wait_for(lambda: len(results(out)) >= 30, 15), "the agent classified nothing"
        push(broker.port, json.dumps(protocol.bundle_payload(V2)).encode())
        assert wait_for(lambda: any(r["model_version"] == "2" for r in results(out)[-5:]), 15), "no swap"
        swapped_at = next(i for i, r in enumerate(results(out)) if r["model_version"] == "2")
        assert wait_for(lambda: len(results(out)) >= swapped_at + 60, 15)  # past its probation (50 with a latency limit)
    finally:
        stats = run.finish()

    lines = results(out)
    versions = [r["model_version"] for r in lines]
    assert versions[:swapped_at] == ["1"] * swapped_at and swapped_at >= 30
    assert set(versions[swapped_at:]) == {"2"}  # swapped once, between two inferences, never back
    assert [r["seq"] for r in lines] == list(range(len(lines)))  # no input lost or classified twice
    assert "update" not in stats.errors and "inference" not in stats.errors

    assert sub.wait(lambda s: len(s.samples()) >= len(lines), 15)
    flagged = {s["sample_id"]: s for s in sub.samples()}
    before = [flagged[r["sample_id"]] for r in lines[:swapped_at]]
    after = [flagged[r["sample_id"]] for r in lines[swapped_at:]]
    assert all(s["model"] == v1.model_ref for s in before)
    assert after and all(s["model"] == v2.model_ref for s in after)
    for s in after[:5]:
        validate(s)
    assert sub.wait(lambda s: s.messages("status")[-1]["state"] == "offline", 10)
    statuses = sub.messages("status")
    for m in statuses:
        validate(m)
    assert any(m["state"] == "online" and m["model"] == v2.model_ref for m in statuses)
    assert statuses[-1]["state"] == "offline" and statuses[-1]["model"] == v2.model_ref
    telemetry = sub.messages("telemetry")
    assert telemetry[-1]["model"] == v2.model_ref

    pointer = json.loads((tmp_path / "current_bundle-dev1.json").read_text())["current"]
    assert pointer["sha256"] == v2.sha256 and Path(pointer["path"]).parent == tmp_path / "bundles"
    archive_sha = protocol.bundle_payload(V2)["archive_sha256"]
    assert pointer["archive_sha256"] == archive_sha and pointer["committed"]  # it ran well: 60 inferences
    assert [p.name for p in (tmp_path / "bundles").iterdir()] == [f"digits-2-{archive_sha[:16]}"]

    # A restart runs v2 at once; the retained v2 message it receives again is what runs: nothing to do.
    restarted = make_config(broker.url, results={"path": str(tmp_path / "restart.jsonl")})
    with Agent(restarted, source=SlowSource(x[:20], 0.05)) as agent:
        assert agent.manifest.sha256 == v2.sha256
        stats = agent.run()
    assert {r["model_version"] for r in results(tmp_path / "restart.jsonl")} == {"2"}
    assert "update" not in stats.errors

    np.save(tmp_path / "five.npy", x[:5])
    where = ["--bundle", str(BUNDLE), "--source", str(tmp_path / "five.npy"), "--outbox", str(tmp_path / "outbox.sqlite"),
             "--device-id", "dev1", "--fleet", "test", "--broker", ""]
    capsys.readouterr()
    assert cli.main(["check", *where]) == 0
    out = capsys.readouterr().out
    assert "ok   update: digits v2 from " in out and "(committed;" in out

    # --reset-bundle goes back to the configured bundle (offline here, so the retained v2 does not return).
    rc = cli.main(["run", "--reset-bundle", "--bundle", str(BUNDLE), "--source", str(tmp_path / "five.npy"),
                   "--outbox", str(tmp_path / "outbox.sqlite"), "--device-id", "dev1", "--fleet", "test",
                   "--broker", "", "--results", str(tmp_path / "reset.jsonl")])
    assert rc == 0
    assert [r["model_version"] for r in results(tmp_path / "reset.jsonl")] == ["1"] * 5
    assert json.loads((tmp_path / "current_bundle-dev1.json").read_text())["current"] is None


def _bad_model_bundle(tmp_path: Path) -> Path:
    """A bundle whose manifest matches its model file, but the file is no TFLite model."""
    bad = tmp_path / "bad-model"
    shutil.copytree(V2, bad)
    (bad / "model.tflite").write_bytes(b"not a tflite model " * 200)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["version"] = "3"
    manifest["model"]["sha256"] = hashlib.sha256((bad / "model.tflite").read_bytes()).hexdigest()
    (bad / "manifest.json").write_text(json.dumps(manifest))
    return bad


def test_a_bad_update_leaves_the_old_model_running_and_says_why(broker, sub_factory, make_config, digits, tmp_path):
    x, _ = digits
    v1 = load_bundle(BUNDLE).manifest
    sub = sub_factory(broker.port, topic="edgekit/v1/test/dev1/status")
    config = make_config(broker.url)
    out = tmp_path / "results.jsonl"
    good = protocol.bundle_payload(V2)
    garbage = os.urandom(3000)
    cases = [
        ("archive sha256", dict(good, archive_sha256="0" * 64)),
        ("corrupt", dict(good, archive=base64.b64encode(garbage).decode(), size=len(garbage),
                         archive_sha256=hashlib.sha256(garbage).hexdigest())),
        ("failed its trial run", protocol.bundle_payload(_bad_model_bundle(tmp_path))),
        ("not UTF-8 JSON", None),
    ]
    run = Running(config, endless(x))
    try:
        assert wait_for(lambda: len(results(out)) >= 10, 15)
        for n, (why, payload) in enumerate(cases, start=1):
            push(broker.port, b"\xff{not json" if payload is None else json.dumps(payload).encode())
            assert wait_for(lambda: run.agent.stats.errors.get("update", 0) >= n, 15), why
            assert why in run.agent.last_update_error
            assert sub.wait(lambda s: why in s.messages()[-1].get("last_update_error", ""), 10), why
        seen = len(results(out))
        assert wait_for(lambda: len(results(out)) >= seen + 20, 15), "the old model stopped"
    finally:
        stats = run.finish()
    assert stats.errors["update"] == len(cases)
    assert {r["model_version"] for r in results(out)} == {"1"}
    for m in sub.messages():
        validate(m)
        assert m["model"] == v1.model_ref
    state = json.loads((tmp_path / "current_bundle-dev1.json").read_text())
    assert state["current"] is None
    # the two whose archive arrived intact are remembered (by archive sha256) and never staged again
    assert [r["archive_sha256"] for r in state["refused"]] == [cases[1][1]["archive_sha256"],
                                                              cases[2][1]["archive_sha256"]]
    assert not any((tmp_path / "bundles").iterdir()) if (tmp_path / "bundles").exists() else True


def test_a_board_that_was_offline_gets_the_retained_bundle_when_it_connects(broker, make_config, digits, tmp_path):
    x, _ = digits
    v2 = load_bundle(V2).manifest
    push(broker.port, json.dumps(protocol.bundle_payload(V2)).encode())  # before the agent ever connects
    out = tmp_path / "results.jsonl"
    run = Running(make_config(broker.url), endless(x))
    try:
        assert wait_for(lambda: any(r["model_version"] == "2" for r in results(out)[-3:]), 15)
    finally:
        stats = run.finish()
    assert run.agent.manifest.sha256 == v2.sha256 and "update" not in stats.errors


def test_an_oversized_bundle_is_refused_before_it_is_decoded(broker, make_config, digits, tmp_path):
    x, _ = digits
    out = tmp_path / "results.jsonl"
    run = Running(make_config(broker.url, update={"max_bytes": 4096}), endless(x))
    try:
        assert wait_for(lambda: len(results(out)) >= 5, 15)
        push(broker.port, json.dumps(protocol.bundle_payload(V2)).encode())
        assert wait_for(lambda: run.agent.stats.errors.get("update", 0) == 1, 15)
        assert "max_bytes=4096" in run.agent.last_update_error
    finally:
        run.finish()
    assert {r["model_version"] for r in results(out)} == {"1"}


def test_rolling_back_is_pushing_the_old_bundle_again(broker, make_config, digits, tmp_path):
    x, _ = digits
    v1, v2 = load_bundle(BUNDLE).manifest, load_bundle(V2).manifest
    out = tmp_path / "results.jsonl"
    run = Running(make_config(broker.url), endless(x))
    try:
        for target in (v2, v1, v2):  # forward, back, forward again (reusing the kept directory)
            push(broker.port, json.dumps(protocol.bundle_payload(V2 if target is v2 else BUNDLE)).encode())
            assert wait_for(lambda: run.agent.manifest.sha256 == target.sha256, 15), target.version
            n = len(results(out))
            assert wait_for(lambda: len(results(out)) >= n + 5, 15)
    finally:
        stats = run.finish()
    assert "update" not in stats.errors
    versions = [r["model_version"] for r in results(out)]
    changes = [v for i, v in enumerate(versions) if i == 0 or v != versions[i - 1]]
    assert changes == ["1", "2", "1", "2"]
    archives = {b: protocol.bundle_payload(b)["archive_sha256"] for b in (BUNDLE, V2)}
    assert sorted(p.name for p in (tmp_path / "bundles").iterdir()) == [
        f"digits-1-{archives[BUNDLE][:16]}", f"digits-2-{archives[V2][:16]}"]
    assert json.loads((tmp_path / "current_bundle-dev1.json").read_text())["current"]["sha256"] == v2.sha256


def _fast_path_cannot_be_prepared(tmp_path: Path) -> Path:
    """v2 (its model, sha256 and all) with ``preprocessing.scale`` 1e37: a valid manifest number, and a bundle that
    stages (the trial run feeds the model directly; the update check preprocesses zeros, 0 * 1e37 = 0), but any
    pixel above 0 overflows float32, so the 8-bit lookup table of the fast path cannot be computed."""
    def change(m: dict) -> None:
        m["version"] = "3"
        m["preprocessing"]["scale"] = 1e37

    return edited_bundle(tmp_path, change, name="v3-scale-1e37")


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the 1e37 scale, as intended
def test_a_bundle_whose_fast_path_cannot_be_prepared_is_refused_and_the_old_bundle_runs_on_unchanged(
        broker, sub_factory, make_config, digits, tmp_path):
    """Preparing the loop for a staged bundle happens before anything of the running bundle changes: when it fails,
    every later result line is the old model's prediction under the old version, on the fast path (8x8 frames) and
    the general one (16x16 frames, resized), and the bundle is refused like any other, for good."""
    from device_agent.inference.classify import classify
    from device_agent.inference.interpreter import TFLiteModel
    from device_agent.inference.preprocess import preprocess

    x, _ = digits
    v1 = load_bundle(BUNDLE)
    m = v1.manifest
    big = np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)
    inputs = [a for pair in zip(x, big) for a in pair] * 10  # fast path and general path in turn
    old_model = TFLiteModel.open(v1.model_path, make_config().runtime.name)  # the old model, run directly

    def by_the_old_bundle(lines: list) -> None:
        assert [r["seq"] for r in lines] == list(range(len(lines)))
        for r in lines:
            raw = inputs[r["source"]["index"]]
            want = classify(old_model(preprocess(raw, m.preprocessing)), m.labels, m.output_activation)
            assert (r["model_version"], r["label"], r["confidence"]) == ("1", want.label, round(want.confidence, 6)), \
                (r["seq"], raw.shape)

    sub = sub_factory(broker.port, topic="edgekit/v1/test/dev1/status")
    out = tmp_path / "results.jsonl"
    message = json.dumps(protocol.bundle_payload(_fast_path_cannot_be_prepared(tmp_path))).encode()
    run = Running(make_config(broker.url), SlowSource(inputs, period_s=0.01))
    try:
        assert wait_for(lambda: len(results(out)) >= 10, 15)
        push(broker.port, message)
        assert wait_for(lambda: run.agent.stats.errors.get("update", 0) >= 1, 30), "not refused"
        refused_at = len(results(out))
        assert wait_for(lambda: len(results(out)) >= refused_at + 40, 15), "the old model stopped"
        by_the_old_bundle(results(out))
        assert "preparing its fast path failed" in run.agent.last_update_error
        assert sub.wait(lambda s: "preparing its fast path failed" in s.messages()[-1].get("last_update_error", ""), 10)
        push(broker.port, message)  # remembered: the same archive again is refused without being staged
        assert wait_for(lambda: run.agent.stats.errors.get("update", 0) >= 2, 15)
        assert "was refused before" in run.agent.last_update_error
        n = len(results(out))
        assert wait_for(lambda: len(results(out)) >= n + 10, 15)
    finally:
        stats = run.finish()

    lines = results(out)
    by_the_old_bundle(lines)
    old_model.close()
    assert len(lines) >= refused_at + 50 and stats.errors == {"update": 2}
    assert run.agent.manifest.sha256 == m.sha256
    s = json.loads((tmp_path / "current_bundle-dev1.json").read_text())
    assert s["current"] is None and s["pending"] is None  # a restart runs the configured bundle, and counts nothing
    assert s["refused"][-1]["archive_sha256"] == json.loads(message)["archive_sha256"]
    assert "preparing its fast path failed" in s["refused"][-1]["reason"]
    for status in sub.messages():
        validate(status)
        assert status["model"] == m.model_ref


def _apply(agent: Agent, bundle_dir: Path, shadow: bool = False):
    """Push ``bundle_dir`` to an agent without a broker, as its MQTT thread would, and apply what the updater
    staged as service() does between two inferences. A weak reference to the staged model's interpreter."""
    import weakref

    agent.updater.offer(TOPIC, json.dumps(protocol.bundle_payload(bundle_dir, shadow=shadow)).encode())
    assert wait_for(lambda: not agent.updater.ready.empty(), 60), "nothing staged"
    staged = agent.updater.ready.get()
    ref = weakref.ref(staged.model.interpreter)
    agent.updater.ready.put(staged)
    del staged
    agent._apply_updates()
    return ref


def _classify_some(agent: Agent, x) -> None:
    for i, raw in enumerate(x[:20]):
        assert agent.step({"uri": "t", "index": i}, raw) is not None


def test_an_interpreter_is_freed_once_its_model_is_replaced_or_the_agent_closed(make_config, digits):
    """The loop calls the interpreter through its own bound methods, which keep it alive: they go with the model
    that is replaced, and with Agent.close() (edgekit.fleet.sim keeps closed Agents around)."""
    import gc
    import weakref

    from device_agent.sources import ArraySource

    x, _ = digits
    agent = Agent(make_config(), source=ArraySource(x[:1]))
    try:
        _classify_some(agent, x)
        first = weakref.ref(agent.model.interpreter)
        second = _apply(agent, V2)
        assert agent.manifest.version == "2" and second() is agent.model.interpreter
        _classify_some(agent, x)
        gc.collect()
        assert first() is None, "the replaced model's interpreter is still referenced"
    finally:
        agent.close()
    gc.collect()
    assert agent.model.interpreter is None
    assert second() is None, "Agent.close() left the interpreter referenced (the loop's bound calls)"


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the 1e37 scale, as intended
def test_a_staged_model_refused_at_the_swap_is_closed_and_freed(make_config, digits, tmp_path):
    import gc

    from device_agent.sources import ArraySource

    x, _ = digits
    with Agent(make_config(), source=ArraySource(x[:1])) as agent:
        running = agent.model.interpreter
        refused = _apply(agent, _fast_path_cannot_be_prepared(tmp_path))
        assert agent.manifest.version == "1" and agent.model.interpreter is running
        assert agent.stats.errors["update"] == 1 and "preparing its fast path failed" in agent.last_update_error
        _classify_some(agent, x)
        gc.collect()
        assert refused() is None, "the refused model's interpreter is still referenced"


def test_prune_keeps_the_running_bundle_and_the_newest_previous_ones(tmp_path):
    from device_agent.update.updater import Updater

    updater = Updater(tmp_path, device="d", keep=2)
    for i, name in enumerate(["a", "b", "c", "d", "running"]):
        (tmp_path / "bundles" / name).mkdir(parents=True)
        os.utime(tmp_path / "bundles" / name, (1000 + i, 1000 + i))
    os.utime(tmp_path / "bundles" / "running", (1, 1))  # the oldest, but it runs
    updater.prune(running=[tmp_path / "bundles" / "running"])
    assert sorted(p.name for p in (tmp_path / "bundles").iterdir()) == ["c", "d", "running"]


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the 1e37 scale, as intended
def test_a_shadow_candidate_whose_fast_path_cannot_be_prepared_is_refused_closed_and_not_pending(
        make_config, digits, tmp_path):
    """The same bundle pushed for a shadow run: refused at once (its promotion could never run), its model closed
    and freed, the attempt ended (nothing pending for a restart), the running bundle classifying on."""
    import gc

    from device_agent.sources import ArraySource

    x, _ = digits
    bundle = _fast_path_cannot_be_prepared(tmp_path)
    with Agent(make_config(), source=ArraySource(x[:1])) as agent:
        ref = _apply(agent, bundle, shadow=True)
        assert agent.shadow is None and agent.stats.errors == {"update": 1}
        assert "preparing its fast path failed" in agent.last_update_error
        _classify_some(agent, x)
        assert agent.manifest.version == "1"
        gc.collect()
        assert ref() is None, "the refused shadow candidate's interpreter is still referenced"
    s = json.loads((tmp_path / "current_bundle-dev1.json").read_text())
    assert s["pending"] is None
    assert "preparing its fast path failed" in s["refused"][-1]["reason"]
