"""Helpers for the collector and store tests: both store backends, payload builders, a paho publisher."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from device_agent.delivery import protocol
from edgekit.loop.store import open_store

PG_BASE = "postgresql://postgres@127.0.0.1:5432/test"
MODEL = {"name": "digits", "version": "1.0.0", "sha256": "ab" * 32}
LABELS = [str(i) for i in range(10)]


def store_url_for(kind: str, tmp_path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path}/samples.db"
    return f"{PG_BASE}?schema=ek_test_{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request, tmp_path):
    url = store_url_for(request.param, tmp_path)
    yield url
    if request.param == "postgres":
        with open_store(url) as s:
            s.drop()


@pytest.fixture
def store(store_url):
    with open_store(store_url) as s:
        yield s


def prediction(index: int = 3, confidence: float = 0.42) -> Dict[str, Any]:
    second = (index + 1) % 10
    return {
        "label": LABELS[index], "index": index, "confidence": confidence, "margin": round(confidence - 0.3, 3),
        "entropy": 1.5,
        "top_k": [{"label": LABELS[index], "index": index, "score": confidence},
                  {"label": LABELS[second], "index": second, "score": 0.3}],
    }


def sample(seq: int, *, device: str = "pi-1", fleet: str = "lab", raw: Optional[np.ndarray] = None,
           confidence: float = 0.42, index: int = 3, reasons: Iterable[str] = ("low_confidence",),
           version: str = "1.0.0") -> Dict[str, Any]:
    if raw is None:
        raw = np.random.default_rng(seq).integers(0, 256, (8, 8, 1), dtype=np.uint8)
    return protocol.sample_payload(device=device, fleet=fleet, seq=seq, model=dict(MODEL, version=version),
                                   prediction=prediction(index, confidence), reasons=list(reasons), raw=raw,
                                   source={"file": f"in-{seq}.npy"})


def telemetry(*, device: str = "pi-1", fleet: str = "lab", inferences: int = 1234, depth: int = 3,
              dropped: int = 2, temperature: Optional[float] = 51.5, ts: Optional[float] = None) -> Dict[str, Any]:
    return {
        "schema": "edgekit.telemetry/1", "device": device, "fleet": fleet, "ts": ts or time.time(),
        "uptime_s": 60.0, "cpu_percent": 12.5, "memory_rss_bytes": 50_000_000, "temperature_c": temperature,
        "inferences": inferences, "flagged": 100, "latency_ms": {"p50": 0.4, "p95": 0.9},
        "low_confidence_rate": 0.081, "outbox": {"depth": depth, "bytes": 4096, "dropped": dropped},
        "model": MODEL, "runtime": "ai_edge_litert",
    }


class Publisher:
    """A plain paho MQTT 5 client publishing with QoS 1 (what a board does)."""

    def __init__(self, port: int, client_id: str = "", will: Optional[Tuple[str, bytes]] = None):
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.max_queued_messages_set(0)
        if will:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.infos: List[Any] = []

    def publish(self, topic: str, payload: Any, qos: int = 1, retain: bool = False) -> None:
        data = payload if isinstance(payload, (bytes, bytearray)) else json.dumps(payload).encode()
        self.infos.append(self.client.publish(topic, data, qos=qos, retain=retain))

    def flush(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        for info in self.infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            assert info.is_published(), "the broker did not acknowledge a QoS 1 publish in time"
        self.infos.clear()

    def close(self) -> None:
        self.flush()
        self.client.disconnect()
        self.client.loop_stop()
