"""The one module that imports paho-mqtt: the agent's connection to the broker.

:class:`Link` owns a paho ``Client(CallbackAPIVersion.VERSION2)`` with its
network thread (``loop_start``), MQTT 5 by default (3.1.1 as an option), TLS
with a CA and client certificates, username/password, and a retained last
will that says ``offline``. Reconnects back off exponentially
(``reconnect_delay_set``) plus a random extra of up to half the delay, so a
fleet that lost its broker does not come back in lock step.

``[mqtt].broker`` may name several nodes of a clustered broker (comma-separated):
the link connects to the first and moves on to the next whenever a connection
fails or drops, round and round.

A broker may refuse a subscription and keep the connection (a SUBACK with a
failure code): an ACL that does not let the board read a topic, or a NATS node
that cannot create the subscription's JetStream consumer while its cluster
elects new leaders after losing a node. :class:`Link` then subscribes again on
the same connection, with the reconnect backoff, until the broker takes it, and
counts each subscription taken after a refusal in :attr:`Link.resubscribed`.

paho keeps unacknowledged messages in memory only. Persistence is the
outbox's job: :class:`Link` reports every PUBACK (its ``mid`` and whether the
broker accepted it) on :attr:`Link.acks`, and bumps :attr:`Link.generation`
on every successful connection so the publisher replays the outbox.
"""

from __future__ import annotations

import logging
import queue
import random
import socket
import ssl
import threading
import time
from typing import Callable, Dict, Optional, Tuple

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from ..errors import ConfigError

__all__ = ["Link", "move_to"]

_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux only
log = logging.getLogger(__name__)

MessageHandler = Callable[[str, bytes], None]


def move_to(client: "paho.Client", host: str, port: int) -> None:
    """Point a client's next (re)connection at another node. paho's own ``host``/``port`` setters refuse
    while a lost connection is being re-established, which is the moment to switch, so this sets the
    two attributes its ``reconnect()`` reads (``_host``, ``_port``; the same in paho 1.x and 2.x)."""
    client._host, client._port = host, int(port)


class Link:
    """A supervised MQTT connection. ``start()``, ``publish()``, ``close()``."""

    def __init__(
        self,
        cfg,
        *,
        client_id: str,
        will: Optional[Tuple[str, bytes]] = None,
        on_connect: Optional[Callable[[], None]] = None,
        max_packet_bytes: int = 0,
        on_error: Optional[Callable[[], None]] = None,
    ):
        self.cfg = cfg
        self.acks: "queue.SimpleQueue[Tuple[int, bool]]" = queue.SimpleQueue()
        self.generation = 0
        self.resubscribed = 0  # subscriptions the broker refused first and took on a later SUBSCRIBE
        self.connected = threading.Event()
        self.last_error = ""
        self._stop = threading.Event()
        self._started = False
        self._failures = 0
        self._on_connect_hook = on_connect
        self._on_error = on_error
        self._connect_properties = None
        if max_packet_bytes and cfg.protocol == "5":
            # MQTT 5: the broker must not send this client a bigger packet (it drops it), so nothing
            # bigger is ever read into memory here. MQTT 3.1.1 has no such limit.
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            self._connect_properties = Properties(PacketTypes.CONNECT)
            self._connect_properties.MaximumPacketSize = int(max_packet_bytes)
        self._handlers: Dict[str, MessageHandler] = {}
        self._subscribing: Dict[int, Tuple[int, Tuple[str, ...]]] = {}  # SUBSCRIBE mid -> (generation, topics)
        self._refusals: Dict[str, int] = {}  # topic -> refusals in a row on this connection
        self._sub_lock = threading.Lock()
        self._connect_lock = threading.RLock()
        self._taken: set = set()  # topics whose SUBSCRIBE the broker took on the current connection
        self._taken_changed = threading.Condition(self._sub_lock)
        self._retry: Optional[threading.Timer] = None
        self._endpoints = cfg.endpoints
        self._endpoint = 0
        protocol = paho.MQTTv5 if cfg.protocol == "5" else paho.MQTTv311
        kwargs = {"client_id": client_id, "protocol": protocol}
        if protocol == paho.MQTTv311:
            kwargs["clean_session"] = True
        self.client = paho.Client(CallbackAPIVersion.VERSION2, **kwargs)
        self.client.max_inflight_messages_set(cfg.max_inflight)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(min_delay=cfg.reconnect_min_s, max_delay=cfg.reconnect_max_s)
        if cfg.username:
            self.client.username_pw_set(cfg.username, cfg.password or None)
        if cfg.tls:
            try:
                self.client.tls_set(
                    ca_certs=cfg.ca_file or None,
                    certfile=cfg.cert_file or None,
                    keyfile=cfg.key_file or None,
                    tls_version=ssl.PROTOCOL_TLS_CLIENT,
                )
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise ConfigError(
                    f"config [mqtt] TLS files cannot be used (ca_file={cfg.ca_file!r}, cert_file={cfg.cert_file!r}, "
                    f"key_file={cfg.key_file!r}): {exc}; check the paths and that the key matches the certificate"
                ) from exc
        if will:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.client.on_connect = self._connected
        self.client.on_disconnect = self._disconnected
        self.client.on_connect_fail = self._connect_failed
        self.client.on_publish = self._published
        self.client.on_subscribe = self._subscribed
        self.client.on_message = self._message

    # -- lifecycle ----------------------------------------------------------
    def start(self) -> "Link":
        """Connect in the background (idempotent); reconnects happen by themselves until :meth:`close`."""
        if not self._started:
            self._started = True
            self.client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s,
                                      properties=self._connect_properties)
            self.client.loop_start()
        return self

    def wait_subscribed(self, topic: str, timeout: float) -> bool:
        """True once the broker has taken the subscription to ``topic`` on the current connection (its SUBACK):
        from then on, what is published there reaches this client."""
        deadline = time.monotonic() + timeout
        with self._taken_changed:
            while topic not in self._taken:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._taken_changed.wait(left)
            return True

    def ack_now(self) -> None:
        """Acknowledge at once (TCP) what the broker has sent (Linux's TCP_QUICKACK, set again before each wait:
        the kernel clears it). A broker with Nagle on (Mosquitto's default) holds each small PUBACK until the
        previous one is acknowledged, and with nothing to send the board's kernel delays that for up to 40 ms:
        a drain with the last PUBACKs queued waited about that long for them. Elsewhere a no-op."""
        sock = self.client.socket() if _QUICKACK is not None else None
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
            except (OSError, ValueError):
                pass

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    def close(self, last: Optional[Tuple[str, bytes]] = None, timeout: float = 2.0) -> None:
        """Publish ``last`` (retained, e.g. status offline) if connected, disconnect, stop the thread."""
        self._stop.set()
        with self._sub_lock:
            if self._retry is not None:
                self._retry.cancel()
        with self._connect_lock:
            info = self.client.publish(last[0], last[1], qos=1, retain=True) \
                if self.connected.is_set() and last is not None else None
        if info is not None:
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()

    # -- traffic ------------------------------------------------------------
    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> Optional[int]:
        """Hand one message to paho; its ``mid`` (acknowledged later on :attr:`acks`), or None if offline."""
        if not self.connected.is_set():
            return None
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            log.warning("publish to %s failed: %s", topic, paho.error_string(info.rc))
            return None
        return info.mid

    def subscribe(self, topic: str, handler: MessageHandler) -> None:
        """Call ``handler(topic, payload)`` (in the MQTT thread) for each message; re-subscribed on reconnect."""
        self._handlers[topic] = handler
        self.client.message_callback_add(topic, lambda c, u, m: self._guarded(handler, m.topic, m.payload))
        if self.connected.is_set():
            self._subscribe(self.generation, [topic])

    def _subscribe(self, generation: int, topics) -> None:
        """One SUBSCRIBE (QoS 1) for ``topics``; its SUBACK is checked in :meth:`_subscribed`."""
        topics = tuple(topics)
        with self._sub_lock:  # the mid is recorded before paho's thread can see the SUBACK
            rc, mid = self.client.subscribe([(t, 1) for t in topics])
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                self._subscribing[mid] = (generation, topics)

    def _guarded(self, handler: MessageHandler, topic: str, payload: bytes) -> None:
        """An exception in a handler would end paho's network thread (and every later message): log, count."""
        try:
            handler(topic, payload)
        except Exception as exc:  # noqa: BLE001 - RecursionError, MemoryError, ...: the connection goes on
            log.warning("message on %s (%d bytes) failed in its handler (%s: %s); counted in errors.mqtt", topic,
                        len(payload), exc.__class__.__name__, str(exc)[:200])
            if self._on_error is not None:
                self._on_error()

    # -- paho callbacks (network thread) -----------------------------------
    def _connected(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.last_error = f"broker refused the connection: {reason_code}"
            log.error("%s; check [mqtt].username/password/certificates", self.last_error)
            return
        self._failures = 0
        self.last_error = ""
        sock = client.socket()
        if sock is not None:  # paho leaves Nagle on: small PUBLISHes would wait for the previous segment's ACK
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self.generation += 1
        with self._sub_lock:
            self._subscribing.clear()
            self._refusals.clear()
            self._taken.clear()
        if self._handlers:
            self._subscribe(self.generation, list(self._handlers))
        with self._connect_lock:  # close() publishes its last message after the hook's, never before
            self.connected.set()
            log.info("connected to %s (%s)", self.where, "MQTT 5" if self.cfg.protocol == "5" else "MQTT 3.1.1")
            if self._on_connect_hook:
                self._guarded(lambda t, p: self._on_connect_hook(), "(connect)", b"")

    @property
    def where(self) -> str:
        """The node this link uses (or tries) now, as a URL."""
        host, port = self._endpoints[self._endpoint]
        scheme = "mqtts" if self.cfg.broker.lstrip().startswith("mqtts") else "mqtt"
        return f"{scheme}://{host}:{port}"

    def _next_endpoint(self, client) -> None:
        """Move to the next node of the list for the next attempt (the connection is closed here)."""
        if len(self._endpoints) > 1:
            self._endpoint = (self._endpoint + 1) % len(self._endpoints)
            move_to(client, *self._endpoints[self._endpoint])

    def _backoff(self) -> None:
        delay = min(self.cfg.reconnect_max_s, self.cfg.reconnect_min_s * (2 ** min(self._failures, 20)))
        self._failures += 1
        # paho waits `delay` itself; the random extra spreads a fleet's reconnects.
        self._stop.wait(random.uniform(0, delay / 2))

    def _disconnected(self, client, userdata, flags, reason_code, properties) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        if self._stop.is_set():
            return
        if was:
            log.warning("lost the broker %s (%s); samples wait in the outbox", self.where, reason_code)
        self._next_endpoint(client)
        self._backoff()

    def _connect_failed(self, client, userdata) -> None:
        if self._failures == 0:
            log.warning("cannot reach the broker %s; retrying with backoff, samples wait in the outbox", self.where)
        self.last_error = f"cannot reach the broker {self.where}"
        self._next_endpoint(client)
        self._backoff()

    def _published(self, client, userdata, mid, reason_code, properties) -> None:
        ok = not getattr(reason_code, "is_failure", False)
        if not ok:
            log.warning("broker rejected message %d: %s", mid, reason_code)
        self.acks.put((mid, ok))

    def _subscribed(self, client, userdata, mid, reason_codes, properties) -> None:
        """A SUBACK: subscribe again later to what the broker refused (same connection, with backoff)."""
        with self._sub_lock:
            generation, topics = self._subscribing.pop(mid, (-1, ()))
            if generation != self.generation or self._stop.is_set():
                return  # an earlier connection's: the reconnect subscribed everything again
            refused = []
            for topic, code in zip(topics, reason_codes):
                if getattr(code, "is_failure", False):
                    refused.append((topic, code))
                    continue
                self._taken.add(topic)
                if self._refusals.pop(topic, 0):
                    self.resubscribed += 1
                    log.info("the broker %s took the subscription to %s on a later try", self.where, topic)
            self._taken_changed.notify_all()
            if not refused:
                return
            tries = 0
            for topic, code in refused:
                tries = max(tries, self._refusals.get(topic, 0))
                self._refusals[topic] = self._refusals.get(topic, 0) + 1
            delay = min(self.cfg.reconnect_max_s, self.cfg.reconnect_min_s * (2 ** min(tries, 20)))
            (log.warning if tries == 0 else log.debug)(
                "the broker %s refused the subscription to %s (%s); subscribing again in %.1f s, and on until it "
                "takes it. If it says 'Not authorized', its ACL must let this board read the topic "
                "(docs/identity.md)", self.where, ", ".join(t for t, _ in refused),
                ", ".join(str(c) for _, c in refused), delay)
            self._retry = threading.Timer(delay, self._subscribe_again, (generation, [t for t, _ in refused]))
            self._retry.daemon = True
            self._retry.start()

    def _subscribe_again(self, generation: int, topics) -> None:
        if not self._stop.is_set() and self.connected.is_set() and generation == self.generation:
            self._subscribe(generation, topics)

    def _message(self, client, userdata, message) -> None:
        log.debug("message on %s with no handler", message.topic)
