"""Fixtures shared by the host and device test suites (no TensorFlow here)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from broker import Mosquitto, port_open  # noqa: E402


@pytest.fixture
def broker(tmp_path):
    """A private Mosquitto on a free port, stoppable and restartable by the test."""
    b = Mosquitto(tmp_path / "broker")
    b.start()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def shared_broker_url():
    """The machine's Mosquitto on 127.0.0.1:1883 (started by .ci/run when missing)."""
    host, port = os.environ.get("EDGEKIT_TEST_BROKER", "127.0.0.1:1883").split(":")
    if not port_open(int(port), host):
        pytest.fail(f"no MQTT broker on {host}:{port}; start mosquitto (.ci/run does)")
    return f"mqtt://{host}:{port}"
