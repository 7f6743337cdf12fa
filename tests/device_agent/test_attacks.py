"""The attacks of the hardening issue, one test each, against a real Mosquitto and a real interpreter.

Tried as an attacker who can publish on the broker would (the default deployment: no ACLs): every
payload is built by hand (tests/device_agent/craft.py), not by the project's checked packers. Each
test asserts what a fleet owner cares about: the agent is alive, still classifying, on the right
model, and the refusal is counted (telemetry ``errors``) and reported (status ``last_update_error``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from device_agent.agent import Agent
from device_agent.delivery import protocol
from device_agent.update.manifest import load_bundle
from device_agent.update.state import Slot, StateFile

import craft
from conftest import BUNDLE, DATA, ROOT, TIMEOUT_SCALE, wait_for
from craft import V2, entry, message, tar_gz
from test_bad_input import pub
from test_update import Running, endless, push, results

V1_SHA = load_bundle(BUNDLE).manifest.sha256
V2_SHA = load_bundle(V2).manifest.sha256


@pytest.fixture
def crash_bundle(expected_runtime) -> Path:
    """A digits model mutated until it segfaults this runtime (tools/find_crashing_model.py); its sha256 matches."""
    path = DATA / {"ai_edge_litert": "crash-bundle-litert", "tflite_runtime": "crash-bundle-tflite"}[expected_runtime]
    assert expected_runtime in json.loads((path / "manifest.json").read_text())["metrics"]["crashes"]
    return path


class Board:
    """An agent classifying digits without end, taking updates, on a private Mosquitto."""

    def __init__(self, broker, make_config, digits, tmp_path, sub_factory, **tables):
        self.broker, self.tmp_path = broker, tmp_path
        self.out = tmp_path / "results.jsonl"
        self.status = sub_factory(broker.port, topic="edgekit/v1/test/dev1/status", client_id=f"st-{time.time_ns()}")
        self.config = make_config(broker.url, **tables)
        sensor = self.config.source.kind == "mqtt"
        self.run = Running(self.config, None if sensor else endless(digits[0]))
        if sensor:  # subscribed, not just connected: a reading published before the SUBACK reaches nobody
            assert self.agent.link.wait_subscribed(self.config.source.topic, 15 * TIMEOUT_SCALE)
        else:
            assert wait_for(lambda: len(results(self.out)) >= 5, 30), "the agent classified nothing"

    @property
    def agent(self) -> Agent:
        return self.run.agent

    def errors(self, kind: str) -> int:
        return self.agent.stats.errors.get(kind, 0)

    def refused(self, kind: str, n: int = 1, words: str = "") -> None:
        """``n`` refusals of ``kind`` counted; for updates, the reason in the agent and its retained status."""
        assert wait_for(lambda: self.errors(kind) >= n, 60), f"no {kind} refusal counted"
        assert self.errors(kind) == n
        if kind == "update":
            reason = self.agent.last_update_error or ""
            assert words in reason, reason
            assert "\n" not in reason
            assert self.status.wait(lambda s: words in s.messages()[-1].get("last_update_error", ""), 15)

    def still_fine(self, sha: str = V1_SHA, more: int = 20) -> None:
        """Alive, classifying (``more`` new results), on the model with ``sha``."""
        assert self.run.thread.is_alive(), "the agent loop ended"
        assert self.agent.manifest.sha256 == sha
        n = len(results(self.out))
        version = {V1_SHA: "1", V2_SHA: "2"}[sha]

        def since_first():  # from its first line on, this model made every prediction (nothing swapped back)
            versions = [r["model_version"] for r in results(self.out)]
            return versions[versions.index(version):] if version in versions else []

        assert wait_for(lambda: len(results(self.out)) >= n + more and len(since_first()) >= more, 30), \
            "the agent stopped classifying"
        assert self.run.thread.is_alive() and self.agent.manifest.sha256 == sha
        assert set(since_first()) == {version}

    def push(self, payload: bytes) -> None:
        push(self.broker.port, payload)

    def finish(self):
        return self.run.finish()


@pytest.fixture
def board(broker, make_config, digits, tmp_path, sub_factory):
    b = Board(broker, make_config, digits, tmp_path, sub_factory)
    yield b
    if b.run.thread.is_alive():
        b.finish()


def state(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "current_bundle-dev1.json").read_text())


# -- a model is a program ------------------------------------------------------------------------------------------

def test_a_model_that_segfaults_the_interpreter_is_refused_in_its_trial_run_and_not_again(
        board, crash_bundle, make_config, digits, tmp_path, sub_factory):
    payload = protocol.bundle_payload(crash_bundle)  # the host's checks pass: its sha256 matches its manifest
    board.push(json.dumps(payload).encode())
    board.refused("update", words="crashed the interpreter in its trial run (SIGSEGV, signal 11)")
    board.still_fine()
    assert [r["archive_sha256"] for r in state(tmp_path)["refused"]] == [payload["archive_sha256"]]
    board.finish()

    # A restart receives the retained message again: recognised by its archive sha256 and refused before
    # anything is unpacked or run (the check comes first in Updater.stage).
    again = Board(board.broker, make_config, digits, tmp_path, sub_factory)
    try:
        again.refused("update", words=f"(archive {payload['archive_sha256'][:12]}...) was refused before (")
        again.still_fine()
        assert not [p for p in (tmp_path / "bundles").iterdir()], "nothing may be unpacked"
    finally:
        again.finish()


def _write_toml(path: Path, **tables) -> Path:
    lines = []
    for table, values in tables.items():
        lines.append(f"[{table}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_a_bundle_that_crashes_the_agent_at_start_falls_back_to_the_last_good_one_after_3_attempts(
        broker, crash_bundle, expected_runtime, digits, tmp_path, sub_factory):
    """The crash loop: a bundle that segfaults the agent's own process (one the trial run cannot catch: it
    crashes only on what the board feeds it, or an agent without the trial run installed it). systemd restarts
    the agent after each crash (Restart=on-failure); the boot counter ends the loop."""
    x, _ = digits
    bundles = tmp_path / "bundles"
    slots = {}
    for name, src in (("good", V2), ("crash", crash_bundle)):
        shutil.copytree(src, bundles / name)
        m = load_bundle(bundles / name).manifest
        slots[name] = Slot(path=str(bundles / name), name=m.name, version=m.version, sha256=m.sha256,
                           archive_sha256=protocol.bundle_payload(src)["archive_sha256"], installed=time.time())
    # As an update leaves it right after a swap: the crash bundle runs (attempt 1), v2 ran well before it.
    StateFile(tmp_path / "current_bundle-dev1.json").update(
        lambda s: s.install(slots["good"]).commit().install(slots["crash"]))
    push(broker.port, json.dumps(protocol.bundle_payload(crash_bundle)).encode())  # and it stays retained
    status = sub_factory(broker.port, topic="edgekit/v1/test/dev1/status")
    np.save(tmp_path / "inputs.npy", x[:30])
    tables = dict(
        device={"id": "dev1", "fleet": "test"}, bundle={"path": str(BUNDLE)}, runtime={"name": expected_runtime},
        source={"kind": "npy", "path": str(tmp_path / "inputs.npy")}, mqtt={"broker": broker.url},
        outbox={"path": str(tmp_path / "outbox.sqlite"), "drain_timeout_s": 10.0},
        results={"path": str(tmp_path / "results.jsonl")}, update={"max_attempts": 3, "commit_after": 5},
    )
    config = _write_toml(tmp_path / "agent.toml", **tables)
    codes, logs = [], []
    for _ in range(5):  # what systemd does: start again after a crash
        proc = subprocess.run([sys.executable, "-m", "device_agent", "run", "--config", str(config)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        codes.append(proc.returncode)
        logs.append(proc.stderr)
        if proc.returncode == 0:
            break
    assert codes == [-11, -11, 0], (codes, logs[-1][-2000:])
    assert "refused: it crashed, hung or was killed 3 times before it ran well" in logs[-1]
    assert "falling back to digits v2" in logs[-1] and "the last bundle that ran well" in logs[-1]
    assert "Traceback" not in logs[-1]
    lines = results(tmp_path / "results.jsonl")
    assert len(lines) == 30 and {r["model_version"] for r in lines} == {"2"}  # v2, not the configured v1
    st = state(tmp_path)
    assert st["current"]["sha256"] == V2_SHA and st["current"]["committed"]
    assert slots["crash"].archive_sha256 in [r["archive_sha256"] for r in st["refused"]]
    # The agent has exited; its last status may still be on its way to our subscriber: wait for it.
    def online_on_v2(sub) -> bool:
        online = [m for m in sub.messages() if m.get("state") == "online"]
        return bool(online) and online[-1].get("model", {}).get("sha256") == V2_SHA

    assert status.wait(online_on_v2, 30), [m.get("state") for m in status.messages()]
    online = [m for m in status.messages() if m.get("state") == "online"]
    assert "falling back" in online[-1]["last_update_error"] or "refused before" in online[-1]["last_update_error"]

    # Restarting again, as a service that runs until stopped: the retained crash bundle comes back and is
    # refused unread; v2 keeps running; SIGTERM stops it cleanly.
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for i in range(5):
        np.save(inbox / f"{i}.npy", x[i])
    tables["source"] = {"kind": "folder", "path": str(inbox), "watch": True, "poll_interval_s": 0.1}
    _write_toml(config, **tables)
    proc = subprocess.Popen([sys.executable, "-m", "device_agent", "run", "--config", str(config)], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)
    lines: list = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        assert wait_for(lambda: any("was refused before" in line for line in lines), 60), "".join(lines)[-2000:]
        assert wait_for(lambda: len(results(tmp_path / "results.jsonl")) >= 35, 30)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    reader.join(10)
    assert {r["model_version"] for r in results(tmp_path / "results.jsonl")[30:]} == {"2"}
    assert "Traceback" not in "".join(lines)


# -- small messages that killed the agent -------------------------------------------------------------------------

CMD = protocol.topic("test", "dev1", "cmd")


@pytest.mark.parametrize("payload, why", [
    (b"[" * 990 + b"]" * 990, "990-deep JSON array (RecursionError before)"),
    (b'{"schema": "edgekit.cmd/1", "cmd": "ping", "args": ' + b'{"a":' * 5000 + b"1" + b"}" * 5001, "deep object"),
    (json.dumps({"schema": "edgekit.cmd/1", "cmd": "ping", "id": "x" * (1 << 20)}).encode(), "1 MiB command"),
    (json.dumps({"schema": "edgekit.cmd/1", "cmd": "set_thresholds", "args": {"confidence": math.nan}}).encode(),
     "NaN threshold"),
    (json.dumps({"schema": "edgekit.cmd/1", "cmd": "set_thresholds", "args": {"margin": 5}}).encode(), "margin 5"),
    (b"\xff\xfe{", "not UTF-8"),
])
def test_a_hostile_command_is_refused_and_counted(board, payload, why):
    thresholds = (board.agent.policy.confidence_threshold, board.agent.policy.margin_threshold)
    pub_bytes(board.broker.port, CMD, payload)
    board.refused("command")
    board.still_fine()
    assert (board.agent.policy.confidence_threshold, board.agent.policy.margin_threshold) == thresholds


def pub_bytes(port: int, topic: str, payload: bytes) -> None:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"attacker-{time.monotonic_ns()}")
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        info = client.publish(topic, payload, qos=1)
        info.wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def _npy(shape, dtype="<f4", data: bytes = b"") -> bytes:
    header = repr({"descr": dtype, "fortran_order": False, "shape": tuple(shape)}).encode()
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + data


SENSOR = "sensors/dev1/frame"


@pytest.mark.parametrize("payload, words", [
    (_npy((100000, 100000)), "declares shape [100000, 100000]"),  # 40 GB declared in 128 bytes
    (_npy((8, 8, 1), "|O", b"\0" * 64), "has dtype object"),
    (_npy((8, 8, 1), "<f4", b"\0" * 12), "holds 12 data bytes, expected=256"),
    (b"\x93NUMPY\x01\x00\x10\x00" + b"(" * 16, "malformed .npy header"),
    (b"[" * 5000 + b"]" * 5000, "nests JSON 5000 levels deep"),
    (b"{\"values\": [" + b"1," * 200000 + b"1]}", "over the limit of 65536"),
    (json.dumps({"values": [1.0] * 63}).encode(), "image shape=[63], expected H x W x C"),
])
def test_a_hostile_sensor_reading_is_refused_and_counted(broker, make_config, digits, tmp_path, sub_factory,
                                                        payload, words, caplog):
    b = Board(broker, make_config, digits, tmp_path, sub_factory, source={"kind": "mqtt", "topic": SENSOR})
    try:
        good = digits[0][:3]
        for x in good:  # the source is the sensor topic here: feed it real digits too
            pub(broker.port, SENSOR, json.dumps({"values": x.reshape(-1).tolist()}))
        assert wait_for(lambda: b.agent.stats.inferences >= 3, 30)
        caplog.set_level("WARNING")
        pub_bytes(broker.port, SENSOR, payload)
        b.refused("input")
        assert wait_for(lambda: any(words in r.getMessage() for r in caplog.records), 10), \
            [r.getMessage() for r in caplog.records]  # logged by the loop right after it counted
        n = b.agent.stats.inferences
        for x in good:
            pub(broker.port, SENSOR, json.dumps({"values": x.reshape(-1).tolist()}))
        assert wait_for(lambda: b.agent.stats.inferences >= n + 3, 30), "the agent stopped classifying"
        assert b.run.thread.is_alive() and b.agent.manifest.sha256 == V1_SHA
    finally:
        b.finish()


# -- bundles that killed or wedged the agent ----------------------------------------------------------------------

def _root(*members):
    return tar_gz([entry("digits-x", kind=tarfile.DIRTYPE), *members])


def _bundle(tmp_path, change, **kw) -> bytes:
    """V2 with its manifest edited by ``change``, packed as a bundle archive (by hand: no checks)."""
    manifest = json.loads(craft.manifest_bytes())
    change(manifest)
    return message(_root(entry("digits-x/manifest.json", json.dumps(manifest).encode()),
                         entry("digits-x/model.tflite", craft.model_bytes())), **kw)


def _deep_tree(depth: int) -> bytes:
    path, members = "digits-x", [entry("digits-x", kind=tarfile.DIRTYPE)]
    for _ in range(depth):
        path += "/a"
        members.append(entry(path, kind=tarfile.DIRTYPE))
    return tar_gz(members)


BUNDLE_ATTACKS = {
    "margin_threshold NaN": (lambda t: _bundle(t, lambda m: m["confidence"].update(margin_threshold=math.nan)),
                             "'confidence.margin_threshold'=nan must be a finite number"),
    "margin_threshold 5": (lambda t: _bundle(t, lambda m: m["confidence"].update(margin_threshold=5)),
                           "'confidence.margin_threshold'=5 must be within [0, 1]"),
    "threshold NaN": (lambda t: _bundle(t, lambda m: m["confidence"].update(threshold=math.nan)),
                      "'confidence.threshold'=nan must be a finite number"),
    "preprocessing.shape 20000x20000": (lambda t: _bundle(t, lambda m: m["preprocessing"].update(shape=[20000, 20000, 1])),
                                        "has 400000000 elements, over the limit of 4194304"),
    "input shape 1e6 x 1e6": (lambda t: _bundle(t, lambda m: m["input"].update(shape=[1, 1000000, 1000000])),
                              "over the limit of 4194304"),
    "scale 0": (lambda t: _bundle(t, lambda m: m["preprocessing"].update(scale=0)), "must not be zero"),
    "tensor scale -1": (lambda t: _bundle(t, lambda m: m["output"].update(scale=-1)), "must be >= 0"),
    "model.file ../../": (lambda t: _bundle(t, lambda m: m["model"].update(file="../../elsewhere/model.tflite")),
                          "'model.file'='../../elsewhere/model.tflite' must be a plain file name"),
    "model.file absolute": (lambda t: _bundle(t, lambda m: m["model"].update(file="/etc/passwd")),
                            "'model.file'='/etc/passwd' must be a plain file name"),
    "100 MB manifest in a small message": (lambda t: message(tar_gz([
        entry("digits-x", kind=tarfile.DIRTYPE), entry("digits-x/manifest.json", size=100 << 20),
        entry("digits-x/model.tflite", craft.model_bytes())], level=9)),
        "member 'manifest.json' is 104857600 bytes, over the limit of 1048576"),
    "manifest nested 5000 deep": (lambda t: message(_root(
        entry("digits-x/manifest.json", b"[" * 5000 + b"]" * 5000), entry("digits-x/model.tflite", craft.model_bytes()))),
        "nests JSON 5000 levels deep, over the limit of 32"),
    "2,000-deep directory tree": (lambda t: message(_deep_tree(2000)),  # refused at its second member
                                  "holds a folder 'digits-x/a' inside the bundle folder"),
    "an extra file": (lambda t: message(_root(entry("digits-x/manifest.json", craft.manifest_bytes()),
                                              entry("digits-x/model.tflite", craft.model_bytes()),
                                              entry("digits-x/run.sh", b"#!/bin/sh\n"))),
                      "holds 'run.sh' besides"),
    # held up well before: keep it so
    "../ member": (lambda t: message(_root(entry("digits-x/../../escape.txt", b"x"))), "unsafe path"),
    "absolute member": (lambda t: message(tar_gz([entry("/tmp/escape.txt", b"x")])), "unsafe path"),
    "symlink member": (lambda t: message(_root(entry("digits-x/model.tflite", kind=tarfile.SYMTYPE,
                                                     link="/etc/passwd"))), "a link, device or special file"),
    "hardlink member": (lambda t: message(_root(entry("digits-x/model.tflite", kind=tarfile.LNKTYPE,
                                                      link="digits-x/manifest.json"))), "a link, device or special file"),
    "gzip bomb": (lambda t: message(_gzip_bomb()), "over the limit of"),
    "wrong model sha256": (lambda t: _bundle(t, lambda m: m["model"].update(sha256="0" * 64), sha256="0" * 64),
                           "does not match the manifest's"),
}


def _gzip_bomb() -> bytes:
    """A 130 MiB model of zeros that gzips to about 130 KB: over 8 x max_bytes unpacked (the limit: 128 MiB)."""
    return tar_gz([entry("digits-x", kind=tarfile.DIRTYPE), entry("digits-x/manifest.json", craft.manifest_bytes()),
                   entry("digits-x/model.tflite", size=130 << 20, stream=craft.Zeros(130 << 20, b"\0"))], level=9)


@pytest.mark.parametrize("attack", sorted(BUNDLE_ATTACKS))
def test_a_hostile_bundle_is_refused_and_a_good_update_still_installs(board, tmp_path, attack):
    build, words = BUNDLE_ATTACKS[attack]
    payload = build(tmp_path)
    assert len(payload) < 1 << 20  # small messages, all of them
    board.push(payload)
    board.refused("update", words=words)
    board.still_fine()
    bundles = tmp_path / "bundles"
    assert not bundles.exists() or not any(bundles.iterdir()), "a refused bundle left files behind"
    if attack != "wrong model sha256":  # its archive is intact: remembered, never staged again
        assert json.loads(payload)["archive_sha256"] in [r["archive_sha256"] for r in state(tmp_path)["refused"]]
    board.push(json.dumps(protocol.bundle_payload(V2)).encode())  # staging, pruning: nothing was left broken
    assert wait_for(lambda: board.agent.manifest.sha256 == V2_SHA, 60), board.agent.last_update_error
    board.still_fine(V2_SHA)
    assert board.errors("update") == 1


@pytest.mark.slow
def test_150000_empty_files_are_refused_at_the_third(board, tmp_path):
    members = [entry("digits-x", kind=tarfile.DIRTYPE)] + [entry(f"digits-x/f{i}", b"") for i in range(150_000)]
    payload = message(tar_gz(members, level=9))
    board.push(payload)
    board.refused("update", words="holds 'f1' besides ['f0']")  # nothing of the other 149,998 is read
    board.still_fine()
    assert not (tmp_path / "bundles").exists() or not any((tmp_path / "bundles").iterdir())


def test_a_retained_bad_manifest_does_not_stop_a_restart(board, make_config, digits, tmp_path, sub_factory):
    board.push(_bundle(tmp_path, lambda m: m["confidence"].update(margin_threshold=math.nan)))  # retained
    board.refused("update", words="margin_threshold")
    board.finish()
    again = Board(board.broker, make_config, digits, tmp_path, sub_factory)
    try:
        again.refused("update", words="was refused before")
        again.still_fine()
    finally:
        again.finish()


def test_the_same_model_with_another_manifest_is_installed_not_ignored(board, tmp_path):
    """The cache of unpacked bundles is keyed by the archive's sha256, not by name, version and model."""
    board.push(json.dumps(protocol.bundle_payload(V2)).encode())
    assert wait_for(lambda: board.agent.manifest.sha256 == V2_SHA, 60)
    assert board.agent.manifest.confidence_threshold != 0.77
    edited = craft.edited_bundle(tmp_path, lambda m: m["confidence"].update(threshold=0.77))  # same name, version, model
    board.push(json.dumps(protocol.bundle_payload(edited)).encode())
    # the agent's thread swaps the manifest, then the policy: wait for both (this thread may look in between)
    assert wait_for(lambda: board.agent.manifest.confidence_threshold == 0.77
                    and board.agent.policy.confidence_threshold == 0.77, 60), board.agent.last_update_error
    board.still_fine(V2_SHA)
    assert board.errors("update") == 0
    assert len([p for p in (tmp_path / "bundles").iterdir()]) == 2  # two archives, two directories


def test_a_staging_directory_a_crash_left_is_removed_at_start_up_however_deep(make_config, digits, tmp_path):
    """A kill during an unpack leaves bundles/.staging-*; a tree Python's rmtree cannot remove made every later
    update crash the agent in prune(). Start-up removes it (off the loop) and updates work."""
    deep = tmp_path / "bundles" / ".staging-dead"
    path = deep
    for _ in range(2000):
        path = path / "a"
    subprocess.run(["mkdir", "-p", str(path)], check=True)
    with pytest.raises(RecursionError):
        shutil.rmtree(deep)
    config = make_config("", results={"path": str(tmp_path / "r.jsonl")})
    with Agent(config, source=endless(digits[0][:10])) as agent:  # 10 digits x 20
        assert wait_for(lambda: not deep.exists(), 60), "the stale staging directory is still there"
        agent.updater.prune(running=[])  # and pruning never raises
        stats = agent.run()
    assert stats.inferences == 200 and not stats.errors
