"""The on-disk outbox: flagged samples wait here (SQLite, WAL) until they are delivered.

A sample is committed before it is published and deleted only once delivered:
when the collector's ``edgekit.ack/1`` names it (``[mqtt].ack = "collector"``,
the default), or on the broker's PUBACK (``"broker"``). So it survives a broker
outage, a broker that drops queued messages, a lost network and ``kill -9``. The outbox is
bounded in bytes: when a new sample does not fit, the oldest go first, and the
number dropped is kept in the database (it survives restarts) and reported in
telemetry. The same database keeps the per-device sample sequence number and
the digests of inputs already sent (for the policy's dedupe).

Samples go in one at a time (:meth:`Outbox.put`, committed on return) or in blocks: the
agent's loop gathers them with :meth:`Outbox.add` and :meth:`Outbox.commit` stores a block in
one transaction (each sample under the same byte cap, dedupe and sequence rules as ``put``).
A gathered sample lives in memory only until its block is committed, and nothing publishes,
counts or reports it before that; a ``kill -9`` loses at most the block being gathered.

One connection, used from one thread (the agent loop); acknowledgements from
the MQTT thread reach it through the publisher's queue (:mod:`.publisher`). The full-disk
machinery and the WAL checkpoints live in :mod:`.space`.

A full disk (``database or disk is full``, ENOSPC) never ends the loop: :meth:`Outbox.put`
drops the oldest samples to make room (counted in ``dropped`` exactly, like the byte cap)
and stores the new one; when even that is impossible the new sample is the one dropped,
and counted. A reserve file of ``RESERVE_BYTES`` beside the database is what makes room
possible on a disk with no byte left (SQLite needs space to delete and to checkpoint its
WAL): it is given up to do that, and taken again when space returns. New databases use
``auto_vacuum = INCREMENTAL``, so deleted samples give their pages back to the disk.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

from ..errors import ConfigError
from .protocol import SampleParts
from .rows import COLUMNS, SCHEMA, Payload, Recent, Row, migrate, payload_size, row_from
from .space import RESERVE_BYTES, WAL_PAGES_BACKSTOP, Checkpointer, DiskSpace
from .space import disk_full as _disk_full

__all__ = ["Row", "Outbox", "Publisher", "RESERVE_BYTES"]

log = logging.getLogger(__name__)

_SEEN_MAX = 100_000
_Item = Tuple[str, Payload, str, Optional[str], Optional[int]]  # topic, payload, sample_id, digest, seq


class Outbox(DiskSpace):
    """``with Outbox(path, max_bytes=...) as box: box.put(...); box.pending(); box.ack(ids)``."""

    def __init__(self, path: os.PathLike | str, *, max_bytes: int = 64 << 20, sync: str = "normal",
                 batch: int = 32, batch_wait_s: float = 0.05, batch_bytes: int = 256 << 10):
        self.path = Path(path)
        self.max_bytes = int(max_bytes)
        self.batch = max(1, int(batch))  # samples per transaction of add()/commit()
        self.batch_wait_s = float(batch_wait_s)
        self.batch_bytes = int(batch_bytes)
        self._block: List[_Item] = []
        self._block_bytes = 0
        self._block_digests: set = set()
        self._block_since = 0.0
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
        self._recent = Recent(self.last_id)  # what is committed from now on, for the publisher, in memory
        self._take_reserve()
        self._checkpointer = Checkpointer(self.path)
        self._wal_pages = 0  # an estimate of the pages written to the WAL since the last checkpoint was asked for

    def _open(self, sync: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        try:
            if fresh:  # must come before the first table: deleted samples then give their pages back to the disk
                self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if sync == 'full' else 'NORMAL'}")
            self._db.execute(f"PRAGMA wal_autocheckpoint={WAL_PAGES_BACKSTOP}")
            # a WAL that grew while checkpoints could not keep up (a full disk, a long drain) is cut back to the
            # backstop's size when it is next reset, instead of keeping its largest size on the disk for good
            self._db.execute(f"PRAGMA journal_size_limit={WAL_PAGES_BACKSTOP * 4096}")
            # Debian's SQLite (Raspberry Pi OS's too) is built with secure_delete on: each delivered sample's
            # pages were zeroed on delete, as many pages written as it took to store it. FAST zeroes what is
            # deleted from b-tree pages only; the freed overflow pages are reused by the next samples.
            self._db.execute("PRAGMA secure_delete=FAST")
            self._db.executescript(SCHEMA)
            migrate(self._db)  # an outbox written by an earlier agent keeps its samples
        except BaseException:
            self._db.close()
            raise

    def _rollback(self) -> None:
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
        self._reload_counts()

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
        self, topic: str, payload: Payload, sample_id: str, digest: Optional[str] = None, seq: Optional[int] = None
    ) -> List[int]:
        """Commit one sample (with its input digest and sequence number); return the ids dropped to make room.

        ``payload``: the message, or its :class:`~.protocol.SampleParts` (stored as raw bytes, see :mod:`.rows`).

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
                freed = self._make_room(payload_size(payload))
                dropped = freed + self._put(topic, payload, sample_id, digest, seq)
            except (sqlite3.Error, OSError) as exc2:
                self._unsaved_drops += 1
                log.debug("outbox: sample %s dropped, nothing can be written (%s)", sample_id, exc2)
                return []
        if self._full_since or self._reserve_retry_at:
            self._after_full()
        return dropped

    def _put(self, topic: str, payload: Payload, sample_id: str, digest: Optional[str], seq: Optional[int]) -> List[int]:
        return self._put_rows([(topic, payload, sample_id, digest, seq)])

    def _put_rows(self, items: Sequence[_Item]) -> List[int]:
        """Store ``items`` in one transaction, each as :meth:`put` would (the byte cap applied sample by sample)."""
        dropped: List[int] = []
        total = 0
        new_id = 0
        added: list = []
        seqs = [int(it[4]) for it in items if it[4] is not None]
        self._db.execute("BEGIN IMMEDIATE")
        try:
            if self._unsaved_drops:
                self._bump("dropped", self._unsaved_drops)
            for topic, payload, sample_id, digest, _ in items:
                size = payload_size(payload)
                total += size
                if size > self.max_bytes:
                    self._bump("dropped", 1)
                    log.warning("sample %s has %d bytes, more than [outbox].max_bytes=%d; dropped", sample_id, size,
                                self.max_bytes)
                else:
                    freed = 0
                    gone: List[int] = []
                    if self._bytes + size > self.max_bytes:
                        need = self._bytes + size - self.max_bytes
                        for rid, rsize in self._db.execute("SELECT id, size FROM samples ORDER BY id"):
                            gone.append(rid)
                            freed += rsize
                            if freed >= need:
                                break
                        self._db.executemany("DELETE FROM samples WHERE id=?", [(r,) for r in gone])
                        self._bump("dropped", len(gone))
                        dropped.extend(gone)
                    parts = isinstance(payload, SampleParts)
                    cur = self._db.execute(
                        "INSERT INTO samples(sample_id, topic, payload, size, created, head, tail) "
                        "VALUES(?, ?, ?, ?, ?, ?, ?)",
                        (sample_id, topic, payload.data if parts else payload, size, time.time(),
                         payload.head if parts else None, payload.tail if parts else None),
                    )
                    new_id = int(cur.lastrowid)
                    added.append((new_id, sample_id, topic, payload, size))
                    self._depth += 1 - len(gone)
                    self._bytes += size - freed
                if digest:
                    self._remember(digest)
            if seqs:
                self._db.execute(
                    "INSERT INTO meta(key, value) VALUES('seq', ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = MAX(value, excluded.value)",
                    (max(seqs) + 1,),
                )
            self._db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        for entry in added:
            self._recent.added(*entry)
        self._recent.forget(dropped)
        self._wrote(total)
        self._unsaved_drops = 0
        if new_id:
            self.last_id = new_id
        if dropped:
            log.warning("outbox full (%d bytes max): dropped the %d oldest samples", self.max_bytes, len(dropped))
        return dropped

    # -- samples gathered in a block (the agent's loop) ----------------------
    def add(self, topic: str, payload: Payload, sample_id: str, digest: Optional[str] = None,
            seq: Optional[int] = None) -> None:
        """Gather one sample for the next :meth:`commit` (one transaction for the block); commits at once when
        the block holds ``batch`` samples or ``batch_bytes``. Until then the sample is in memory only: a
        ``kill -9`` loses it; nothing has been published, counted in the outbox or reported for it yet."""
        if not self._block:
            self._block_since = time.monotonic()
        self._block.append((topic, payload, sample_id, digest, seq))
        self._block_bytes += payload_size(payload)
        if digest:
            self._block_digests.add(digest)
        if len(self._block) >= self.batch or self._block_bytes >= self.batch_bytes or self._full_since:
            self.commit()  # while the disk is full: each sample at once, through put(), as before blocks

    def commit_due(self) -> bool:
        """True when a block waits and its oldest sample has waited ``batch_wait_s``."""
        return bool(self._block) and time.monotonic() - self._block_since >= self.batch_wait_s

    @property
    def gathered(self) -> int:
        """Samples in the block, not yet committed."""
        return len(self._block)

    def commit(self) -> List[int]:
        """Store the gathered block in one transaction; the ids dropped to make room. Like :meth:`put` it never
        raises on a database or disk error: when the block cannot be written whole (a full disk, ...), its
        samples go one by one through :meth:`put`, with everything :meth:`put` does about it."""
        block = self._block
        if not block:
            return []
        self._block, self._block_bytes, self._block_digests = [], 0, set()
        if len(block) > 1 and not (self._full_since or self._reserve_retry_at):
            try:
                return self._put_rows(block)
            except (sqlite3.Error, OSError):
                pass  # rolled back: each sample again, the slow and careful way
        dropped: List[int] = []
        for item in block:
            dropped.extend(self.put(*item))
        return dropped

    def _remember(self, digest: str) -> None:
        cur = self._db.execute("INSERT OR IGNORE INTO seen(digest, ts) VALUES(?, ?)", (digest, time.time()))
        self._seen_count += cur.rowcount
        if self._seen_count > _SEEN_MAX:
            extra = self._seen_count - _SEEN_MAX // 2
            self._db.execute("DELETE FROM seen WHERE digest IN (SELECT digest FROM seen ORDER BY ts LIMIT ?)", (extra,))
            self._seen_count -= extra

    def seen(self, digest: str) -> bool:
        if digest in self._block_digests:
            return True
        return self._db.execute("SELECT 1 FROM seen WHERE digest=?", (digest,)).fetchone() is not None

    def pending(self, after_id: int = 0, limit: int = 100) -> List[Row]:
        """Samples not yet acknowledged, oldest first, with ``id > after_id``: from memory when they were
        committed lately (:class:`~.rows.Recent`), else read back from SQLite."""
        rows = self._recent.after(after_id, limit)
        if rows is not None:
            return rows
        cur = self._db.execute(f"SELECT {COLUMNS} FROM samples WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit))
        return [row_from(r) for r in cur]

    def get(self, row_id: int) -> Optional[Row]:
        """One waiting sample by its row id; None once it is gone (delivered or dropped)."""
        if row_id > self._recent.floor:
            return self._recent.get(row_id)
        r = self._db.execute(f"SELECT {COLUMNS} FROM samples WHERE id = ?", (row_id,)).fetchone()
        return row_from(r) if r else None

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
            if not _disk_full(exc):
                raise
            return self._on_full_disk(self._remove_samples, sample_ids)

    def _remove_samples(self, sample_ids: List[str]) -> List[str]:
        found: List[str] = []
        gone: List[int] = []
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
                gone.extend(r[0] for r in rows)
            self._db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        self._recent.forget(gone)
        self._depth -= len(found)
        self._bytes -= freed
        self._wrote(freed)  # a checkpoint asked for as often as before a full disk could need it
        return found

    def ack(self, ids: Iterable[int]) -> int:
        """Delete acknowledged samples (unknown ids, e.g. dropped meanwhile, are ignored).

        On a full disk the reserve is given up to make the delete possible; if it still fails the
        rows stay and are published again later (a duplicate, which the collector ignores).
        """
        ids = list(dict.fromkeys(ids))
        if not ids:
            return 0
        try:
            return self._ack(ids)
        except (sqlite3.Error, OSError) as exc:
            if _disk_full(exc):
                try:
                    return sum(self._on_full_disk(lambda chunk: [self._ack(chunk)], ids))
                except (sqlite3.Error, OSError) as exc2:
                    exc = exc2
            log.warning("outbox %s: %d acknowledged samples cannot be deleted (%s); they are sent again later",
                        self.path, len(ids), exc)
            return 0

    def _ack(self, ids: List[int]) -> int:
        recent = self._recent
        ids = list(dict.fromkeys(ids))
        known = [i for i in ids if i in recent]  # in the outbox, their sizes known: no need to ask SQLite
        removed, freed = len(known), sum(recent.size(i) for i in known)
        unknown = ids if not known else [i for i in ids if i not in recent]
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for start in range(0, len(unknown), 500):  # old SQLite builds bind at most 999 parameters
                chunk = unknown[start:start + 500]
                n, size = self._db.execute(f"SELECT COUNT(*), COALESCE(SUM(size), 0) FROM samples WHERE id IN "
                                           f"({','.join('?' * len(chunk))})", chunk).fetchone()
                removed += int(n)
                freed += int(size)
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                self._db.execute(f"DELETE FROM samples WHERE id IN ({','.join('?' * len(chunk))})", chunk)
            self._db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        recent.forget(ids)
        self._depth -= removed
        self._bytes -= freed
        self._wrote(freed)
        return removed

    def _reload_counts(self) -> None:
        count, total = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM samples").fetchone()
        self._depth, self._bytes = int(count), int(total)

    def close(self) -> None:
        if self._db is not None:
            self.commit()
            self._checkpointer.close()
            self._db.close()
            self._db = None  # type: ignore[assignment]

    def __enter__(self) -> "Outbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


from .publisher import Publisher  # noqa: E402  (its home since the split; imported from here as before)
