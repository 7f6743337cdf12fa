"""PostgreSQL backend (psycopg 3): for teams, several collectors writing to one database."""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Any, List, Optional
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ...errors import StoreError
from .base import _INSERT_COLS, Store
from .labeling import migrate

__all__ = ["PostgresStore"]

log = logging.getLogger(__name__)

DDL = """
CREATE TABLE IF NOT EXISTS samples (
    sample_id TEXT PRIMARY KEY, device TEXT NOT NULL, fleet TEXT NOT NULL, seq BIGINT NOT NULL,
    ts DOUBLE PRECISION NOT NULL, received_at DOUBLE PRECISION NOT NULL, model_name TEXT, model_version TEXT,
    model_sha256 TEXT, label_pred TEXT, pred_index INTEGER, confidence DOUBLE PRECISION,
    margin DOUBLE PRECISION, entropy DOUBLE PRECISION, reasons TEXT, top_k TEXT, source TEXT,
    input_dtype TEXT NOT NULL, input_shape TEXT NOT NULL, input_data BYTEA NOT NULL,
    label TEXT, labeled_by TEXT, labeled_at DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS samples_device ON samples (fleet, device);
CREATE INDEX IF NOT EXISTS samples_received ON samples (received_at);
CREATE TABLE IF NOT EXISTS telemetry (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, fleet TEXT NOT NULL, device TEXT NOT NULL,
    ts DOUBLE PRECISION NOT NULL, received_at DOUBLE PRECISION NOT NULL, payload TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS devices (
    fleet TEXT NOT NULL, device TEXT NOT NULL, last_seen DOUBLE PRECISION, state TEXT,
    state_ts DOUBLE PRECISION, model_name TEXT, model_version TEXT, telemetry TEXT,
    telemetry_ts DOUBLE PRECISION, PRIMARY KEY (fleet, device)
);
CREATE TABLE IF NOT EXISTS quarantine (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, received_at DOUBLE PRECISION NOT NULL, topic TEXT,
    reason TEXT NOT NULL, detail TEXT, size INTEGER NOT NULL, payload BYTEA
);
"""
_COL_TYPES = ("text", "text", "text", "bigint", "float8", "float8", "text", "text", "text", "text", "integer",
              "float8", "float8", "float8", "text", "text", "text", "text", "text", "bytea")
_UNNEST_INSERT = (
    f"INSERT INTO samples ({_INSERT_COLS}) SELECT * FROM unnest("
    + ", ".join(f"%b::{t}[]" for t in _COL_TYPES)
    + ") ON CONFLICT (sample_id) DO NOTHING RETURNING sample_id"
)
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def split_schema(url: str) -> "tuple[str, Optional[str]]":
    """``postgresql://...?schema=NAME``: the schema is ours, the rest goes to libpq."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schema = next((v for k, v in query if k == "schema"), None)
    rest = urlencode([(k, v) for k, v in query if k != "schema"])
    if schema is not None and not _SCHEMA_NAME.match(schema):
        raise StoreError(f"schema={schema!r} is not a plain lower-case SQL name; use letters, digits and _")
    return urlunsplit(parts._replace(query=rest)), schema


class PostgresStore(Store):
    """``postgresql://user@host:5432/db[?schema=NAME]``; tables are created on first use."""

    _marker = "%s"

    def __init__(self, url: str) -> None:
        super().__init__()
        try:
            import psycopg
        except ImportError as exc:  # pragma: no cover - host extra installs it
            raise StoreError("PostgreSQL stores need psycopg 3: pip install 'edgekit[host]'") from exc
        self._conninfo, self.schema = split_schema(url)
        self.url = _redact(url)
        self._conn = self._connect(create=True)

    def _connect(self, create: bool = False) -> Any:
        import psycopg

        try:
            conn = psycopg.connect(self._conninfo, connect_timeout=10)
            if self.schema:
                if create:
                    conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
                conn.execute(f'SET search_path TO "{self.schema}"')
            if create:
                for stmt in filter(str.strip, DDL.split(";")):
                    conn.execute(stmt)
                migrate(conn, "postgres")
            conn.commit()
            return conn
        except psycopg.Error as exc:
            raise StoreError(f"cannot open PostgreSQL store {self.url}: {str(exc).strip()}") from exc

    def _connection(self) -> Any:
        if self._conn.closed or self._conn.broken:
            # The server restarted or dropped us: a new connection, and the caller's
            # transaction is gone (the collector retries its batch, unacked until stored).
            log.warning("PostgreSQL connection to %s lost; reconnecting", self.url)
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = self._connect()
        return self._conn

    def _insert_samples(self, rows: List[tuple]) -> List[str]:
        """One statement of fixed text whatever the number of rows (one array per column, unnested by the
        server): psycopg prepares it once, instead of parsing a new 4,000-placeholder query per batch;
        binary (%b), so the arrays go without text escaping."""
        cur = self._exec(_UNNEST_INSERT, [list(col) for col in zip(*rows)])
        return [r[0] for r in cur.fetchall()]

    def _close_connection(self) -> None:
        self._conn.close()

    def drop(self) -> None:
        """Drop this store's schema and everything in it (tests; only with ?schema=)."""
        if not self.schema:
            raise StoreError("drop() needs a store opened with ?schema=NAME; refusing to drop public tables")
        with self._lock:
            self._conn.rollback()
            self._conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
            self._conn.commit()


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url
