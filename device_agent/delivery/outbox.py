"""The on-disk outbox: flagged samples wait here (SQLite, WAL) until the broker acknowledges them.

A sample is committed before it is published and deleted only on its PUBACK,
so it survives a broker outage, a lost network and ``kill -9``. The outbox is
bounded in bytes: when a new sample does not fit, the oldest go first, and the
number dropped is kept in the database (it survives restarts) and reported in
telemetry. The same database keeps the per-device sample sequence number and
the digests of inputs already sent (for the policy's dedupe).

One connection, used from one thread (the agent loop); acknowledgements from
the MQTT thread reach it through the publisher's queue.

A full disk (``database or disk is full``, ENOSPC) never ends the loop: :meth:`Outbox.put`
drops the oldest samples to make room (counted in ``dropped`` exactly, like the byte cap)
and stores the new one; when even that is impossible the new sample is the one dropped,
and counted. A reserve file of ``RESERVE_BYTES`` beside the database is what makes room
possible on a disk with no byte left (SQLite needs space to delete and to checkpoint its
WAL): it is given up to do that, and taken again when space returns. New databases use
``auto_vacuum = INCREMENTAL``, so deleted samples give their pages back to the disk.
"""

from __future__ import annotations

import errno
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
RESERVE_BYTES = 512 * 1024
_WAL_PAGES = 64  # checkpoint the WAL every 64 pages (256 KiB), so a checkpoint never needs more than the reserve
_RESERVE_RETRY_S = 5.0
_CALM_S = 60.0
_ROOM_BATCH = 16  # rows deleted per transaction when making room (each one grows the WAL by about a page a row)


def _disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1))
    return getattr(exc, "sqlite_errorcode", None) == 13 or "disk is full" in str(exc)  # SQLITE_FULL


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
        self.reserve_path = self.path.with_name(self.path.name + ".reserve")
        self._unsaved_drops = 0  # dropped while nothing could be written; saved with the next write
        self._reserve_retry_at = 0.0
        self._full_since = self._last_full = self._vacuum_at = 0.0
        try:
            self._open(sync)
        except (OSError, sqlite3.Error) as exc:
            if not self._release_reserve():  # a full disk: SQLite needs room for its -wal and -shm files
                raise ConfigError(
                    f"config [outbox].path={str(self.path)!r} cannot be opened ({exc}); use a writable path"
                ) from exc
            try:
                self._open(sync)
            except (OSError, sqlite3.Error) as exc2:
                raise ConfigError(
                    f"config [outbox].path={str(self.path)!r} cannot be opened ({exc2}); use a writable path"
                ) from exc2
        count, total = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM samples").fetchone()
        self._depth = int(count)
        self._bytes = int(total)
        self._seen_count = self._db.execute("SELECT COUNT(*) FROM seen").fetchone()[0]
        self._seq = self._meta("seq")
        self.last_id = int(self._db.execute("SELECT COALESCE(MAX(id), 0) FROM samples").fetchone()[0])
        self._take_reserve()

    def _open(self, sync: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        try:
            if fresh:  # must come before the first table: deleted samples then give their pages back to the disk
                self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if sync == 'full' else 'NORMAL'}")
            self._db.execute(f"PRAGMA wal_autocheckpoint={_WAL_PAGES}")
            self._db.executescript(_SCHEMA)
        except BaseException:
            self._db.close()
            raise

    # -- a full disk ---------------------------------------------------------
    def _take_reserve(self) -> bool:
        """Keep RESERVE_BYTES on the disk for a rainy day (a full disk); False when there is no room now."""
        try:
            if self.reserve_path.exists() and self.reserve_path.stat().st_size >= RESERVE_BYTES:
                return True
            with open(self.reserve_path, "wb") as fh:
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(fh.fileno(), 0, RESERVE_BYTES)
                else:  # pragma: no cover - not Linux
                    fh.write(b"\0" * RESERVE_BYTES)
            return True
        except OSError:
            self._release_reserve()
            self._reserve_retry_at = time.monotonic() + _RESERVE_RETRY_S
            return False

    def _release_reserve(self) -> bool:
        try:
            self.reserve_path.unlink()
            return True
        except OSError:
            return False

    def _checkpoint(self) -> None:
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error:
            pass

    def _rollback(self) -> None:
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
        self._reload_counts()

    def _make_room(self, size: int) -> List[int]:
        """The disk is full: give up the reserve, then drop the oldest samples (counted, in the same
        transactions) until about ``max(4 * size, RESERVE_BYTES / 2)`` bytes are free again."""
        self._release_reserve()
        self._checkpoint()
        need = max(4 * size, RESERVE_BYTES // 2)
        dropped: List[int] = []
        freed = 0
        while freed < need:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                rows = self._db.execute("SELECT id, size FROM samples ORDER BY id LIMIT ?", (_ROOM_BATCH,)).fetchall()
                if rows:
                    self._db.executemany("DELETE FROM samples WHERE id=?", [(r[0],) for r in rows])
                elif self._seen_count:  # no sample left: the digests of inputs already sent go first
                    n = max(1, self._seen_count // 10)
                    self._db.execute("DELETE FROM seen WHERE digest IN (SELECT digest FROM seen ORDER BY ts LIMIT ?)",
                                     (n,))
                    self._seen_count -= n
                self._bump("dropped", len(rows) + self._unsaved_drops)
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
            self._unsaved_drops = 0
            dropped.extend(r[0] for r in rows)
            self._depth -= len(rows)
            self._bytes -= sum(r[1] for r in rows)
            freed += sum(r[1] for r in rows) + (0 if rows else 1 << 30)
            self._checkpoint()
        try:
            self._db.executescript("PRAGMA incremental_vacuum;")  # freed pages back to the disk (new databases)
        except sqlite3.Error:
            pass
        self._checkpoint()
        return dropped
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
        """Samples dropped to keep under ``max_bytes`` or because the disk was full, since the database was created."""
        return self._meta("dropped") + self._unsaved_drops

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
        """Commit one sample (with its input digest and sequence number); return the ids dropped to make room.

        Never raises on a database or disk error: on a full disk the oldest samples make room (counted); when
        nothing can be written the sample is dropped (counted, saved with the next write that succeeds).
        """
        try:
            dropped = self._put(topic, payload, sample_id, digest, seq)
        except (sqlite3.Error, OSError) as exc:
            if not _disk_full(exc):
                self._unsaved_drops += 1
                log.warning("outbox %s cannot store sample %s (%s: %s); dropped and counted", self.path, sample_id,
                            exc.__class__.__name__, exc)
                return []
            now = time.monotonic()
            if not self._full_since:
                self._full_since = now
                log.warning("outbox %s: the disk is full; the oldest samples make room (counted in dropped) until "
                            "there is space again", self.path)
            self._last_full = now
            try:
                freed = self._make_room(len(payload))
                dropped = freed + self._put(topic, payload, sample_id, digest, seq)
            except (sqlite3.Error, OSError) as exc2:
                self._unsaved_drops += 1
                log.debug("outbox: sample %s dropped, nothing can be written (%s)", sample_id, exc2)
                return []
        if self._full_since or self._reserve_retry_at:
            self._after_full()
        return dropped

    def _after_full(self) -> None:
        """After a full disk: take the reserve back as soon as there is room; say so once it stayed calm a minute."""
        now = time.monotonic()
        if now >= self._vacuum_at:  # pages of samples acknowledged since go back to the disk (new databases)
            self._vacuum_at = now + 1.0
            try:
                if self._db.execute("PRAGMA freelist_count").fetchone()[0] > 16:
                    self._db.executescript("PRAGMA incremental_vacuum;")
                    self._checkpoint()
            except sqlite3.Error:
                pass
        if not self.reserve_path.exists() and now >= self._reserve_retry_at:
            self._reserve_retry_at = 0.0
            self._take_reserve()
        if self._full_since and now - self._last_full >= _CALM_S and self.reserve_path.exists():
            log.info("outbox %s: the disk has room again (it was full on and off for %.0f s)", self.path,
                     self._last_full - self._full_since)
            self._full_since = 0.0

    def _put(self, topic: str, payload: bytes, sample_id: str, digest: Optional[str], seq: Optional[int]) -> List[int]:
        size = len(payload)
        dropped: List[int] = []
        self._db.execute("BEGIN IMMEDIATE")
        try:
            if self._unsaved_drops:
                self._bump("dropped", self._unsaved_drops)
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
            self._rollback()
            raise
        self._unsaved_drops = 0
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
        """Delete acknowledged samples (unknown ids, e.g. dropped meanwhile, are ignored).

        On a full disk the reserve is given up to make the delete possible; if it still fails the
        rows stay and are published again later (a duplicate, which the collector ignores).
        """
        ids = list(ids)
        if not ids:
            return 0
        try:
            return self._ack(ids)
        except (sqlite3.Error, OSError) as exc:
            if _disk_full(exc) and self._release_reserve():
                self._checkpoint()
                try:
                    return self._ack(ids)
                except (sqlite3.Error, OSError) as exc2:
                    exc = exc2
            log.warning("outbox %s: %d acknowledged samples cannot be deleted (%s); they are sent again later",
                        self.path, len(ids), exc)
            return 0

    def _ack(self, ids: List[int]) -> int:
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
            self._rollback()
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
        self.rejected = 0
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
                self.rejected += 1  # stays in the outbox; replayed on the next connection
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

    @property
    def inflight(self) -> int:
        return len(self._inflight)
