"""Bad input is logged in one line, counted in telemetry, and the loop goes on; a bad bundle stops start-up."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

from device_agent.agent import Agent
from device_agent.errors import BundleError, ConfigError
from device_agent.delivery.protocol import topic
from device_agent.sources import ArraySource

from conftest import BUNDLE, ROOT, TIMEOUT_SCALE, validate, wait_for


def pub(port: int, t: str, payload: str) -> None:
    subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-q", "1", "-t", t, "-m", payload], check=True)


def run_in_thread(agent):
    stop = threading.Event()
    out = {}
    th = threading.Thread(target=lambda: out.setdefault("stats", agent.run(stop)))
    th.start()
    return stop, th, out


def test_corrupt_files_and_malformed_commands_are_counted_and_skipped(
    broker, sub_factory, make_config, digits, tmp_path, caplog
):
    x, _ = digits
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    np.save(inbox / "a-good.npy", x[0])
    (inbox / "b-corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    np.save(inbox / "c-wrong-shape.npy", np.zeros((2, 3, 3, 3), np.uint8))
    (inbox / "d-notes.txt").write_text("not an input, ignored")
    sub = sub_factory(broker.port)
    config = make_config(broker.url, source={"kind": "folder", "path": str(inbox), "watch": True,
                                             "poll_interval_s": 0.1})
    caplog.set_level(logging.WARNING)
    with Agent(config) as agent:
        stop, th, out = run_in_thread(agent)
        try:
            assert wait_for(lambda: agent.stats.inferences == 1 and agent.stats.errors["input"] == 2, 20)
            cmd = topic("test", "dev1", "cmd")
            pub(broker.port, cmd, "{not json")
            pub(broker.port, cmd, json.dumps({"schema": "edgekit.cmd/1", "cmd": "format_disk"}))
            pub(broker.port, cmd, json.dumps({"schema": "edgekit.cmd/1", "cmd": "set_thresholds",
                                              "args": {"confidence": 7}}))
            pub(broker.port, cmd, json.dumps({"schema": "edgekit.cmd/1", "cmd": "set_thresholds",
                                              "args": {"confidence": 0.99, "margin": 0.5}}))
            assert wait_for(lambda: agent.stats.errors["command"] == 3 and agent.policy.margin_threshold == 0.5, 20)
            np.save(inbox / "e-late.npy", x[1])  # the loop still runs
            assert wait_for(lambda: agent.stats.inferences == 2, 20)
            pub(broker.port, cmd, json.dumps({"schema": "edgekit.cmd/1", "cmd": "send_telemetry"}))
            assert sub.wait(lambda s: any(m["errors"].get("command") == 3 for m in s.messages("telemetry")), 10)
        finally:
            stop.set()
            th.join(30)
    stats = out["stats"]
    assert dict(stats.errors) == {"input": 2, "command": 3}
    assert agent.policy.confidence_threshold == 0.99
    last = [m for m in sub.messages("telemetry") if m["errors"].get("command") == 3][-1]
    validate(last)
    assert last["errors"]["input"] == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("b-corrupt.png" in w and "not a readable image" in w for w in warnings)
    assert any("c-wrong-shape.npy" in w and "image shape=[2, 3, 3, 3]" in w for w in warnings)
    assert any("format_disk" in w for w in warnings)
    assert all("\n" not in w for w in warnings)


def test_sensor_readings_over_mqtt_with_one_malformed(broker, make_config, digits, tmp_path):
    x, _ = digits
    sensor = "sensors/dev1/frame"
    config = make_config(broker.url, source={"kind": "mqtt", "topic": sensor})
    with Agent(config) as agent:
        stop, th, out = run_in_thread(agent)
        try:
            assert agent.link.wait_subscribed(sensor, 10 * TIMEOUT_SCALE)  # a reading before the SUBACK is lost
            pub(broker.port, sensor, json.dumps({"values": x[5].reshape(-1).tolist()}))
            pub(broker.port, sensor, json.dumps({"values": ["a", "b"]}))
            pub(broker.port, sensor, json.dumps({"values": x[6].reshape(-1).tolist()}))
            assert wait_for(lambda: agent.stats.inferences == 2 and agent.stats.errors["input"] == 1, 20)
        finally:
            stop.set()
            th.join(30)
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [line["source"]["uri"] for line in lines] == [f"mqtt:{sensor}"] * 2
    # The same digits classified from a file give the same labels.
    with Agent(make_config("", outbox={"path": str(tmp_path / "o2.sqlite")},
                           results={"path": str(tmp_path / "r2.jsonl")}),
               source=ArraySource(x[5:7])) as ref:
        ref.run()
    ref_lines = [json.loads(line) for line in (tmp_path / "r2.jsonl").read_text().splitlines()]
    assert [line["label"] for line in lines] == [line["label"] for line in ref_lines]


def test_bundle_with_wrong_sha256_stops_start_up(make_config, tmp_path):
    bad = tmp_path / "bundle"
    shutil.copytree(BUNDLE, bad)
    model = bad / "model.tflite"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    config = make_config("").with_overrides(bundle=str(bad))
    with pytest.raises(BundleError, match="sha256=.* does not match the manifest"):
        Agent(config)
    assert not (tmp_path / "outbox.sqlite").exists(), "nothing may start before the bundle is verified"

    proc = subprocess.run([sys.executable, "-m", "device_agent", "run", "--bundle", str(bad), "--source",
                           str(tmp_path), "--broker", ""], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("BundleError: ")
    assert "Traceback" not in proc.stderr


def test_camera_without_opencv_is_a_clear_config_error(make_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # as on a board without OpenCV
    with pytest.raises(ConfigError, match="needs OpenCV.*pip install opencv-python-headless"):
        Agent(make_config("", source={"kind": "camera"}))


def test_unreadable_config_exits_1_with_one_line(tmp_path):
    cfg = tmp_path / "agent.toml"
    cfg.write_text("[policy]\nrandom_fraction = 1.5\n")
    proc = subprocess.run([sys.executable, "-m", "device_agent", "run", "--config", str(cfg)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "ConfigError: config [policy].random_fraction=1.5 must be within [0, 1]"
