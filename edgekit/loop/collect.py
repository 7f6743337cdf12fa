"""The collector: MQTT -> validation -> sample store, losing nothing the broker acked to us.

Delivery: an MQTT 5 persistent session (clean start off, a session expiry),
QoS 1 subscriptions and *manual* acknowledgements. paho's network thread
only queues each message; one writer thread validates a batch, stores it in
one transaction, commits, and only then sends the PUBACKs. A collector that
dies (even ``kill -9``) before the commit never acked those messages, so
the broker delivers them again to the next collector with the same client
id; storing is idempotent by ``sample_id``, so a redelivery is one row.

End to end: after the commit, the collector names the sample ids of the
batch on each board's ``.../<device>/ack`` topic (``edgekit.ack/1``, QoS 1):
stored ones (new, or duplicates of a stored sample) and quarantined ones. A
board deletes a sample from its outbox only then, and sends again what no ack
names in time, so a broker that drops queued messages loses nothing either.

A broker may refuse a subscription and keep the connection (NATS does when
it cannot create the subscription's JetStream consumer in time, as while a
cluster that lost a node elects new leaders): after start-up, the collector
subscribes again to what was refused, with backoff, until the broker takes it.

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
from typing import Any, Callable, Dict, List, Optional

from device_agent.delivery import protocol as wire
from device_agent.delivery.mqtt import move_to

from ..errors import BrokerError, EdgekitError
from ..mqtt_url import parse_broker_url
from .gate import DeviceGate
from .store import Store
from .collect_write import _STOP, WritePath, _Msg
from .validate import DEFAULT_MAX_PAYLOAD_BYTES, Malformed, check_message

__all__ = ["Collector", "CollectorStats", "Malformed", "check_message", "DEFAULT_MAX_PAYLOAD_BYTES"]

log = logging.getLogger(__name__)


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
    acked: int = 0  # sample ids named in edgekit.ack/1 messages to the boards (stored, duplicate or quarantined)

    @property
    def malformed_total(self) -> int:
        return sum(self.malformed.values())

    @property
    def handled(self) -> int:
        return self.stored + self.duplicates + self.telemetry + self.status + self.ignored + self.malformed_total

    def line(self) -> str:
        bad = ", ".join(f"{k}={v}" for k, v in sorted(self.malformed.items())) or "none"
        return (f"received={self.received} stored={self.stored} duplicates={self.duplicates} "
                f"telemetry={self.telemetry} status={self.status} malformed={self.malformed_total} ({bad}) "
                f"acked={self.acked}")


class Collector(WritePath):
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
        receive_maximum: int = 1000,
        gate: Optional[DeviceGate] = None,
    ) -> None:
        # Several nodes of a clustered broker, comma-separated: connect to the first that answers, move on
        # to the next whenever the connection drops (the persistent session lives in the cluster).
        self.brokers = [parse_broker_url(u) for u in str(broker_url).split(",")]
        first = self.broker = self.brokers[0]
        if any((b.tls, b.username, b.password) != (first.tls, first.username, first.password) for b in self.brokers):
            raise EdgekitError(f"broker URLs {', '.join(b.redacted() for b in self.brokers)} differ in scheme or "
                               "credentials; give every node of one cluster the same")
        self._node = 0
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
        if not 1 <= int(receive_maximum) <= 65535:
            raise EdgekitError(f"receive_maximum={receive_maximum}, expected 1-65535 messages")
        # MQTT 5: the broker sends at most this many unacknowledged messages; the rest wait at the broker
        # (bounded by its queue limit: what it drops there, the boards send again for want of an ack).
        self.receive_maximum = int(receive_maximum)
        self.store = store
        self.fleet = fleet
        self.client_id = client_id
        self.share_group = share_group
        self.session_expiry_s = int(session_expiry_s)
        self.max_payload_bytes = int(max_payload_bytes)
        self.gate = gate  # allow-list and per-device rate limit (edgekit.loop.gate), checked before the payload
        self._tls = (ca_file, cert_file, key_file)
        self._keepalive = keepalive_s
        # paho's thread puts, the writer gets: a SimpleQueue (in C) costs the network thread least.
        self._queue: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._received = 0  # written by paho's network thread only
        self._done = 0  # messages the writer has handled (stored, counted or quarantined); written by it only
        self._counts: Dict[str, int] = dict.fromkeys(("stored", "duplicates", "telemetry", "status", "ignored",
                                                       "acked"), 0)
        self._malformed: Counter = Counter()
        self._stats_lock = threading.Lock()
        self._ready = threading.Event()
        self._error: Optional[str] = None
        self._generation = 0
        self._accepting = False
        self._client: Any = None
        self._writer: Optional[threading.Thread] = None
        self._last_message = time.monotonic()
        self._last_ack_info: Any = None
        self._subscribing: Dict[int, "tuple[int, List[str]]"] = {}  # SUBSCRIBE mid -> (generation, filters)
        self._refusals: Dict[str, int] = {}  # filter -> refusals in a row on this connection
        self._sub_lock = threading.Lock()
        self._retry: Optional[threading.Timer] = None
        self.session_present = False  # the broker still had this client id's session at the last connect
        self.resubscribed = 0  # subscriptions the broker refused after start-up and took on a later try

    # -- public ----------------------------------------------------------
    @property
    def connected(self) -> bool:
        """Connected to a broker node now (:attr:`broker`)."""
        client = self._client
        return client is not None and client.is_connected()

    @property
    def stats(self) -> CollectorStats:
        with self._stats_lock:
            c = dict(self._counts)
            malformed = dict(self._malformed)
        # read after the counts: received only grows, so it is never below what they add up to
        return CollectorStats(received=self._received, malformed=malformed, **c)

    def subscriptions(self) -> List[str]:
        """Samples and telemetry may be shared by a group; status never is (shared
        subscriptions get no retained messages, and every collector wants them)."""
        subs = [wire.subscription(self.fleet, k, self.share_group) for k in ("samples", "telemetry")]
        subs.append(wire.subscription(self.fleet, "status"))
        return subs

    def start(self, timeout: float = 10.0, cancel: Optional[Callable[[], bool]] = None) -> "Collector":
        """Connect and subscribe; raises :class:`BrokerError` when that fails within ``timeout``.

        ``cancel`` is polled while waiting for the broker: when it says True the collector
        stops and ``start()`` returns at once (a stop request during start-up).
        """
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
        props.ReceiveMaximum = self.receive_maximum
        self._client = client
        self._accepting = True
        self._writer = threading.Thread(target=self._write_loop, name="edgekit-collector-writer", daemon=True)
        self._writer.start()
        client.on_connect_fail = self._on_connect_fail
        errors = []
        for i, node in enumerate(self.brokers):
            log.info("connecting to %s as %r (MQTT %s)", node.redacted(), self.client_id, self.protocol)
            try:
                if v5:
                    client.connect(node.host, node.port, keepalive=self._keepalive, clean_start=False,
                                   properties=props)
                else:
                    client.connect(node.host, node.port, keepalive=self._keepalive)
            except (OSError, ValueError) as exc:
                errors.append(f"{node.redacted()}: {exc}")
                continue
            self._node, self.broker = i, node
            break
        else:
            self._shutdown_writer()
            self._client = None
            raise BrokerError(f"cannot connect to {'; '.join(errors)}; is the broker running?")
        client.loop_start()
        deadline = time.monotonic() + timeout
        while not self._ready.wait(min(0.1, max(0.0, deadline - time.monotonic()))):
            if cancel is not None and cancel():
                log.info("stop requested while connecting to %s", self.broker.redacted())
                self.stop(drain_timeout=1.0)
                return self
            if time.monotonic() >= deadline:
                break
        if not self._ready.is_set() or self._error:
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
            if quiet >= idle_s and self._done == self._received:
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
        with self._sub_lock:
            if self._retry is not None:
                self._retry.cancel()
        self._queue.put(_STOP)
        if self._writer is not None:
            self._writer.join(drain_timeout)
            if self._writer.is_alive():
                log.warning("collector writer still busy after %.0fs; unacked messages stay queued at the broker",
                            drain_timeout)
        info = self._last_ack_info
        if info is not None and self._ready.is_set():  # let the last acks reach the broker (else: a resend)
            try:
                info.wait_for_publish(2.0)
            except (RuntimeError, ValueError):
                pass
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
        with self._sub_lock:
            self._subscribing.clear()
            self._refusals.clear()
        self._subscribe(client, self._generation, self.subscriptions())
        self.session_present = bool(getattr(flags, "session_present", False))
        log.log(logging.INFO if self._generation > 1 else logging.DEBUG, "connected to %s (session present=%s)",
                self.broker.redacted(), self.session_present)

    def _subscribe(self, client: Any, generation: int, filters: List[str]) -> None:
        """One SUBSCRIBE (QoS 1) for ``filters``; its SUBACK is checked in :meth:`_on_subscribe`."""
        from paho.mqtt.subscribeoptions import SubscribeOptions

        with self._sub_lock:  # the mid is recorded before the network thread can read the SUBACK
            if self.protocol == "5":
                rc, mid = client.subscribe([(s, SubscribeOptions(qos=1)) for s in filters])
            else:
                rc, mid = client.subscribe([(s, 1) for s in filters])
            if mid is not None and not rc:
                self._subscribing[mid] = (generation, list(filters))

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        with self._sub_lock:
            generation, filters = self._subscribing.pop(mid, (-1, []))
        if generation != self._generation:
            return  # an earlier connection's: the reconnect subscribed everything again
        refused = [(s, rc) for s, rc in zip(filters, reason_codes) if rc.is_failure]
        if not self._ready.is_set():  # start-up: a refusal is an error the operator must see (e.g. an ACL)
            if refused:
                self._error = "subscription refused: " + "; ".join(f"{s}: {rc}" for s, rc in refused)
            self._ready.set()
            return
        with self._sub_lock:
            for s, rc in zip(filters, reason_codes):
                if not rc.is_failure and self._refusals.pop(s, 0):
                    self.resubscribed += 1
                    log.info("the broker %s took the subscription to %s on a later try", self.broker.redacted(), s)
            if not refused or not self._accepting:
                return
            tries = max(self._refusals.get(s, 0) for s, _ in refused)
            for s, _ in refused:
                self._refusals[s] = self._refusals.get(s, 0) + 1
            delay = min(30.0, 2.0 ** min(tries, 5))
            (log.warning if tries == 0 else log.debug)(
                "the broker %s refused the subscription to %s (%s); subscribing again in %.0f s, and on until it "
                "takes it (nothing on it reaches the store meanwhile)", self.broker.redacted(),
                ", ".join(s for s, _ in refused), ", ".join(str(rc) for _, rc in refused), delay)
            self._retry = threading.Timer(delay, self._subscribe_again, (client, generation, [s for s, _ in refused]))
            self._retry.daemon = True
            self._retry.start()

    def _subscribe_again(self, client: Any, generation: int, filters: List[str]) -> None:
        if self._accepting and generation == self._generation and client.is_connected():
            self._subscribe(client, generation, filters)

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if self._accepting:
            log.warning("broker connection to %s lost (%s); reconnecting", self.broker.redacted(), reason_code)
            self._next_node(client)

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        if self._accepting:
            self._next_node(client)

    def _next_node(self, client: Any) -> None:
        if len(self.brokers) > 1:
            self._node = (self._node + 1) % len(self.brokers)
            self.broker = self.brokers[self._node]
            move_to(client, self.broker.host, self.broker.port)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        self._last_message = time.monotonic()
        if not self._accepting:
            return  # not acked: the broker delivers it to the next session
        self._received += 1
        self._queue.put(_Msg(msg.topic, bytes(msg.payload), msg.mid, msg.qos, self._generation))

    # -- writer thread ---------------------------------------------------
