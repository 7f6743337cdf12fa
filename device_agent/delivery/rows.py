"""What the outbox stores for a sample, and the committed samples it keeps in memory for the publisher.

A row of the ``samples`` table holds its sample in one of two forms:

* ``head`` NULL: ``payload`` is the message as it is published (every row of an outbox written before the
  second form existed, and what :meth:`~.outbox.Outbox.put` is given as bytes);
* ``head`` not NULL: ``payload`` is the input's raw bytes and the message is ``head + base64(payload) +
  tail`` (:class:`~.protocol.SampleParts`, the same bytes as the first form): a quarter fewer bytes for
  SQLite to write, and to free once delivered. ``size`` is what the row stores, for the byte cap.

An outbox file of the earlier schema gains the two columns when it is opened (:func:`migrate`); its rows
keep their form and are published as before. An agent from before the second form cannot read a row of it:
drain the outbox before going back to one (docs/agent.md, "Crash safety").
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple, Union

from .protocol import SampleParts

__all__ = ["Row", "Recent", "SCHEMA", "migrate", "payload_size", "row_from"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sample_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    size INTEGER NOT NULL,
    created REAL NOT NULL,
    head BLOB,
    tail BLOB
);
CREATE INDEX IF NOT EXISTS samples_sample_id ON samples (sample_id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS seen (digest TEXT PRIMARY KEY, ts REAL NOT NULL);
"""
COLUMNS = "id, sample_id, topic, payload, head, tail"  # what row_from() reads
Payload = Union[bytes, SampleParts]


@dataclass(frozen=True)
class Row:
    id: int
    sample_id: str
    topic: str
    payload: bytes  # the message, as published


def migrate(db: sqlite3.Connection) -> None:
    """Give an outbox of the earlier schema (no ``head``/``tail`` columns) the two columns; its rows stay as
    they are (``head`` NULL: the message itself). A schema change only: no row is read or written."""
    if "head" in {r[1] for r in db.execute("PRAGMA table_info(samples)")}:
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute("ALTER TABLE samples ADD COLUMN head BLOB")
        db.execute("ALTER TABLE samples ADD COLUMN tail BLOB")
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def payload_size(payload: Payload) -> int:
    """Bytes a payload takes in the outbox (what the byte cap counts)."""
    return payload.size if isinstance(payload, SampleParts) else len(payload)


def row_from(r: tuple) -> Row:
    """A :class:`Row` from ``SELECT {COLUMNS}``, its message made whole."""
    payload = bytes(r[3]) if r[4] is None else SampleParts(bytes(r[4]), bytes(r[3]), bytes(r[5])).message()
    return Row(int(r[0]), r[1], r[2], payload)


class Recent:
    """The newest committed samples, kept in memory (up to ``max_bytes``) so that the publisher need not read
    back from SQLite what was just written there. Every row of the outbox with an id above :attr:`floor` is
    here, and nothing that left the outbox (delivered, or dropped for room) is: the outbox tells it, after
    each transaction that commits. Older rows (left from before a restart, or pushed out of memory while the
    broker was away) are read from SQLite as before."""

    def __init__(self, floor: int, max_bytes: int = 2 << 20):
        self.floor = int(floor)
        self.max_bytes = int(max_bytes)
        self._rows: Dict[int, Tuple[str, str, Payload, int]] = {}  # id -> sample id, topic, payload, size; by id
        self._bytes = 0

    def __contains__(self, rid: int) -> bool:
        return rid in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def added(self, rid: int, sample_id: str, topic: str, payload: Payload, size: int) -> None:
        """A row committed (ids only grow); the oldest kept go when over ``max_bytes``."""
        self._rows[rid] = (sample_id, topic, payload, size)
        self._bytes += size
        while self._bytes > self.max_bytes and self._rows:
            old = next(iter(self._rows))
            self._bytes -= self._rows.pop(old)[3]
            self.floor = old  # every row above it is still here

    def forget(self, ids: Iterable[int]) -> None:
        """Rows deleted by a committed transaction."""
        rows = self._rows
        for rid in ids:
            entry = rows.pop(rid, None)
            if entry is not None:
                self._bytes -= entry[3]

    def size(self, rid: int) -> int:
        return self._rows[rid][3]

    def after(self, after_id: int, limit: int) -> Optional[List[Row]]:
        """Up to ``limit`` rows with ``id > after_id``, oldest first; None when SQLite must answer (older rows)."""
        if after_id < self.floor:
            return None
        out: List[Row] = []
        for rid, entry in self._rows.items():
            if rid > after_id:
                out.append(self._row(rid, entry))
                if len(out) >= limit:
                    break
        return out

    def get(self, rid: int) -> Optional[Row]:
        entry = self._rows.get(rid)
        return None if entry is None else self._row(rid, entry)

    @staticmethod
    def _row(rid: int, entry: Tuple[str, str, Payload, int]) -> Row:
        sample_id, topic, payload, _ = entry
        return Row(rid, sample_id, topic, payload.message() if isinstance(payload, SampleParts) else payload)
