"""Which devices the collector takes messages from, and how fast: its allow-list and per-device rate limit.

The topic's ``<fleet>/<device>`` is the identity: with the broker configuration of
``edgekit broker-config`` only the board whose certificate says so can publish there, and
:func:`~edgekit.loop.validate.check_message` refuses a payload that claims another. The gate
decides on that identity before the payload is parsed:

* ``allow``: a CA directory or a copy of its ``enrolled.json`` (every board with a valid
  certificate, in its fleet; re-read when the list changes, so a board enrolled or revoked while the collector runs
  counts from then on) or a file of ``fleet/device`` (or ``device``) lines. Anyone else:
  ``not_allowed``.
* ``rate_per_minute``: a token bucket per device (``burst`` tokens, refilled at the rate); a
  message beyond it: ``rate_limited``. Set it above what the boards' ``[policy].max_per_*`` allow,
  with a burst that covers the backlog the broker holds for the collector while it is away, since
  the backlog arrives at once.

A refused message is counted by reason and quarantined by the collector, like a malformed one.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Dict, Optional, Set, Tuple

from device_agent.delivery import protocol as wire

from ..errors import EdgekitError
from .validate import Malformed

__all__ = ["DeviceGate"]

_RELOAD_CHECK_S = 2.0
_MAX_BUCKETS = 100_000


class DeviceGate:
    """``gate.admit(topic)`` returns, or raises :class:`Malformed` (``not_allowed`` / ``rate_limited``)."""

    def __init__(self, *, allow: Optional[os.PathLike | str] = None, rate_per_minute: Optional[float] = None,
                 burst: Optional[int] = None, clock=time.monotonic):
        if rate_per_minute is not None and rate_per_minute <= 0:
            raise EdgekitError(f"rate_per_minute={rate_per_minute} must be > 0 (or None for no limit)")
        if burst is not None and burst < 1:
            raise EdgekitError(f"burst={burst} must be >= 1")
        self.allow_path = Path(allow) if allow is not None else None
        self.rate = float(rate_per_minute) / 60.0 if rate_per_minute else None
        self.burst = float(burst if burst is not None else max(1, int(rate_per_minute or 0)))
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: Dict[Tuple[str, str], Tuple[float, float]] = {}
        self._allowed: Optional[Set[Tuple[Optional[str], str]]] = None
        self._stamp: Optional[Tuple[float, int]] = None
        self._checked = 0.0
        if self.allow_path is not None:
            self._load()

    # -- allow-list --------------------------------------------------------
    def _source(self) -> Path:
        p = self.allow_path
        return p / "enrolled.json" if p.is_dir() else p

    def _load(self) -> None:
        from ..fleet.identity import read_allow_list

        src = self._source()
        st = src.stat() if src.exists() else None
        self._allowed = read_allow_list(self.allow_path)
        self._stamp = (st.st_mtime, st.st_size) if st else None

    def _maybe_reload(self) -> None:
        now = self._clock()
        if now - self._checked < _RELOAD_CHECK_S:
            return
        self._checked = now
        try:
            st = self._source().stat()
            if (st.st_mtime, st.st_size) != self._stamp:
                self._load()
        except (OSError, EdgekitError):
            pass  # keep the last good list: a half-copied file must not open (or close) the gate

    def allowed(self, fleet: str, device: str) -> bool:
        if self.allow_path is None:
            return True
        self._maybe_reload()
        allowed = self._allowed or set()
        return (fleet, device) in allowed or (None, device) in allowed

    # -- the gate ----------------------------------------------------------
    def admit(self, topic: str) -> None:
        try:
            parts = wire.parse_topic(topic)
        except wire.ProtocolError:
            return  # not a device topic: the payload check says bad_topic
        fleet, device = parts["fleet"], parts["device"]
        with self._lock:
            if not self.allowed(fleet, device):
                raise Malformed("not_allowed", f"device {fleet}/{device} is not on the allow-list "
                                               f"{self.allow_path}; enroll it (`edgekit fleet enroll`)")
            if self.rate is None:
                return
            now = self._clock()
            tokens, last = self._buckets.get((fleet, device), (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens < 1.0:
                self._buckets[(fleet, device)] = (tokens, now)
                raise Malformed("rate_limited", f"device {fleet}/{device} sent more than {self.rate * 60:g} "
                                                f"messages/minute (burst {self.burst:g})")
            if len(self._buckets) >= _MAX_BUCKETS:  # invented names must not grow memory without bound
                self._buckets = {k: v for k, v in self._buckets.items()
                                 if v[0] + (now - v[1]) * self.rate < self.burst}
            self._buckets[(fleet, device)] = (tokens - 1.0, now)
