"""A broker for the demo: the local one when it answers, else one we start.

:func:`find_or_start_broker` tries, in order:

1. a broker already answering at ``127.0.0.1:1883`` (an MQTT CONNECT gets a
   CONNACK), typically the machine's Mosquitto; left running afterwards;
2. the ``mosquitto`` binary, if installed, started on a free port with a
   throw-away config (MQTT 5); stopped by :meth:`DemoBroker.stop`;
3. an embedded, in-process broker (amqtt, pure Python, installed with
   ``edgekit[host]``), so the demo works with nothing else installed. amqtt
   speaks MQTT 3.1.1 only, so the agent and collector are told to use it
   (``protocol == "3.1.1"``).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import EdgekitError

__all__ = ["DemoBroker", "find_or_start_broker", "mqtt_answers", "free_port", "start_mosquitto", "start_embedded"]

log = logging.getLogger(__name__)


@dataclass
class DemoBroker:
    """A broker the demo can use: where it is, which MQTT it speaks, and how to stop it."""

    url: str
    kind: str  # "local" | "mosquitto" | "embedded"
    protocol: str  # "5" | "3.1.1"
    description: str
    _stop: Optional[Callable[[], None]] = field(default=None, repr=False)

    def stop(self) -> None:
        if self._stop is not None:
            stop, self._stop = self._stop, None
            stop()

    def __enter__(self) -> "DemoBroker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mqtt_answers(host: str, port: int, timeout: float = 2.0, protocol: str = "5") -> bool:
    """True when an MQTT broker at host:port accepts a connection (CONNACK success) within ``timeout``."""
    import paho.mqtt.client as mqtt

    try:
        with socket.create_connection((host, port), timeout=min(timeout, 1.0)):
            pass
    except OSError:
        return False
    ok = threading.Event()
    proto = mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"edgekit-probe-{time.monotonic_ns()}", protocol=proto)

    def on_connect(c: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if not reason_code.is_failure:
            ok.set()

    client.on_connect = on_connect
    try:
        client.connect(host, port, keepalive=10)
        client.loop_start()
        ok.wait(timeout)
    except (OSError, ValueError):
        return False
    finally:
        try:
            client.disconnect()
            client.loop_stop()
        except Exception:  # noqa: BLE001 - best effort on a probe
            pass
    return ok.is_set()


def _wait_until(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


def start_mosquitto(binary: str, workdir: Path, port: Optional[int] = None) -> DemoBroker:
    """``mosquitto`` on a free port of 127.0.0.1, anonymous, no persistence; stops with the demo."""
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n", encoding="utf-8")
    logf = open(workdir / "mosquitto.log", "wb")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=logf, stderr=subprocess.STDOUT)

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        logf.close()

    if not _wait_until(lambda: proc.poll() is None and mqtt_answers("127.0.0.1", port, 1.0), 10.0):
        stop()
        raise EdgekitError(f"{binary} did not start on port {port}; see {workdir / 'mosquitto.log'}")
    return DemoBroker(f"mqtt://127.0.0.1:{port}", "mosquitto", "5", f"Mosquitto started on 127.0.0.1:{port}", stop)


def start_embedded(port: Optional[int] = None) -> DemoBroker:
    """An amqtt broker in a background thread of this process (MQTT 3.1.1)."""
    try:
        from amqtt.broker import Broker
    except ImportError as exc:  # pragma: no cover - amqtt is in edgekit[host]
        raise EdgekitError(f"no broker answers and amqtt is not installed ({exc}); pip install 'edgekit[host]' "
                           "or install mosquitto") from exc
    port = port or free_port()
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="edgekit-embedded-broker", daemon=True)
    thread.start()
    logging.getLogger("amqtt").setLevel(logging.ERROR)
    logging.getLogger("transitions").setLevel(logging.WARNING)

    async def _start() -> Any:
        broker = Broker(config, loop=loop)
        await broker.start()
        return broker

    try:
        broker = asyncio.run_coroutine_threadsafe(_start(), loop).result(15)
    except Exception as exc:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        raise EdgekitError(f"the embedded broker did not start on port {port} ({exc}); install mosquitto instead") from exc

    def stop() -> None:
        try:
            asyncio.run_coroutine_threadsafe(broker.shutdown(), loop).result(10)
        except Exception as exc:  # noqa: BLE001 - shutting down anyway
            log.debug("embedded broker shutdown: %s", exc)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)

    if not _wait_until(lambda: mqtt_answers("127.0.0.1", port, 1.0, protocol="3.1.1"), 10.0):
        stop()
        raise EdgekitError(f"the embedded broker on port {port} does not answer; install mosquitto instead")
    return DemoBroker(f"mqtt://127.0.0.1:{port}", "embedded", "3.1.1",
                      f"embedded amqtt broker (MQTT 3.1.1) on 127.0.0.1:{port}, in this process", stop)


def find_or_start_broker(workdir: Path, *, prefer: str = "auto", local: str = "127.0.0.1:1883") -> DemoBroker:
    """The broker the demo uses; ``prefer`` = auto | local | mosquitto | embedded."""
    if prefer not in ("auto", "local", "mosquitto", "embedded"):
        raise EdgekitError(f"broker choice {prefer!r} is unknown; use auto, local, mosquitto or embedded")
    host, _, port = local.partition(":")
    if prefer in ("auto", "local"):
        if mqtt_answers(host, int(port or 1883)):
            return DemoBroker(f"mqtt://{host}:{port or 1883}", "local", "5",
                              f"the broker already running at {host}:{port or 1883} (MQTT 5)")
        if prefer == "local":
            raise EdgekitError(f"no MQTT broker answers at {local}; start mosquitto or use --broker auto")
    if prefer in ("auto", "mosquitto"):
        binary = shutil.which("mosquitto") or next(
            (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).is_file()), None)
        if binary:
            return start_mosquitto(binary, Path(workdir) / "mosquitto")
        if prefer == "mosquitto":
            raise EdgekitError("mosquitto is not installed; apt install mosquitto, or use --broker embedded")
    return start_embedded()


if __name__ == "__main__":  # pragma: no cover - a manual check
    with find_or_start_broker(Path(tempfile.mkdtemp()), prefer="embedded") as b:
        print(b)
