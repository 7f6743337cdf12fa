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
        deadline = time.monotonic() + timeout
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
            self.proc.wait(5)


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


def wait_for(predicate, timeout: float) -> bool:
    """Poll ``predicate`` every 50 ms until it holds or ``timeout`` seconds pass; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()
