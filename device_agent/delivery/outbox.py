"""The on-disk outbox: flagged samples wait here (SQLite, WAL) until the broker acknowledges them.

A sample is committed before it is published and deleted only on its PUBACK,
so it survives a broker outage, a lost network and ``kill -9``. The outbox is
bounded in bytes: when a new sample does not fit, the oldest go first, and the
number dropped is kept in the database (it survives restarts) and reported in
telemetry. The same database keeps the per-device sample sequence number and
the digests of inputs already sent (for the policy's dedupe).

One connection, used from one thread (the agent loop); acknowledgements from
the MQTT thread reach it through the publisher's queue.
"""

from __future__ import annotations

import logging
import os
import queue
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional

from ..errors import ConfigError

__all__ = ["Row", "Outbox"]

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sample_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    size INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS seen (digest TEXT PRIMARY KEY, ts REAL NOT NULL);
"""
_SEEN_MAX = 100_000


@dataclass(frozen=True)
class Row:
    id: int
    sample_id: str
    topic: str
    payload: bytes


class Outbox:
    """``with Outbox(path, max_bytes=...) as box: box.put(...); box.pending(); box.ack(ids)``."""

    def __init__(self, path: os.PathLike | str, *, max_bytes: int = 64 << 20, sync: str = "normal"):
        self.path = Path(path)
        self.max_bytes = int(max_bytes)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if sync == 'full' else 'NORMAL'}")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(
                f"config [outbox].path={str(self.path)!r} cannot be opened ({exc}); use a writable path"
            ) from exc
        count, total = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM samples").fetchone()
        self._depth = int(count)
        self._bytes = int(total)
        self._seen_count = self._db.execute("SELECT COUNT(*) FROM seen").fetchone()[0]
        self._seq = self._meta("seq")
        self.last_id = int(self._db.execute("SELECT COALESCE(MAX(id), 0) FROM samples").fetchone()[0])

    # -- counters kept in the database -------------------------------------
    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _bump(self, key: str, by: int) -> None:
        self._db.execute(
            "INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value = value + excluded.value",
            (key, by),
        )

    @property
    def dropped(self) -> int:
        """Samples dropped to keep under ``max_bytes``, since the database was created."""
        return self._meta("dropped")

    @property
    def depth(self) -> int:
        return self._depth

    @property
    def bytes(self) -> int:
        return self._bytes

    def next_seq(self) -> int:
        """The next per-device sample sequence number; :meth:`put` persists it with the sample."""
        seq = self._seq
        self._seq += 1
        return seq

    # -- samples ------------------------------------------------------------
    def put(
        self, topic: str, payload: bytes, sample_id: str, digest: Optional[str] = None, seq: Optional[int] = None
    ) -> List[int]:
        """Commit one sample (with its input digest and sequence number); return the ids dropped to make room."""
        size = len(payload)
        dropped: List[int] = []
        self._db.execute("BEGIN IMMEDIATE")
        try:
            if size > self.max_bytes:
                self._bump("dropped", 1)
                log.warning("sample %s has %d bytes, more than [outbox].max_bytes=%d; dropped", sample_id, size, self.max_bytes)
            else:
                freed = 0
                if self._bytes + size > self.max_bytes:
                    need = self._bytes + size - self.max_bytes
                    for rid, rsize in self._db.execute("SELECT id, size FROM samples ORDER BY id"):
                        dropped.append(rid)
                        freed += rsize
                        if freed >= need:
                            break
                    self._db.executemany("DELETE FROM samples WHERE id=?", [(r,) for r in dropped])
                    self._bump("dropped", len(dropped))
                cur = self._db.execute(
                    "INSERT INTO samples(sample_id, topic, payload, size, created) VALUES(?, ?, ?, ?, ?)",
                    (sample_id, topic, payload, size, time.time()),
                )
                new_id = int(cur.lastrowid)
                self._depth += 1 - len(dropped)
                self._bytes += size - freed
            if digest:
                self._remember(digest)
            if seq is not None:
                self._db.execute(
                    "INSERT INTO meta(key, value) VALUES('seq', ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = MAX(value, excluded.value)",
                    (int(seq) + 1,),
                )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            self._reload_counts()
            raise
        if size <= self.max_bytes:
            self.last_id = new_id
        if dropped:
            log.warning("outbox full (%d bytes max): dropped the %d oldest samples", self.max_bytes, len(dropped))
        return dropped

    def _remember(self, digest: str) -> None:
        cur = self._db.execute("INSERT OR IGNORE INTO seen(digest, ts) VALUES(?, ?)", (digest, time.time()))
        self._seen_count += cur.rowcount
        if self._seen_count > _SEEN_MAX:
            extra = self._seen_count - _SEEN_MAX // 2
            self._db.execute("DELETE FROM seen WHERE digest IN (SELECT digest FROM seen ORDER BY ts LIMIT ?)", (extra,))
            self._seen_count -= extra

    def seen(self, digest: str) -> bool:
        return self._db.execute("SELECT 1 FROM seen WHERE digest=?", (digest,)).fetchone() is not None

    def pending(self, after_id: int = 0, limit: int = 100) -> List[Row]:
        """Samples not yet acknowledged, oldest first, with ``id > after_id``."""
        cur = self._db.execute(
            "SELECT id, sample_id, topic, payload FROM samples WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)
        )
        return [Row(int(r[0]), r[1], r[2], bytes(r[3])) for r in cur]

    def ack(self, ids: Iterable[int]) -> int:
        """Delete acknowledged samples (unknown ids, e.g. dropped meanwhile, are ignored)."""
        ids = list(ids)
        if not ids:
            return 0
        removed = freed = 0
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for start in range(0, len(ids), 500):  # old SQLite builds bind at most 999 parameters
                chunk = ids[start:start + 500]
                marks = ",".join("?" * len(chunk))
                n, size = self._db.execute(
                    f"SELECT COUNT(*), COALESCE(SUM(size), 0) FROM samples WHERE id IN ({marks})", chunk
                ).fetchone()
                self._db.execute(f"DELETE FROM samples WHERE id IN ({marks})", chunk)
                removed += int(n)
                freed += int(size)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            self._reload_counts()
            raise
        self._depth -= removed
        self._bytes -= freed
        return removed

    def _reload_counts(self) -> None:
        count, total = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM samples").fetchone()
        self._depth, self._bytes = int(count), int(total)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None  # type: ignore[assignment]

    def __enter__(self) -> "Outbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Publisher:
    """Drains the outbox through a :class:`~device_agent.delivery.mqtt.Link`, in order, at most ``window`` in flight.

    Runs in the agent's thread (:meth:`pump` after each inference and while
    idle). On every new connection it forgets what was in flight and replays
    the outbox from its oldest sample: paho's in-memory retries may be lost
    with a clean session, and a duplicate is harmless (the collector stores by
    ``sample_id``). A row is deleted only when its PUBACK says success.
    """

    ACK_BATCH = 32
    ACK_DELAY_S = 0.05

    def __init__(self, outbox: Outbox, link, window: int = 50):
        self.outbox = outbox
        self.link = link
        self.window = max(1, int(window))
        self.published = 0
        self.rejected = 0  # samples the broker answered with a failure reason; they stay in the outbox
        self._refused_logged = -1
        self._generation = -1
        self._inflight: dict = {}
        self._cursor = 0
        self._acked: list = []  # acknowledged, deleted in batches (a duplicate after a crash is harmless)
        self._acked_since = 0.0

    def pump(self, wait_s: float = 0.0) -> int:
        """Process acknowledgements (waiting up to ``wait_s`` for the first), then publish what fits
        the window; returns rows acknowledged."""
        link = self.link
        if link.generation != self._generation:
            self._generation = link.generation
            self._inflight.clear()
            self._cursor = 0
        acked = []
        block = wait_s > 0 and bool(self._inflight)
        while block or not link.acks.empty():  # empty(): no exception raised on the common path
            try:
                mid, ok = link.acks.get(timeout=wait_s) if block else link.acks.get_nowait()
            except queue.Empty:
                break
            block = False
            rid = self._inflight.pop(mid, None)
            if rid is None:
                continue
            if ok:
                acked.append(rid)
            else:
                self._refused(rid)
        if acked:
            if not self._acked:
                self._acked_since = time.monotonic()
            self._acked.extend(acked)
        removed = 0
        if self._acked and (wait_s > 0 or len(self._acked) >= self.ACK_BATCH or not self._inflight
                            or time.monotonic() - self._acked_since >= self.ACK_DELAY_S):
            removed = self.outbox.ack(self._acked)
            self._acked = []
        self.published += removed
        room = self.window - len(self._inflight)
        if room > 0 and self.outbox.last_id > self._cursor and link.connected.is_set():
            for row in self.outbox.pending(self._cursor, room):
                mid = link.publish(row.topic, row.payload, qos=1)
                if mid is None:
                    break
                self._inflight[mid] = row.id
                self._cursor = row.id
        return removed

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
