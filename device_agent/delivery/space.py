"""Disk space for the outbox: the reserve file, room made on a full disk, WAL checkpoints off the loop.

A full disk (``database or disk is full``, ENOSPC) never ends the loop. A reserve file of
``RESERVE_BYTES`` beside the database is what makes room possible on a disk with no byte left
(SQLite needs space to delete and to checkpoint its WAL): it is given up to do that, and taken
again when space returns. :class:`DiskSpace` is a mixin of :class:`~device_agent.delivery.outbox.Outbox`
(it uses the outbox's connection and counters); :class:`Checkpointer` checkpoints the WAL in a thread.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import List

__all__ = ["RESERVE_BYTES", "DiskSpace", "Checkpointer", "disk_full"]

log = logging.getLogger("device_agent.delivery.outbox")  # the outbox's log, as before this module was split off

RESERVE_BYTES = 512 * 1024
_WAL_PAGES = 64  # checkpoint the WAL every 64 pages (256 KiB), so a checkpoint never needs more than the reserve
# The checkpoints run in a thread of their own (each one syncs the disk, some 10-30 ms, which the loop must not
# wait for); should that thread fall behind, the loop's own connection checkpoints at this size, still well
# under the reserve (384 KiB of 512).
WAL_PAGES_BACKSTOP = 96
_PAGE = 4096
_RESERVE_RETRY_S = 5.0
_CALM_S = 60.0
_ROOM_BATCH = 16  # rows deleted per transaction when making room (each one grows the WAL by about a page a row)


def disk_full(exc: BaseException) -> bool:
    """Is ``exc`` SQLite's or the OS's "no space left"?"""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1))
    return getattr(exc, "sqlite_errorcode", None) == 13 or "disk is full" in str(exc)  # SQLITE_FULL


class DiskSpace:
    """The reserve, making room and checkpoints of an outbox (a mixin: it uses the outbox's attributes)."""

    def _wrote(self, nbytes: int) -> None:
        """After a commit: ask the checkpointer thread for a checkpoint every ~_WAL_PAGES pages written."""
        self._wal_pages += nbytes // _PAGE + 4  # the rows' pages, the index's, sqlite_sequence's, the meta row's
        if self._wal_pages >= _WAL_PAGES // 2:
            self._wal_pages = 0
            self._checkpointer.request()

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

    def _on_full_disk(self, delete, keys: list) -> list:
        """A delete of delivered samples failed on a full disk: without the reserve, the WAL emptied, in
        transactions of _ROOM_BATCH rows with the WAL emptied between them (a small transaction needs a few
        pages, which is what a full disk may still have; one for every acknowledged sample at once may not,
        and then nothing would ever leave the outbox). ``delete(chunk)`` returns a list; the lists joined.
        A chunk that still fails ends it: what was deleted before is returned (the rest stays, is sent again
        and acknowledged again); raises when nothing could be deleted."""
        self._release_reserve()
        self._checkpoint()
        out: list = []
        for start in range(0, len(keys), _ROOM_BATCH):
            try:
                out.extend(delete(keys[start:start + _ROOM_BATCH]))
            except (sqlite3.Error, OSError):
                if start == 0:
                    raise
                break
            self._checkpoint()
        return out

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
            self._recent.forget(r[0] for r in rows)
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


class Checkpointer:
    """Checkpoints the outbox's WAL (PASSIVE: never blocks the writer) in a thread, on request.

    Its own connection; the disk syncs a checkpoint makes (the only ones under ``synchronous=NORMAL``)
    happen here, off the agent's loop. Errors (a full disk) are ignored: the outbox handles those itself,
    and the loop's connection checkpoints at WAL_PAGES_BACKSTOP pages whatever this thread does."""

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
