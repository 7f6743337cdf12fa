"""The collector's write path: one writer thread takes batches off the queue, validates and stores each in one
transaction, then acknowledges (PUBACKs to the broker, edgekit.ack/1 to the boards). See edgekit.loop.collect.

No message can end the writer: a batch that fails is stored again message by message, and a message that still
fails, whatever the exception, is quarantined (``store_error`` when the database refused it, ``collector_error``
for anything else) and acknowledged as such, so the broker and the board stop sending it; the rest is stored."""

from __future__ import annotations

import json
import logging
import queue
import struct
import time
from collections import Counter
from typing import Any, Dict, List, Optional

from paho.mqtt import __version__ as _paho_version

from device_agent.delivery import protocol as wire

from ..errors import StoreError
from .validate import Malformed, check_message, sample_id_hint

log = logging.getLogger("edgekit.loop.collect")

_BATCH = 256
_LINGER_S = 0.005  # a batch waits this long at most for more messages (see _fill)
_LINGER_GAP_S = 0.001
_STOP = object()
_ACK_CHUNK = 512  # sample ids per edgekit.ack/1 message (MAX_ACK_IDS allows 1024)


class _Msg:
    __slots__ = ("topic", "payload", "mid", "qos", "generation", "admitted")

    def __init__(self, topic: str, payload: bytes, mid: int, qos: int, generation: int) -> None:
        self.topic = topic
        self.payload = payload
        self.mid = mid
        self.qos = qos
        self.generation = generation
        self.admitted: Any = None  # the gate's decision (True, or its Malformed), kept for the message's retries


class WritePath:
    """The Collector's writer-thread methods (a mixin: the state lives in Collector)."""

    def _write_loop(self) -> None:
        get = self._queue.get
        while True:
            item = get()
            if item is _STOP:
                self._drain_rest()
                return
            batch = [item]
            stopping = self._fill(batch)
            self._store_batch_or_log(batch)
            self._done += len(batch)
            if stopping:
                self._drain_rest()
                return

    def _fill(self, batch: List[_Msg]) -> bool:
        """Add what is queued to ``batch``, up to _BATCH; True when the stop marker came. While messages keep
        coming (each within _LINGER_GAP_S of the last), wait for them, up to _LINGER_S in all: a transaction
        and its acks cost about as much as dozens of messages, and a writer woken by every message would pay
        them for one or two at a time. A pause in the flow (e.g. boards waiting for acks) ends the wait."""
        q = self._queue
        deadline = 0.0
        while len(batch) < _BATCH:
            try:
                nxt = q.get_nowait()
            except queue.Empty:
                if not self._accepting:
                    return False
                now = time.monotonic()
                if not deadline:
                    deadline = now + _LINGER_S
                if now >= deadline:
                    return False
                try:
                    nxt = q.get(timeout=min(_LINGER_GAP_S, deadline - now))
                except queue.Empty:
                    return False
            if nxt is _STOP:
                return True
            batch.append(nxt)
        return False

    def _drain_rest(self) -> None:
        rest = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                rest.append(item)
        if rest:
            self._store_batch_or_log(rest, retry=False)
            self._done += len(rest)

    def _shutdown_writer(self) -> None:
        self._accepting = False
        self._queue.put(_STOP)
        if self._writer is not None:
            self._writer.join(5)

    def _store_batch_or_log(self, batch: List[_Msg], retry: bool = True) -> None:
        """:meth:`_store_batch`, and the writer goes on whatever happens there. Every message is stored or
        quarantined before anything is acked, so what fails here (a bug) fails unacked, or after its commit:
        the broker delivers it again after a reconnect, and a stored sample comes back as a duplicate."""
        try:
            self._store_batch(batch, retry)
        except Exception as exc:
            log.error("collector writer: a batch of %d message(s) failed (%s: %s); what it did not ack comes again "
                      "after a reconnect, and the writer goes on", len(batch), exc.__class__.__name__,
                      _short(exc))
            log.debug("the batch's failure", exc_info=True)

    def _store_batch(self, batch: List[_Msg], retry: bool = True) -> None:
        delay = 0.5
        while True:
            try:
                counts, acks = self._apply(batch)
                break
            except Exception:  # the batch's transaction is rolled back: nothing of it is stored
                # Per message, so one row the database refuses, or one message the collector fails on,
                # cannot block the rest.
                try:
                    counts, acks = Counter(), _Acks()
                    for m in batch:
                        c, a = self._apply_one_or_quarantine(m)
                        counts += c
                        acks.merge(a)
                    break
                except StoreError as exc:
                    if not retry or not self._accepting:
                        log.error("store unavailable (%s); %d message(s) left unacked for redelivery", exc, len(batch))
                        return
                    log.error("store unavailable (%s); retrying in %.1fs", exc, delay)
                    time.sleep(delay)
                    delay = min(delay * 2, 30.0)
        self._ack(batch)
        counts["acked"] += self._send_acks(acks)
        with self._stats_lock:
            for key, n in counts.items():
                if key.startswith("malformed:"):
                    self._malformed[key.split(":", 1)[1]] += n
                else:
                    self._counts[key] += n

    def _apply(self, batch: List[_Msg]) -> "tuple[Counter, _Acks]":
        counts: Counter = Counter()
        acks = _Acks()
        samples: List[Dict[str, Any]] = []
        topics: List[str] = []
        with self.store.batch():
            for m in batch:
                outcome = self._handle(m)
                if isinstance(outcome, dict):
                    samples.append(outcome)
                    topics.append(m.topic)
                else:
                    counts[outcome] += 1
                    # Quarantined for good: the board may forget it. Over the rate limit: not acknowledged,
                    # so the board sends it again later, when the bucket has room.
                    if outcome.startswith("malformed:") and outcome != "malformed:rate_limited":
                        acks.quarantined(m.topic, m.payload)
            for topic, payload, new in zip(topics, samples, self.store.put_samples(samples)):  # one INSERT
                counts["stored" if new else "duplicates"] += 1
                acks.stored(topic, payload["sample_id"])
        return counts, acks

    def _apply_one_or_quarantine(self, m: _Msg) -> "tuple[Counter, _Acks]":
        """One message in its own transaction; one that fails twice is quarantined and acked as such: as
        ``store_error`` when the database refused it, as ``collector_error`` when anything else failed on it
        (a bug in the collector, which must not stop the writer nor have the message sent forever). Only a
        store that cannot take the quarantine row either raises (StoreError: the batch waits for the store)."""
        try:
            return self._apply([m])
        except Exception:
            pass
        try:  # twice: the first failure may have been a lost connection, now re-opened
            return self._apply([m])
        except StoreError as exc:
            reason = "store_error"
            self.store.quarantine(m.topic, m.payload, reason, str(exc).replace("\x00", ""))
            log.warning("message on %s refused by the store (%s); quarantined", m.topic, exc)
        except Exception as exc:  # not the payload: it may be anything a board sent
            reason = "collector_error"
            self.store.quarantine(m.topic, m.payload, reason, f"{exc.__class__.__name__}: {_short(exc)}"
                                  .replace("\x00", ""))
            log.error("the collector failed on a message on %s (%s: %s); quarantined as collector_error, acked, "
                      "and the writer goes on: please report this", m.topic, exc.__class__.__name__, _short(exc))
            log.debug("the failure on %s", m.topic, exc_info=True)
        acks = _Acks()
        acks.quarantined(m.topic, m.payload)
        return Counter({f"malformed:{reason}": 1}), acks

    def _handle(self, m: _Msg) -> Any:
        """The counter a message goes to, or a valid sample's payload for the batch INSERT."""
        if m.topic.endswith("/status") and not m.payload:
            return "ignored"  # someone cleared the retained status
        try:
            if self.gate is not None:
                self._admit(m)
            kind, obj = check_message(m.topic, m.payload, self.max_payload_bytes, decode_input=True)
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

    def _admit(self, m: _Msg) -> None:
        """The gate once per message: a batch the store refused is stored again message by message, and its
        retries must not take the device's rate-limit tokens again (nor find a bucket they emptied)."""
        if m.admitted is None:
            try:
                self.gate.admit(m.topic)
            except Malformed as bad:
                m.admitted = bad
                raise
            m.admitted = True
        elif m.admitted is not True:
            raise Malformed(m.admitted.reason, m.admitted.detail)

    def _send_acks(self, acks: "_Acks") -> int:
        """After the commit: tell each board which of its samples are stored or quarantined (QoS 1);
        the number of sample ids named. A lost ack costs a resend, which is stored as a duplicate."""
        client = self._client
        if client is None:
            return 0
        named = 0
        for topic, (stored, quarantined) in acks.by_topic.items():
            ids = [(sid, False) for sid in stored] + [(sid, True) for sid in quarantined]
            for start in range(0, len(ids), _ACK_CHUNK):
                chunk = ids[start:start + _ACK_CHUNK]
                payload = wire.ack_payload([i for i, q in chunk if not q], [i for i, q in chunk if q])
                self._last_ack_info = client.publish(topic, json.dumps(payload, separators=(",", ":")), qos=1)
                named += len(chunk)
        return named

    def _ack(self, batch: List[_Msg]) -> None:
        client = self._client
        if client is None:
            return
        # A message from an earlier connection is redelivered on this one; its old mid means nothing now.
        generation = self._generation
        mids = [m.mid for m in batch if m.qos == 1 and m.generation == generation]
        if mids:
            puback(client, mids)
        for m in batch:
            if m.qos == 2 and m.generation == generation:  # not subscribed for; paho's own handshake if it comes
                client.ack(m.mid, m.qos)


def _short(exc: BaseException) -> str:
    """An exception's text for one log line: cut, since it may quote some of a payload."""
    try:
        text = str(exc)
    except Exception:  # an exception whose text fails too: its class says enough
        return "(no text)"
    return text if len(text) <= 200 else text[:200] + "..."


_PUBACK = 0x40
# paho 2.x: the releases whose private _packet_queue(command, packet, mid, qos) was read and tested (test_collect_
# fastpaths compares its bytes with ack()'s); a later major release gets ack() per message until it is checked.
_PAHO_CHECKED = _paho_version.split(".")[0] == "2"
_PUBACK_PACKET = struct.Struct("!BBH").pack  # what paho's ack(mid, 1) queues: type, remaining length 2, mid


def puback(client: Any, mids: List[int]) -> None:
    """PUBACK each of ``mids`` (QoS 1, manual acks): the bytes ``client.ack(mid, 1)`` sends for each, queued as
    one write. One by one, every PUBACK was a queued packet, a byte to wake paho's network thread and a send
    of 4 bytes from it, on the thread that reads the next messages. Through paho's private packet queue (its
    ``ack`` does the same per message); a paho without it gets ``ack`` per message."""
    queue_packet = getattr(client, "_packet_queue", None) if _PAHO_CHECKED else None
    if queue_packet is None or len(mids) == 1:
        for mid in mids:
            client.ack(mid, 1)
        return
    try:
        queue_packet(_PUBACK, b"".join([_PUBACK_PACKET(_PUBACK, 2, mid) for mid in mids]), 0, 1)
    except TypeError:  # a later paho whose private queue takes other arguments (refused at the call: nothing queued)
        for mid in mids:
            client.ack(mid, 1)


class _Acks:
    """Sample ids to acknowledge, by the ack topic of the device that sent them."""

    def __init__(self) -> None:
        self.by_topic: Dict[str, "tuple[List[str], List[str]]"] = {}
        self._of: Dict[str, "Optional[tuple[List[str], List[str]]]"] = {}  # sample topic -> its ack lists

    def _lists(self, sample_topic: str) -> "Optional[tuple[List[str], List[str]]]":
        if sample_topic in self._of:
            return self._of[sample_topic]
        self._of[sample_topic] = lists = self._find(sample_topic)
        return lists

    def _find(self, sample_topic: str) -> "Optional[tuple[List[str], List[str]]]":
        try:
            parts = wire.parse_topic(sample_topic)
            if parts["kind"] != "samples":
                return None
            topic = wire.topic(parts["fleet"], parts["device"], "ack")
        except wire.ProtocolError:
            return None  # no board can have sent it: nobody to tell
        return self.by_topic.setdefault(topic, ([], []))

    def stored(self, sample_topic: str, sample_id: str) -> None:
        lists = self._lists(sample_topic)
        if lists is not None:
            lists[0].append(sample_id)

    def quarantined(self, sample_topic: str, payload: bytes) -> None:
        lists = self._lists(sample_topic)
        sid = sample_id_hint(payload) if lists is not None else None
        if sid is not None:
            lists[1].append(sid)

    def merge(self, other: "_Acks") -> None:
        for topic, (stored, quarantined) in other.by_topic.items():
            mine = self.by_topic.setdefault(topic, ([], []))
            mine[0].extend(stored)
            mine[1].extend(quarantined)
