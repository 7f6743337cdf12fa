"""Health: counters and latencies of the loop, machine readings from psutil, and systemd's watchdog.

:class:`Stats` is what the loop updates on every inference (cheap: a counter
and a bounded deque). :func:`machine` reads CPU, memory, temperature and
disk through psutil, with ``/sys/class/thermal`` as the fallback for boards
whose sensors psutil does not list. :class:`Watchdog` speaks systemd's
``sd_notify`` protocol over ``$NOTIFY_SOCKET`` with a plain socket that never
blocks the loop: a message that does not fit the socket's queue is dropped and
counted (:attr:`Watchdog.dropped`).
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Deque, Dict, Optional

import numpy as np

try:  # a dependency of the device extra; imported here so the first telemetry does not pay for it
    import psutil
except ImportError:  # pragma: no cover - telemetry then reports nulls
    psutil = None

__all__ = ["Stats", "machine", "temperature_c", "Watchdog"]

log = logging.getLogger(__name__)

_WINDOW = 1000


class Stats:
    """Counters since start, and the last 1000 latencies and confidence outcomes."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.inferences = 0
        self.flagged = 0
        self.published = 0
        self.errors: Dict[str, int] = collections.Counter()
        self.input_mismatch: Dict[str, int] = collections.Counter()  # inputs unlike the bundle's (inputcheck.KINDS)
        self._errors_lock = threading.Lock()  # the MQTT thread counts refusals too
        self.latencies_ms: Deque[float] = collections.deque(maxlen=_WINDOW)
        self.low_conf: Deque[bool] = collections.deque(maxlen=_WINDOW)

    def record(self, latency_s: float, low_confidence: bool) -> None:
        self.inferences += 1
        self.latencies_ms.append(latency_s * 1000.0)
        self.low_conf.append(low_confidence)

    def error(self, kind: str) -> None:
        with self._errors_lock:
            self.errors[kind] += 1

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self.started

    def latency(self) -> Dict[str, Optional[float]]:
        if not self.latencies_ms:
            return {"p50": None, "p95": None}
        p50, p95 = np.percentile(np.fromiter(self.latencies_ms, float), [50, 95])
        return {"p50": round(float(p50), 3), "p95": round(float(p95), 3)}

    def low_confidence_rate(self) -> Optional[float]:
        return round(sum(self.low_conf) / len(self.low_conf), 4) if self.low_conf else None


def temperature_c() -> Optional[float]:
    """The hottest CPU-ish sensor, or None when the board exposes none."""
    try:
        if psutil is None:
            raise ImportError("psutil")
        sensors = getattr(psutil, "sensors_temperatures", lambda: {})() or {}
        for name in ("cpu_thermal", "coretemp", "k10temp", "soc_thermal", "cpu-thermal"):
            if sensors.get(name):
                return round(max(s.current for s in sensors[name]), 1)
        readings = [s.current for group in sensors.values() for s in group if s.current]
        if readings:
            return round(max(readings), 1)
    except (ImportError, OSError, ValueError):
        pass
    for zone in sorted(Path("/sys/class/thermal").glob("thermal_zone*/temp")):
        try:
            return round(int(zone.read_text().strip()) / 1000.0, 1)
        except (OSError, ValueError):
            continue
    return None


_proc = None


def machine(disk_path: os.PathLike | str = "/") -> Dict[str, Any]:
    """psutil readings for the telemetry payload (None where unavailable)."""
    global _proc
    out: Dict[str, Any] = {
        "cpu_percent": None,
        "memory_rss_bytes": None,
        "memory_percent": None,
        "temperature_c": temperature_c(),
        "disk_free_bytes": None,
    }
    try:
        if psutil is None:
            raise ImportError("psutil")
        if _proc is None:
            _proc = psutil.Process()
            _proc.cpu_percent(None)
        out["cpu_percent"] = psutil.cpu_percent(None)
        out["process_cpu_percent"] = _proc.cpu_percent(None)
        out["memory_rss_bytes"] = int(_proc.memory_info().rss)
        out["memory_percent"] = psutil.virtual_memory().percent
        out["disk_free_bytes"] = int(psutil.disk_usage(str(disk_path)).free)
    except (ImportError, OSError) as exc:
        log.debug("psutil reading failed: %s", exc)
    return out


class Watchdog:
    """``sd_notify`` without a dependency: READY=1 once, WATCHDOG=1 at half of ``$WATCHDOG_USEC``.

    Sends never block: when the receiver's queue is full (``net.unix.max_dgram_qlen``, 10 datagrams by
    default; systemd is busy or the reader never reads), the message is dropped and :attr:`dropped`
    counts it. A loop that waited there would stop classifying for as long as systemd does not read.
    """

    def __init__(self) -> None:
        addr = os.environ.get("NOTIFY_SOCKET", "")
        self.address = "\0" + addr[1:] if addr.startswith("@") else addr
        usec = os.environ.get("WATCHDOG_USEC", "")
        self.period = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 else 0.0
        self._last = 0.0
        self.sent = 0  # messages the socket took
        self.dropped = 0  # messages the full socket queue did not take
        self._sock: Optional[socket.socket] = None
        if self.address:
            try:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)  # a service manager that does not read never stalls the loop
            except OSError as exc:
                log.warning("cannot open $NOTIFY_SOCKET (%s); systemd's watchdog will not be fed", exc)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, message: str) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto(message.encode(), socket.MSG_DONTWAIT, self.address)
            self.sent += 1
        except BlockingIOError:
            self.dropped += 1
            if self.dropped == 1:
                log.warning("sd_notify %r dropped: %s is full (its reader is not reading); the loop goes on "
                            "and drops what does not fit", message, self.address.lstrip("\0") or "$NOTIFY_SOCKET")
        except OSError as exc:
            log.warning("sd_notify %r failed: %s", message, exc)

    def ready(self) -> None:
        self.notify("READY=1")

    def feed(self) -> None:
        """Call often; sends WATCHDOG=1 at most once per half period."""
        if self._sock is None or not self.period:
            return
        now = time.monotonic()
        if now - self._last >= self.period:
            self._last = now
            self.notify("WATCHDOG=1")

    def stopping(self) -> None:
        self.notify("STOPPING=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
