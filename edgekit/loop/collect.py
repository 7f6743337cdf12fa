"""The collector: MQTT -> validation -> sample store, losing nothing the broker acked to us.

Delivery: an MQTT 5 persistent session (clean start off, a session expiry),
QoS 1 subscriptions and *manual* acknowledgements. paho's network thread
only queues each message; one writer thread validates a batch, stores it in
one transaction, commits, and only then sends the PUBACKs. A collector that
dies (even ``kill -9``) before the commit never acked those messages, so
the broker delivers them again to the next collector with the same client
id; storing is idempotent by ``sample_id``, so a redelivery is one row.

Every payload is checked (size, UTF-8 JSON, the JSON Schema of its kind,
the input's base64 against its dtype and shape, topic against payload), and
with a :class:`~edgekit.loop.gate.DeviceGate` its device against an allow-list
and a rate limit first; a refused one is counted by reason and kept in the
store's quarantine table.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from device_agent.delivery import protocol as wire

from ..errors import BrokerError, EdgekitError, StoreError
from ..mqtt_url import parse_broker_url
from .gate import DeviceGate
from .store import Store
from .validate import DEFAULT_MAX_PAYLOAD_BYTES, Malformed, check_message

__all__ = ["Collector", "CollectorStats", "Malformed", "check_message", "DEFAULT_MAX_PAYLOAD_BYTES"]

log = logging.getLogger(__name__)

_BATCH = 256
_STOP = object()


@dataclass(frozen=True)
class CollectorStats:
    """Counters since start: received = stored + duplicates + telemetry + status + ignored + malformed."""

    received: int = 0
    stored: int = 0
    duplicates: int = 0
    telemetry: int = 0
    status: int = 0
    ignored: int = 0
    malformed: Dict[str, int] = field(default_factory=dict)

    @property
    def malformed_total(self) -> int:
        return sum(self.malformed.values())

    @property
    def handled(self) -> int:
        return self.stored + self.duplicates + self.telemetry + self.status + self.ignored + self.malformed_total

    def line(self) -> str:
        bad = ", ".join(f"{k}={v}" for k, v in sorted(self.malformed.items())) or "none"
        return (f"received={self.received} stored={self.stored} duplicates={self.duplicates} "
                f"telemetry={self.telemetry} status={self.status} malformed={self.malformed_total} ({bad})")


@dataclass
class _Msg:
    topic: str
    payload: bytes
    mid: int
    qos: int
    generation: int


class Collector:
    """Subscribe to a fleet's samples, telemetry and status and write them into ``store``."""

    def __init__(
        self,
        broker_url: str,
        store: Store,
        *,
        fleet: Optional[str] = None,
        client_id: str = "edgekit-collector",
        share_group: Optional[str] = None,
        session_expiry_s: int = 3600,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        ca_file: Optional[str] = None,
        cert_file: Optional[str] = None,
        key_file: Optional[str] = None,
        keepalive_s: int = 30,
        protocol: str = "5",
        gate: Optional[DeviceGate] = None,
    ) -> None:
        self.broker = parse_broker_url(broker_url)
        if protocol not in ("5", "3.1.1"):
            raise EdgekitError(f"protocol={protocol!r} is not supported; use '5' or '3.1.1'")
        # "3.1.1" is for brokers without MQTT 5 (e.g. the demo's embedded one): a persistent
        # session by clean_session=False, no session expiry, no shared subscriptions.
        self.protocol = protocol
        if protocol == "3.1.1" and share_group is not None:
            raise EdgekitError("shared subscriptions (share_group) need MQTT 5; use protocol '5'")
        try:
            if fleet is not None:
                wire.check_name(fleet, "fleet")
            if share_group is not None:
                wire.check_name(share_group, "share_group")
        except wire.ProtocolError as exc:
            raise EdgekitError(str(exc)) from None
        if not client_id or len(client_id) > 128:
            raise EdgekitError(f"client_id={client_id!r}: give 1-128 characters, the same on every restart")
        if int(session_expiry_s) < 0:
            raise EdgekitError(f"session_expiry_s={session_expiry_s}, expected >= 0 seconds")
        if int(max_payload_bytes) < 1024:
            raise EdgekitError(f"max_payload_bytes={max_payload_bytes}, expected >= 1024")
        self.store = store
        self.fleet = fleet
        self.client_id = client_id
        self.share_group = share_group
        self.session_expiry_s = int(session_expiry_s)
        self.max_payload_bytes = int(max_payload_bytes)
        self.gate = gate  # allow-list and per-device rate limit (edgekit.loop.gate), checked before the payload
        self._tls = (ca_file, cert_file, key_file)
        self._keepalive = keepalive_s
        self._queue: "queue.Queue[Any]" = queue.Queue()
        self._counts: Counter = Counter()
        self._malformed: Counter = Counter()
        self._stats_lock = threading.Lock()
        self._ready = threading.Event()
        self._error: Optional[str] = None
        self._generation = 0
        self._accepting = False
        self._client: Any = None
        self._writer: Optional[threading.Thread] = None
        self._last_message = time.monotonic()

    # -- public ----------------------------------------------------------
    @property
    def stats(self) -> CollectorStats:
        with self._stats_lock:
            c = self._counts
            return CollectorStats(received=c["received"], stored=c["stored"], duplicates=c["duplicates"],
                                  telemetry=c["telemetry"], status=c["status"], ignored=c["ignored"],
                                  malformed=dict(self._malformed))

    def subscriptions(self) -> List[str]:
        """Samples and telemetry may be shared by a group; status never is (shared
        subscriptions get no retained messages, and every collector wants them)."""
        subs = [wire.subscription(self.fleet, k, self.share_group) for k in ("samples", "telemetry")]
        subs.append(wire.subscription(self.fleet, "status"))
        return subs

    def start(self, timeout: float = 10.0) -> "Collector":
        import paho.mqtt.client as mqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        v5 = self.protocol == "5"
        extra = {} if v5 else {"clean_session": False}
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311, manual_ack=True, **extra)
        if self.broker.username:
            client.username_pw_set(self.broker.username, self.broker.password)
        if self.broker.tls:
            ca, cert, key = self._tls
            client.tls_set(ca_certs=ca, certfile=cert, keyfile=key)
        client.reconnect_delay_set(1, 30)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_disconnect = self._on_disconnect
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.session_expiry_s
        self._client = client
        self._accepting = True
        self._writer = threading.Thread(target=self._write_loop, name="edgekit-collector-writer", daemon=True)
        self._writer.start()
        try:
            if v5:
                client.connect(self.broker.host, self.broker.port, keepalive=self._keepalive,
                               clean_start=False, properties=props)
            else:
                client.connect(self.broker.host, self.broker.port, keepalive=self._keepalive)
        except (OSError, ValueError) as exc:
            self._shutdown_writer()
            raise BrokerError(f"cannot connect to {self.broker.redacted()}: {exc}; is the broker running?") from exc
        client.loop_start()
        if not self._ready.wait(timeout) or self._error:
            why = self._error or f"no CONNACK/SUBACK within {timeout}s"
            self.stop()
            raise BrokerError(f"collector on {self.broker.redacted()}: {why}")
        log.info("collecting from %s as %r: %s", self.broker.redacted(), self.client_id, ", ".join(self.subscriptions()))
        return self

    def wait_idle(self, idle_s: float, timeout: Optional[float] = None) -> bool:
        """Block until nothing arrived for ``idle_s`` seconds and everything is stored; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            quiet = time.monotonic() - self._last_message
            if quiet >= idle_s and self._queue.unfinished_tasks == 0:
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(min(0.05, max(0.01, idle_s - quiet)))

    def wait_handled(self, n: int, timeout: float) -> bool:
        """Block until ``n`` messages are handled (stored, counted or quarantined); False on timeout."""
        deadline = time.monotonic() + timeout
        while self.stats.handled < n:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def stop(self, drain_timeout: float = 10.0) -> None:
        """Store and ack what was received, then leave (the session stays for the next start)."""
        if self._client is None:
            return
        self._accepting = False
        self._queue.put(_STOP)
        if self._writer is not None:
            self._writer.join(drain_timeout)
            if self._writer.is_alive():
                log.warning("collector writer still busy after %.0fs; unacked messages stay queued at the broker",
                            drain_timeout)
        self._client.disconnect()
        self._client.loop_stop()
        self._client = None
        log.info("collector stopped: %s", self.stats.line())

    def __enter__(self) -> "Collector":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- paho callbacks (network thread: no DB work here) ----------------
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            self._error = f"broker refused the connection: {reason_code}"
            self._ready.set()
            return
        self._generation += 1
        from paho.mqtt.subscribeoptions import SubscribeOptions

        if self.protocol == "5":
            client.subscribe([(s, SubscribeOptions(qos=1)) for s in self.subscriptions()])
        else:
            client.subscribe([(s, 1) for s in self.subscriptions()])
        log.debug("connected (session present=%s)", getattr(flags, "session_present", None))

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        bad = [f"{s}: {rc}" for s, rc in zip(self.subscriptions(), reason_codes) if rc.is_failure]
        if bad:
            self._error = "subscription refused: " + "; ".join(bad)
        self._ready.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if self._accepting:
            log.warning("broker connection lost (%s); reconnecting", reason_code)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        self._last_message = time.monotonic()
        if not self._accepting:
            return  # not acked: the broker delivers it to the next session
        with self._stats_lock:
            self._counts["received"] += 1
        self._queue.put(_Msg(msg.topic, bytes(msg.payload), msg.mid, msg.qos, self._generation))

    # -- writer thread ---------------------------------------------------
    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                self._queue.task_done()
                self._drain_rest()
                return
            batch = [item]
            while len(batch) < _BATCH:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    self._queue.put(_STOP)
                    self._queue.task_done()
                    break
                batch.append(nxt)
            self._store_batch(batch)
            for _ in batch:
                self._queue.task_done()

    def _drain_rest(self) -> None:
        rest = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            self._queue.task_done()
            if item is not _STOP:
                rest.append(item)
        if rest:
            self._store_batch(rest, retry=False)

    def _shutdown_writer(self) -> None:
        self._accepting = False
        self._queue.put(_STOP)
        if self._writer is not None:
            self._writer.join(5)

    def _store_batch(self, batch: List[_Msg], retry: bool = True) -> None:
        delay = 0.5
        while True:
            try:
                counts = self._apply(batch)
                break
            except StoreError as exc:
                # Per message, so one row the database refuses cannot block the rest.
                try:
                    counts = Counter()
                    for m in batch:
                        counts += self._apply_one_or_quarantine(m)
                    break
                except StoreError:
                    if not retry or not self._accepting:
                        log.error("store unavailable (%s); %d message(s) left unacked for redelivery", exc, len(batch))
                        return
                    log.error("store unavailable (%s); retrying in %.1fs", exc, delay)
                    time.sleep(delay)
                    delay = min(delay * 2, 30.0)
        self._ack(batch)
        with self._stats_lock:
            for key, n in counts.items():
                if key.startswith("malformed:"):
                    self._malformed[key.split(":", 1)[1]] += n
                else:
                    self._counts[key] += n

    def _apply(self, batch: List[_Msg]) -> Counter:
        counts: Counter = Counter()
        samples: List[Dict[str, Any]] = []
        with self.store.batch():
            for m in batch:
                outcome = self._handle(m)
                if isinstance(outcome, dict):
                    samples.append(outcome)
                else:
                    counts[outcome] += 1
            for new in self.store.put_samples(samples):  # one INSERT for the batch's samples
                counts["stored" if new else "duplicates"] += 1
        return counts

    def _apply_one_or_quarantine(self, m: _Msg) -> Counter:
        try:
            return self._apply([m])
        except StoreError:
            pass
        try:  # twice: the first failure may have been a lost connection, now re-opened
            return self._apply([m])
        except StoreError as exc:
            self.store.quarantine(m.topic, m.payload, "store_error", str(exc).replace("\x00", ""))
            log.warning("message on %s refused by the store (%s); quarantined", m.topic, exc)
            return Counter({"malformed:store_error": 1})

    def _handle(self, m: _Msg) -> Any:
        """The counter a message goes to, or a valid sample's payload for the batch INSERT."""
        if m.topic.endswith("/status") and not m.payload:
            return "ignored"  # someone cleared the retained status
        try:
            if self.gate is not None:
                self.gate.admit(m.topic)
            kind, obj = check_message(m.topic, m.payload, self.max_payload_bytes)
        except Malformed as bad:
            self.store.quarantine(m.topic, m.payload, bad.reason, bad.detail.replace("\x00", ""))
            log.debug("quarantined a payload on %s: %s", m.topic, bad)
            return f"malformed:{bad.reason}"
        if kind == "samples":
            return obj
        if kind == "telemetry":
            self.store.put_telemetry(obj)
            return "telemetry"
        self.store.put_status(obj)
        return "status"

    def _ack(self, batch: List[_Msg]) -> None:
        client = self._client
        if client is None:
            return
        for m in batch:
            # A message from an earlier connection is redelivered on this one; its old mid means nothing now.
            if m.qos > 0 and m.generation == self._generation:
                client.ack(m.mid, m.qos)
