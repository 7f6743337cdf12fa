"""SQLite backend: zero set-up, WAL journal, one file."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from ...errors import StoreError
from .base import Store
from .labeling import migrate

__all__ = ["SQLiteStore"]

DDL = """
CREATE TABLE IF NOT EXISTS samples (
    sample_id TEXT PRIMARY KEY, device TEXT NOT NULL, fleet TEXT NOT NULL, seq INTEGER NOT NULL,
    ts REAL NOT NULL, received_at REAL NOT NULL, model_name TEXT, model_version TEXT, model_sha256 TEXT,
    label_pred TEXT, pred_index INTEGER, confidence REAL, margin REAL, entropy REAL, reasons TEXT,
    top_k TEXT, source TEXT, input_dtype TEXT NOT NULL, input_shape TEXT NOT NULL, input_data BLOB NOT NULL,
    label TEXT, labeled_by TEXT, labeled_at REAL
);
CREATE INDEX IF NOT EXISTS samples_device ON samples (fleet, device);
CREATE INDEX IF NOT EXISTS samples_received ON samples (received_at);
CREATE TABLE IF NOT EXISTS telemetry (
    id INTEGER PRIMARY KEY AUTOINCREMENT, fleet TEXT NOT NULL, device TEXT NOT NULL, ts REAL NOT NULL,
    received_at REAL NOT NULL, payload TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS devices (
    fleet TEXT NOT NULL, device TEXT NOT NULL, last_seen REAL, state TEXT, state_ts REAL,
    model_name TEXT, model_version TEXT, telemetry TEXT, telemetry_ts REAL, PRIMARY KEY (fleet, device)
);
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY AUTOINCREMENT, received_at REAL NOT NULL, topic TEXT, reason TEXT NOT NULL,
    detail TEXT, size INTEGER NOT NULL, payload BLOB
);
"""


class SQLiteStore(Store):
    """``sqlite:///path/to/samples.db`` (or a plain path)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = Path(path)
        self.url = f"sqlite:///{self.path}"
        if not self.path.parent.is_dir():
            raise StoreError(f"store directory {self.path.parent} does not exist; create it or pick another path")
        try:
            self._conn = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30)
            self._conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL under WAL: a committed row survives a crash of the process
            # (only a power cut can lose the last transactions).
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(DDL)
            migrate(self._conn, "sqlite")
            self._conn.commit()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open SQLite store {self.path}: {exc}") from exc

    def _connection(self) -> sqlite3.Connection:
        return self._conn

    def _close_connection(self) -> None:
        self._conn.close()
