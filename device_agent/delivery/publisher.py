"""The publisher: drains the outbox through the MQTT link, in order, within windows, end to end.

Split from :mod:`device_agent.delivery.outbox` (which still exports :class:`Publisher`).
"""

from __future__ import annotations

import logging
import queue
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Callable, Optional

from ..errors import ConfigError, ProtocolError
from .protocol import MAX_ACK_BYTES, parse_ack

if TYPE_CHECKING:  # pragma: no cover
    from .outbox import Outbox, Row

__all__ = ["Publisher"]

log = logging.getLogger("device_agent.delivery.outbox")  # the outbox's log, as before this module was split off


class Publisher:
    """Drains the outbox through a :class:`~device_agent.delivery.mqtt.Link`, in order, at most ``window``
    publishes awaiting their PUBACK.

    Runs in the agent's thread (:meth:`pump` after each inference and while
    idle). On every new connection it forgets what was in flight and replays
    the outbox from its oldest sample: paho's in-memory retries may be lost
    with a clean session, and a duplicate is harmless (the collector stores by
    ``sample_id``).

    ``ack="broker"``: a row is deleted when its PUBACK says success.

    ``ack="collector"`` (end to end): a PUBACK only marks a row sent; it is
    deleted when an ``edgekit.ack/1`` from the collector names its sample id
    (:meth:`offer_ack`, from the MQTT thread). A sent row that no ack names
    ``ack_timeout_s`` after its PUBACK is published again, oldest first; at
    most ``max_unacked`` rows are out (sent or in flight, not acknowledged) at
    once, which is also how a slow collector slows the board down instead of
    overflowing the broker's queue. While nothing at all is acknowledged the
    timeout doubles on each round of resends (up to ``MAX_ACK_TIMEOUT_S``), so
    a collector that is down, or too old to acknowledge, is not flooded. When
    the link gets a subscription the broker had refused (the ack topic's, as
    while a NATS cluster elects new leaders), what waits for an ack goes again
    at once: the acks published meanwhile reached nobody.
    """

    ACK_BATCH = 32
    ACK_DELAY_S = 0.05
    MAX_ACK_TIMEOUT_S = 600.0
    ACK_BACKLOG = 256  # ack messages waiting for the agent's thread; more are dropped (their samples go again)

    def __init__(self, outbox: Outbox, link, window: int = 50, *, ack: str = "broker", ack_timeout_s: float = 30.0,
                 max_unacked: int = 500, on_error: Optional[Callable[[str], None]] = None):
        if ack not in ("broker", "collector"):
            raise ConfigError(f"config [mqtt].ack={ack!r} must be \"collector\" or \"broker\"")
        self.outbox = outbox
        self.link = link
        self.window = max(1, int(window))
        self.end_to_end = ack == "collector"
        self.ack_timeout_s = float(ack_timeout_s)
        self.max_unacked = max(1, int(max_unacked))
        self._on_error = on_error or (lambda kind: None)
        self.published = 0  # rows delivered and deleted (by the collector's ack, or by the PUBACK)
        self.sent = 0  # publishes the broker accepted, resends included
        self.resent = 0  # publishes of a row sent before (ack timeout, reconnect)
        self.acked = 0  # rows a collector's ack named as stored
        self.refused = 0  # rows a collector's ack named as quarantined
        self.rejected = 0  # samples the broker answered with a failure reason; they stay in the outbox
        self._refused_logged = -1
        self.bad_acks = 0  # ack messages that were malformed or too big
        self.unknown_acks = 0  # ids in acks that are not (any more) in the outbox
        self.ack_overflow = 0  # ack messages dropped because ACK_BACKLOG were waiting
        self._generation = -1
        self._resubscribed = 0
        self._inflight: dict = {}  # mid -> (row id, sample id)
        self._cursor = 0
        self._high = 0  # the newest row id published by this process: a row at or below it is a resend
        self._acked: list = []  # acknowledged, deleted in batches (a duplicate after a crash is harmless)
        self._acked_since = 0.0
        self._sent: "OrderedDict[str, tuple]" = OrderedDict()  # sample id -> (row id, resend at), by PUBACK time
        self._acks: "queue.Queue[Optional[bytes]]" = queue.Queue(self.ACK_BACKLOG)
        self._ack_stored: list = []  # ids acknowledged by the collector, deleted in batches
        self._ack_quarantined: list = []
        self._ack_since = 0.0
        self._timeout = self.ack_timeout_s
        self._last_ack = self._backoff_at = time.monotonic()
        self._warned_silence = False

    # -- the MQTT thread ----------------------------------------------------
    def offer_ack(self, topic: str, payload: bytes) -> None:
        """Queue an ``edgekit.ack/1`` for :meth:`pump` (called in the MQTT thread; never parses here)."""
        item = bytes(payload) if len(payload) <= MAX_ACK_BYTES else None  # None: too big, counted in pump()
        try:
            self._acks.put_nowait(item)
        except queue.Full:
            self.ack_overflow += 1  # only this thread writes it

    # -- the agent's thread -------------------------------------------------
    def pump(self, wait_s: float = 0.0) -> int:
        """Process acknowledgements (waiting up to ``wait_s`` for the first), resend what timed out, then
        publish what fits the windows; returns rows deleted."""
        link = self.link
        if link.generation != self._generation:
            self._generation = link.generation
            self._inflight.clear()
            self._sent.clear()
            self._cursor = 0
        resubscribed = getattr(link, "resubscribed", 0)
        if resubscribed != self._resubscribed:  # a subscription the broker had refused is in place at last:
            self._resubscribed = resubscribed  # acks sent meanwhile went nowhere, so what waits for one goes now
            now = time.monotonic()
            for sid in list(self._sent):
                self._sent[sid] = (self._sent[sid][0], now)
        acked = []
        block = wait_s > 0 and bool(self._inflight)
        while block or not link.acks.empty():  # empty(): no exception raised on the common path
            try:
                mid, ok = link.acks.get(timeout=wait_s) if block else link.acks.get_nowait()
            except queue.Empty:
                break
            block = False
            entry = self._inflight.pop(mid, None)
            if entry is None:
                continue
            if not ok:
                self._refused(entry[0])  # stays in the outbox, offered again after a reconnect (not on a timer)
                continue
            self.sent += 1
            if self.end_to_end:
                self._sent[entry[1]] = (entry[0], time.monotonic() + self._timeout)
                self._sent.move_to_end(entry[1])
            else:
                acked.append(entry[0])
        removed = 0
        if self.end_to_end:
            removed = self._take_acks(wait_s if wait_s > 0 and not self._inflight and self._sent else 0.0)
            if link.connected.is_set():
                self._resend_due()
        else:
            if acked:
                if not self._acked:
                    self._acked_since = time.monotonic()
                self._acked.extend(acked)
            if self._acked and (wait_s > 0 or len(self._acked) >= self.ACK_BATCH or not self._inflight
                                or time.monotonic() - self._acked_since >= self.ACK_DELAY_S):
                removed = self.outbox.ack(self._acked)
                self._acked = []
            self.published += removed
        room = self.window - len(self._inflight)
        if self.end_to_end:
            room = min(room, self.max_unacked - len(self._inflight) - len(self._sent))
        if room > 0 and self.outbox.last_id > self._cursor and link.connected.is_set():
            for row in self.outbox.pending(self._cursor, room):
                if not self._publish(row):
                    break
                self._cursor = row.id
        return removed

    def _publish(self, row: Row) -> bool:
        mid = self.link.publish(row.topic, row.payload, qos=1)
        if mid is None:
            return False
        self._inflight[mid] = (row.id, row.sample_id)
        if row.id <= self._high:
            self.resent += 1
        else:
            self._high = row.id
        return True

    def _take_acks(self, wait_s: float) -> int:
        """Delete what the queued ``edgekit.ack/1`` messages name, in batches (one transaction per
        ACK_BATCH ids or ACK_DELAY_S, at once when waiting, when the window is full or when every sample
        out is acknowledged: a crash in between costs a resend, which the collector acks again); rows deleted."""
        messages = []
        try:
            if wait_s > 0:
                messages.append(self._acks.get(timeout=wait_s))
            while not self._acks.empty():
                messages.append(self._acks.get_nowait())
        except queue.Empty:
            pass
        for payload in messages:
            try:
                if payload is None:
                    raise ProtocolError(f"ack message is over MAX_ACK_BYTES={MAX_ACK_BYTES}")
                s, q = parse_ack(payload)
            except ProtocolError as exc:
                self.bad_acks += 1
                self._on_error("ack")
                (log.warning if self.bad_acks <= 10 else log.debug)("ack ignored: %s", exc)
                continue
            if not self._ack_stored and not self._ack_quarantined:
                self._ack_since = time.monotonic()
            self._ack_stored.extend(s)
            self._ack_quarantined.extend(q)
        named = len(self._ack_stored) + len(self._ack_quarantined)
        out = len(self._inflight) + len(self._sent)
        if not named or not (wait_s > 0 or named >= self.ACK_BATCH or named >= out or out >= self.max_unacked
                             or time.monotonic() - self._ack_since >= self.ACK_DELAY_S):
            return 0
        stored, quarantined = self._ack_stored, self._ack_quarantined
        self._ack_stored, self._ack_quarantined = [], []
        gone = set(self.outbox.remove_samples(stored + quarantined))
        for sid in gone:
            self._sent.pop(sid, None)
        n_stored = sum(1 for sid in dict.fromkeys(stored) if sid in gone)
        n_refused = len(gone) - n_stored
        self.unknown_acks += len(set(stored) | set(quarantined)) - len(gone)
        self.acked += n_stored
        self.refused += n_refused
        self.published += len(gone)
        if n_refused:
            for _ in range(n_refused):
                self._on_error("refused")
            log.warning("the collector refused %d sample(s) as malformed and quarantined them; they are not sent "
                        "again (see the store's quarantine table)", n_refused)
        if gone:
            self._last_ack = time.monotonic()
            self._timeout = self.ack_timeout_s
            self._warned_silence = False
        return len(gone)

    def _resend_due(self) -> None:
        """Publish again, oldest first, the sent rows no ack named in time (within the PUBACK window)."""
        now = time.monotonic()
        resent = False
        while self._sent and len(self._inflight) < self.window:
            sid, (rid, due) = next(iter(self._sent.items()))
            if due > now:
                break
            del self._sent[sid]
            row = self.outbox.get(rid)
            if row is None:
                continue  # dropped for room, or deleted meanwhile
            if not self._publish(row):
                self._sent[sid] = (rid, due)
                self._sent.move_to_end(sid, last=False)
                break
            resent = True
        if resent and now - self._last_ack >= self._timeout and now >= self._backoff_at:  # once per round
            if not self._warned_silence:
                self._warned_silence = True
                log.warning("no collector acknowledged a sample for %.0f s although the broker takes them; samples "
                            "wait in the outbox and go again with a growing timeout. Is `edgekit collect` running? "
                            "A collector without end-to-end acks needs [mqtt].ack = \"broker\"", now - self._last_ack)
            self._timeout = min(self._timeout * 2, self.MAX_ACK_TIMEOUT_S)
            self._backoff_at = now + self._timeout

    def _refused(self, rid: int) -> None:
        """The broker answered a sample with a failure reason (MQTT 5, e.g. "Not authorized" from an ACL).

        The sample stays in the outbox and is offered again only after the next reconnect, never in a
        loop; each refusal is counted (telemetry ``rejected``) and the first of each connection logged
        with the fix. (MQTT 3.1.1 has no such reason: Mosquitto acks a refused message as if delivered.)
        """
        self.rejected += 1
        if self._refused_logged != self._generation:
            self._refused_logged = self._generation
            log.error("the broker refuses the samples of this board (first refusal on this connection: outbox row "
                      "%d); they stay in the outbox and are offered again after a reconnect. If the broker said "
                      "'Not authorized', its ACL does not let this certificate write this topic: the certificate's "
                      "CN must equal [device].id and the broker must serve [device].fleet (docs/identity.md)", rid)

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    @property
    def ack_timeout_now_s(self) -> float:
        """The resend timeout in force: ``ack_timeout_s``, doubled per round while no ack comes."""
        return self._timeout

    @property
    def unacked(self) -> int:
        """Rows out and not yet deleted: awaiting their PUBACK, or (end to end) the collector's ack."""
        return len(self._inflight) + len(self._sent)
