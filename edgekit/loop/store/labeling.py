"""Labels with a memory: who labelled what when, versions that refuse silent overwrites, leases.

Mixed into :class:`~edgekit.loop.store.base.Store`; the SQL is shared by SQLite and PostgreSQL.

* Every change of a sample's label bumps ``samples.label_version`` and appends a row to
  ``label_history`` (new label, the label it replaced, who, when, what kind of change), so the
  previous label is kept when a label changes.
* :meth:`LabelingMixin.save_label` writes only if the sample is still at the version the labeler
  saw; otherwise it raises :class:`~edgekit.errors.LabelConflictError` naming who changed it.
* :meth:`LabelingMixin.claim_lease` hands a sample to one labeler for a while (``label_leases``),
  so two people labelling at once are not shown the same sample.

Stores written by earlier versions gain the column and the two tables when they are opened
(:func:`migrate`); their existing labels start at version 0 with no history.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

from ...errors import LabelConflictError, StoreError

__all__ = ["LabelingMixin", "LabelEvent", "INVALID_LABEL", "LABEL_DDL", "migrate"]

INVALID_LABEL = "__invalid__"
"""The label for "none of these / not a valid input": a decision, so the sample leaves the queue,
but never a class: export and retrain skip it."""

# Both backends accept this DDL (REAL and DOUBLE PRECISION both store a float; TEXT ids).
LABEL_DDL = {
    "sqlite": """
CREATE TABLE IF NOT EXISTS label_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT, sample_id TEXT NOT NULL, version INTEGER NOT NULL,
    label TEXT, previous_label TEXT, labeled_by TEXT, labeled_at REAL NOT NULL, action TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS label_history_sample ON label_history (sample_id, version);
CREATE TABLE IF NOT EXISTS label_leases (
    sample_id TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_at REAL NOT NULL
);
""",
    "postgres": """
CREATE TABLE IF NOT EXISTS label_history (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, sample_id TEXT NOT NULL, version INTEGER NOT NULL,
    label TEXT, previous_label TEXT, labeled_by TEXT, labeled_at DOUBLE PRECISION NOT NULL, action TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS label_history_sample ON label_history (sample_id, version);
CREATE TABLE IF NOT EXISTS label_leases (
    sample_id TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_at DOUBLE PRECISION NOT NULL
);
""",
}


def migrate(conn: Any, kind: str) -> None:
    """Bring a store created by an earlier edgekit up to date, in place (idempotent).

    ``conn`` is the backend's DB-API connection; the caller commits.
    """
    if kind == "sqlite":
        cols = {row[1] for row in conn.execute("PRAGMA table_info(samples)").fetchall()}
        if "label_version" not in cols:
            conn.execute("ALTER TABLE samples ADD COLUMN label_version INTEGER NOT NULL DEFAULT 0")
        conn.executescript(LABEL_DDL["sqlite"])
    else:
        conn.execute("ALTER TABLE samples ADD COLUMN IF NOT EXISTS label_version INTEGER NOT NULL DEFAULT 0")
        for stmt in filter(str.strip, LABEL_DDL["postgres"].split(";")):
            conn.execute(stmt)


@dataclass(frozen=True)
class LabelEvent:
    """One change of one sample's label (``label`` None: the label was taken back)."""

    sample_id: str
    version: int
    label: Optional[str]
    previous_label: Optional[str]
    labeled_by: Optional[str]
    labeled_at: float
    action: str  # "label", "relabel", "undo", "import", "accept"

    def to_dict(self) -> Dict[str, Any]:
        return {"sample_id": self.sample_id, "version": self.version, "label": self.label,
                "previous_label": self.previous_label, "labeled_by": self.labeled_by,
                "labeled_at": self.labeled_at, "action": self.action}


class LabelingMixin:
    """Versioned labels, their history and leases (see the module docstring)."""

    # provided by Store
    _lock: Any
    url: str

    def _exec(self, query: str, params: Sequence[Any] = ()) -> Any:  # pragma: no cover - Store's
        raise NotImplementedError

    def _commit(self) -> None:  # pragma: no cover - Store's
        raise NotImplementedError

    # -- label writes ----------------------------------------------------
    def _write_labels(self, items: Sequence[Tuple[str, str]], by: str, action: str) -> None:
        """Unconditional writes (CLI, CSV and tool imports): bump the version, keep the history."""
        now = time.time()
        for sid, label in items:
            row = self._exec("SELECT label, label_version FROM samples WHERE sample_id = ?", (sid,)).fetchone()
            prev, version = row[0], int(row[1])
            if prev == label:
                continue  # the same label again is no change (an import run twice writes nothing)
            self._exec("UPDATE samples SET label = ?, labeled_by = ?, labeled_at = ?, label_version = ? "
                       "WHERE sample_id = ?", (label, by, now, version + 1, sid))
            kind = "relabel" if action == "label" and prev is not None else action
            self._history(sid, version + 1, label, prev, by, now, kind)

    def _history(self, sid: str, version: int, label: Optional[str], prev: Optional[str], by: str, now: float,
                 action: str) -> None:
        self._exec("INSERT INTO label_history (sample_id, version, label, previous_label, labeled_by, labeled_at, "
                   "action) VALUES (?, ?, ?, ?, ?, ?, ?)", (sid, version, label, prev, by, now, action))

    def save_label(self, sample_id: str, label: Optional[str], *, by: str, expected_version: int,
                   action: str = "label") -> int:
        """Set (or with ``label=None`` clear) a label if the sample is still at ``expected_version``.

        Returns the new version. Raises :class:`LabelConflictError` when someone changed the label
        meanwhile (the message says who, when and to what), StoreError for an unknown sample.
        """
        if label is not None and not str(label).strip():
            raise StoreError(f"label for sample {sample_id} is empty; give a class name")
        with self._lock:
            row = self._exec("SELECT label, label_version, labeled_by, labeled_at FROM samples WHERE sample_id = ?",
                             (sample_id,)).fetchone()
            if row is None:
                raise StoreError(f"sample {sample_id!r} is not in the store; see `edgekit samples list`")
            prev, version = row[0], int(row[1])
            if version != int(expected_version):
                raise _conflict(sample_id, row)
            now = time.time()
            cur = self._exec(
                "UPDATE samples SET label = ?, labeled_by = ?, labeled_at = ?, label_version = ? "
                "WHERE sample_id = ? AND label_version = ?",
                (label, by if label is not None else None, now if label is not None else None, version + 1,
                 sample_id, version))
            if cur.rowcount != 1:  # another process won between our read and our write
                self._rollback_quietly()
                row = self._exec("SELECT label, label_version, labeled_by, labeled_at FROM samples "
                                 "WHERE sample_id = ?", (sample_id,)).fetchone()
                raise _conflict(sample_id, row)
            if action == "label" and prev is not None:
                action = "relabel"
            self._history(sample_id, version + 1, label, prev, by, now, action)
            self._exec("DELETE FROM label_leases WHERE sample_id = ?", (sample_id,))
            self._commit()
        return version + 1

    def undo_label(self, sample_id: str, *, by: str, expected_version: int) -> Tuple[Optional[str], int]:
        """Take back the change that brought the sample to ``expected_version``: its label becomes
        the one it replaced (None when it had none). Returns (restored label, new version)."""
        with self._lock:
            row = self._exec("SELECT previous_label FROM label_history WHERE sample_id = ? AND version = ? "
                             "ORDER BY id DESC LIMIT 1", (sample_id, int(expected_version))).fetchone()
            if row is None:
                raise StoreError(f"sample {sample_id} has no change at version {expected_version} to undo")
            restored = row[0]
        version = self.save_label(sample_id, restored, by=by, expected_version=expected_version, action="undo")
        return restored, version

    def _rollback_quietly(self) -> None:
        rollback = getattr(self, "_rollback", None)
        if rollback is not None:
            rollback()

    # -- label reads -----------------------------------------------------
    def label_history(self, sample_id: Optional[str] = None, limit: Optional[int] = None) -> List[LabelEvent]:
        """Newest first."""
        query = ("SELECT sample_id, version, label, previous_label, labeled_by, labeled_at, action "
                 "FROM label_history")
        params: list = []
        if sample_id is not None:
            query += " WHERE sample_id = ?"
            params.append(sample_id)
        query += " ORDER BY id DESC"
        if limit is not None:
            query += " LIMIT ?"
            params.append(int(limit))
        with self._lock:
            rows = self._exec(query, params).fetchall()
        return [LabelEvent(r[0], int(r[1]), r[2], r[3], r[4], float(r[5]), r[6]) for r in rows]

    def label_counts(self, **filters: Any) -> Dict[Optional[str], int]:
        """How many samples carry each label (None: not labelled yet), within the filters."""
        where, params = _where(filters)
        query = "SELECT label, COUNT(*) FROM samples" + where + " GROUP BY label"
        with self._lock:
            rows = self._exec(query, params).fetchall()
        return {r[0]: int(r[1]) for r in rows}

    def labels_of(self, sample_ids: Iterable[str]) -> Dict[str, Tuple[Optional[str], int]]:
        """{sample_id: (label, label_version)} of those ids that are in the store."""
        ids = list(dict.fromkeys(sample_ids))
        out: Dict[str, Tuple[Optional[str], int]] = {}
        with self._lock:
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                rows = self._exec("SELECT sample_id, label, label_version FROM samples WHERE sample_id IN ("
                                  + ", ".join("?" * len(chunk)) + ")", chunk).fetchall()
                out.update({r[0]: (r[1], int(r[2])) for r in rows})
        return out

    def unlabeled_ids(self, **filters: Any) -> Set[str]:
        where, params = _where(filters, extra="label IS NULL")
        with self._lock:
            return {r[0] for r in self._exec("SELECT sample_id FROM samples" + where, params).fetchall()}

    # -- leases ----------------------------------------------------------
    def claim_lease(self, sample_id: str, holder: str, seconds: float) -> bool:
        """Hold ``sample_id`` for ``holder`` for ``seconds`` unless someone else holds it; renews one's own."""
        now = time.time()
        with self._lock:
            cur = self._exec(
                "INSERT INTO label_leases (sample_id, holder, expires_at) VALUES (?, ?, ?) "
                "ON CONFLICT (sample_id) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at "
                "WHERE label_leases.expires_at < ? OR label_leases.holder = excluded.holder RETURNING sample_id",
                (sample_id, holder, now + float(seconds), now))
            won = cur.fetchone() is not None
            self._commit()
        return won

    def release_leases(self, holder: str, keep: Iterable[str] = ()) -> None:
        """Give back every lease ``holder`` has except those in ``keep``."""
        keep = list(keep)
        query, params = "DELETE FROM label_leases WHERE holder = ?", [holder]
        if keep:
            query += " AND sample_id NOT IN (" + ", ".join("?" * len(keep)) + ")"
            params += keep
        with self._lock:
            self._exec(query, params)
            self._commit()

    def leased_by_others(self, holder: str) -> Dict[str, str]:
        """Live leases held by anyone but ``holder``: {sample_id: holder}."""
        with self._lock:
            rows = self._exec("SELECT sample_id, holder FROM label_leases WHERE expires_at >= ? AND holder <> ?",
                              (time.time(), holder)).fetchall()
        return {r[0]: r[1] for r in rows}


def _conflict(sample_id: str, row: Optional[Sequence[Any]]) -> LabelConflictError:
    if row is None:
        return LabelConflictError(f"sample {sample_id} is gone from the store")
    label, version, by, at = row[0], int(row[1]), row[2], row[3]
    when = time.strftime("%H:%M:%S", time.localtime(at)) if at else "just now"
    now = f"labelled {label!r} by {by or 'someone'} at {when}" if label is not None else "unlabelled again"
    return LabelConflictError(
        f"sample {sample_id} was {now} while you had it open; your label was not saved "
        f"(it is at version {version}): look at it again and choose",
        {"sample_id": sample_id, "label": label, "label_version": version, "labeled_by": by, "labeled_at": at})


_FILTER_COLS = ("device", "fleet", "model_version")


def _where(filters: Mapping[str, Any], extra: str = "") -> Tuple[str, list]:
    clauses, params = ([extra] if extra else []), []
    for key, val in filters.items():
        if val is None:
            continue
        if key in _FILTER_COLS:
            clauses.append(f"{key} = ?")
            params.append(val)
        elif key == "since":
            clauses.append("received_at >= ?")
            params.append(float(val))
        else:
            raise StoreError(f"unknown sample filter {key!r}; use one of {list(_FILTER_COLS) + ['since']}")
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params
