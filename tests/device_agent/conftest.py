"""Device-side fixtures: the digits bundle, 300 real digits, configs, and an independent MQTT subscriber.

No TensorFlow, no edgekit: these tests run in .venv-device and .venv-tflite.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
import pytest

from device_agent.config import load_config
from device_agent.inference.interpreter import available_runtimes
from device_agent.delivery import protocol
from device_agent.delivery.protocol import SCHEMAS

DATA = Path(__file__).parent / "data"
BUNDLE = DATA / "digits-bundle"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def digits() -> Tuple[np.ndarray, np.ndarray]:
    with np.load(DATA / "digits-300.npz") as d:
        return d["x"], d["y"]


@pytest.fixture(scope="session")
def expected_runtime() -> str:
    """The runtime CI says this venv has (Makefile sets EDGEKIT_EXPECT_RUNTIME), else the first installed."""
    return os.environ.get("EDGEKIT_EXPECT_RUNTIME") or available_runtimes()[0]


@pytest.fixture
def make_config(tmp_path, expected_runtime) -> Callable:
    """A config for one test: private outbox and results, fast reconnects, the expected runtime."""

    def make(broker_url: str = "", **tables):
        base = {
            "mqtt": {"reconnect_min_s": 0.2, "reconnect_max_s": 1.0, **tables.pop("mqtt", {})},
            "telemetry": {"period_s": 1.0, **tables.pop("telemetry", {})},
            "outbox": {"path": str(tmp_path / "outbox.sqlite"), "drain_timeout_s": 20.0, **tables.pop("outbox", {})},
            "results": {"path": str(tmp_path / "results.jsonl"), **tables.pop("results", {})},
            "runtime": {"name": expected_runtime, **tables.pop("runtime", {})},
            # Probation judges errors here, not latency: a p95 on a machine the whole suite shares says nothing
            # of the model. The probation and shadow tests set their latency limits themselves.
            "update": {"probation_latency_ratio": 0.0, **tables.pop("update", {})},
        }
        return load_config(None, bundle=str(BUNDLE), broker=broker_url, device_id="dev1", fleet="test",
                           **base, **tables)

    return make


def validate(payload: dict) -> None:
    """Check a payload against its JSON Schema (protocol.SCHEMAS), with format checks."""
    import jsonschema

    schema = SCHEMAS[payload["schema"]]
    jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker()).validate(payload)


PROBE = "edgekit/v1/_probe"


class Sub:
    """``mosquitto_sub`` (an independent client) collecting ``topic payload`` lines, with a persistent session."""

    def __init__(self, port: int, topic: str = "edgekit/v1/#", client_id: str = "edgekit-test-sub"):
        self.port = port
        self.topic = topic
        self.client_id = client_id
        self.lines: List[Tuple[str, str]] = []
        self.probes: List[str] = []  # payloads on PROBE: proof of a live subscription, kept apart from lines
        self._lock = threading.Lock()
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "Sub":
        from paho.mqtt.client import topic_matches_sub

        probe = [] if topic_matches_sub(self.topic, PROBE) else ["-t", PROBE]
        # -c with a fixed id: the broker queues QoS 1 messages for us while we are away.
        self.proc = subprocess.Popen(
            # stdbuf -oL: one line per message as it arrives (a pipe is block-buffered otherwise)
            ["stdbuf", "-oL", "mosquitto_sub", "-h", "127.0.0.1", "-p", str(self.port), "-t", self.topic, *probe,
             "-q", "1", "-v", "-c", "-i", self.client_id, "-V", "mqttv311"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        # Subscribed for sure before the test goes on (a test that stops the broker next would otherwise
        # leave a mosquitto_sub that never connected, and so never reconnects; slow under emulation).
        if not self.synced(timeout=60):
            raise RuntimeError(f"mosquitto_sub on port {self.port} did not subscribe to {self.topic} within 60 s")
        return self

    def _read(self, proc) -> None:
        for line in proc.stdout:
            t, _, p = line.rstrip("\n").partition(" ")
            with self._lock:
                if t == PROBE:
                    self.probes.append(p)
                else:
                    self.lines.append((t, p))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def messages(self, kind: Optional[str] = None) -> List[dict]:
        with self._lock:
            lines = list(self.lines)
        return [json.loads(p) for t, p in lines if kind is None or t.endswith("/" + kind)]

    def samples(self) -> List[dict]:
        return self.messages("samples")

    def wait(self, predicate: Callable[["Sub"], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout * TIMEOUT_SCALE
        while time.monotonic() < deadline:
            if predicate(self):
                return True
            time.sleep(0.1)
        return predicate(self)

    def synced(self, timeout: float = 10.0) -> bool:
        """Publish a probe and wait for it: the subscriber is (re)connected and subscribed."""
        token = f"probe-{time.monotonic_ns()}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(self.port), "-q", "1",
                            "-t", PROBE, "-m", json.dumps({"probe": token})], capture_output=True)
            if self.wait(lambda s: any(token in p for p in s.probes), 1.0):
                return True
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:  # a loaded machine: it is only a test's subscriber
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def sub_factory():
    subs: List[Sub] = []

    def make(port: int, **kw) -> Sub:
        s = Sub(port, **kw).start()
        subs.append(s)
        return s

    yield make
    for s in subs:
        s.stop()


class Acker:
    """What a collector does for the boards, and nothing else: after "storing" a sample, name its id in an
    ``edgekit.ack/1`` on the device's ack topic. A plain paho client with a persistent session (the broker
    keeps samples for it while it is away) that reconnects by itself (a test may stop and start the broker).
    The device tests have no edgekit collector (no edgekit here); tests/edgekit/test_delivery.py runs the
    real one.
    """

    def __init__(self, port: int, topic: str = "edgekit/v1/+/+/samples"):
        import paho.mqtt.client as paho

        self.port, self.topic = port, topic
        self.acked: List[str] = []
        self.paused = False
        self._lock = threading.Lock()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"edgekit-test-acker-{port}",
                                  protocol=paho.MQTTv311, clean_session=False)
        self.client.reconnect_delay_set(0.1, 0.5)
        self.subscribed = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(self.topic, qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subscribed.set()
        self.client.on_message = self._message

    def _message(self, client, userdata, msg) -> None:
        if self.paused:
            return
        try:
            sample_id = json.loads(msg.payload)["sample_id"]
        except (ValueError, KeyError, TypeError):
            return
        fleet, device = msg.topic.split("/")[2:4]
        ack = protocol.ack_payload([sample_id])
        client.publish(protocol.topic(fleet, device, "ack"), json.dumps(ack), qos=1)
        with self._lock:
            self.acked.append(sample_id)

    def start(self) -> "Acker":
        self.client.connect_async("127.0.0.1", self.port, keepalive=5)
        self.client.loop_start()
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def broker(broker):
    """The private Mosquitto of tests/conftest.py with an :class:`Acker` on it (``broker.acker``): boards
    delete a sample when a collector acknowledges it (``[mqtt].ack = "collector"``), so every device test
    that expects an outbox to drain needs one. ``broker.acker.paused = True`` makes it an old collector."""
    broker.acker = Acker(broker.port).start()
    assert broker.acker.subscribed.wait(10), "the acker did not subscribe"  # from now on the broker keeps samples for it
    yield broker
    broker.acker.stop()


# Every wait in these tests is an upper bound on how long an outcome may take, never a pace. Under emulation
# (tools/arm/inside.sh: qemu-user, several times slower) the bounds are stretched by this factor.
TIMEOUT_SCALE = float(os.environ.get("EDGEKIT_TEST_TIMEOUT_SCALE", "1"))


def wait_for(predicate, timeout: float) -> bool:
    """Poll ``predicate`` every 50 ms until it holds or ``timeout`` (x TIMEOUT_SCALE) seconds pass; its last answer."""
    deadline = time.monotonic() + timeout * TIMEOUT_SCALE
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()
