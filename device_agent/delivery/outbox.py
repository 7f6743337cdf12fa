"""The on-disk outbox: flagged samples wait here (SQLite, WAL) until they are delivered.

A sample is committed before it is published and deleted only once delivered:
when the collector's ``edgekit.ack/1`` names it (``[mqtt].ack = "collector"``,
the default), or on the broker's PUBACK (``"broker"``). So it survives a broker
outage, a broker that drops queued messages, a lost network and ``kill -9``. The outbox is
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
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from collections import OrderedDict
from typing import Callable, Iterable, List, Optional

from ..errors import ConfigError, ProtocolError
from .protocol import MAX_ACK_BYTES, parse_ack

__all__ = ["Row", "Outbox", "Publisher"]

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
CREATE INDEX IF NOT EXISTS samples_sample_id ON samples (sample_id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS seen (digest TEXT PRIMARY KEY, ts REAL NOT NULL);
"""
_SEEN_MAX = 100_000
RESERVE_BYTES = 512 * 1024
_WAL_PAGES = 64  # checkpoint the WAL every 64 pages (256 KiB), so a checkpoint never needs more than the reserve
# The checkpoints run in a thread of their own (each one syncs the disk, some 10-30 ms, which the loop must not
# wait for); should that thread fall behind, the loop's own connection checkpoints at this size, still well
# under the reserve (384 KiB of 512).
_WAL_PAGES_BACKSTOP = 96
_PAGE = 4096
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
        self._checkpointer = _Checkpointer(self.path)
        self._wal_pages = 0  # an estimate of the pages written to the WAL since the last checkpoint was asked for

    def _wrote(self, nbytes: int) -> None:
        """After a commit: ask the checkpointer thread for a checkpoint every ~_WAL_PAGES pages written."""
        self._wal_pages += nbytes // _PAGE + 4  # the rows' pages, the index's, sqlite_sequence's, the meta row's
        if self._wal_pages >= _WAL_PAGES // 2:
            self._wal_pages = 0
            self._checkpointer.request()

    def _open(self, sync: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        try:
            if fresh:  # must come before the first table: deleted samples then give their pages back to the disk
                self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if sync == 'full' else 'NORMAL'}")
            self._db.execute(f"PRAGMA wal_autocheckpoint={_WAL_PAGES_BACKSTOP}")
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
        self._wrote(size)
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

    def get(self, row_id: int) -> Optional[Row]:
        """One waiting sample by its row id; None once it is gone (delivered or dropped)."""
        r = self._db.execute("SELECT id, sample_id, topic, payload FROM samples WHERE id = ?", (row_id,)).fetchone()
        return Row(int(r[0]), r[1], r[2], bytes(r[3])) if r else None

    def remove_samples(self, sample_ids: Iterable[str]) -> List[str]:
        """Delete the samples a collector acknowledged, by ``sample_id``, in one transaction;
        the ids that were here (unknown ones, e.g. dropped or acknowledged before, are ignored).

        On a full disk the reserve is given up to make the delete possible (as in :meth:`ack`)."""
        sample_ids = list(dict.fromkeys(sample_ids))
        if not sample_ids:
            return []
        try:
            return self._remove_samples(sample_ids)
        except (sqlite3.Error, OSError) as exc:
            if not (_disk_full(exc) and self._release_reserve()):
                raise
            self._checkpoint()
            return self._remove_samples(sample_ids)

    def _remove_samples(self, sample_ids: List[str]) -> List[str]:
        found: List[str] = []
        freed = 0
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for start in range(0, len(sample_ids), 500):  # old SQLite builds bind at most 999 parameters
                chunk = sample_ids[start:start + 500]
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(
                    f"SELECT id, sample_id, size FROM samples WHERE sample_id IN ({marks})", chunk
                ).fetchall()
                if rows:
                    self._db.execute(f"DELETE FROM samples WHERE id IN ({','.join('?' * len(rows))})",
                                     [r[0] for r in rows])
                found.extend(r[1] for r in rows)
                freed += sum(int(r[2]) for r in rows)
            self._db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        self._depth -= len(found)
        self._bytes -= freed
        self._wrote(freed)
        return found

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
        self._wrote(freed)
        return removed

    def _reload_counts(self) -> None:
        count, total = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM samples").fetchone()
        self._depth, self._bytes = int(count), int(total)

    def close(self) -> None:
        if self._db is not None:
            self._checkpointer.close()
            self._db.close()
            self._db = None  # type: ignore[assignment]

    def __enter__(self) -> "Outbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Checkpointer:
    """Checkpoints the outbox's WAL (PASSIVE: never blocks the writer) in a thread, on request.

    Its own connection; the disk syncs a checkpoint makes (the only ones under ``synchronous=NORMAL``)
    happen here, off the agent's loop. Errors (a full disk) are ignored: the outbox handles those itself,
    and the loop's connection checkpoints at _WAL_PAGES_BACKSTOP pages whatever this thread does."""

    def __init__(self, path: Path) -> None:
        self._wake = threading.Event()
        self._stop = False
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._thread = threading.Thread(target=self._run, name="outbox-checkpoint", daemon=True)
        self._thread.start()

    def request(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stop:
                return
            try:
                self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.Error:
                pass

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(10)
        try:
            self._db.close()
        except sqlite3.Error:  # pragma: no cover
            pass


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
