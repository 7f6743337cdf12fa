"""Where collected samples, telemetry and status live: SQLite or PostgreSQL.

``open_store(url)`` is the one entry point::

    with open_store("sqlite:///samples.db") as store:      # or a plain path
        store.list_samples(max_confidence=0.5, labeled=False)
    open_store("postgresql://user@db:5432/edgekit?schema=fleet_a")
"""

from __future__ import annotations

from ...errors import StoreError
from .base import QUARANTINE_KEEP_BYTES, Store
from .labeling import INVALID_LABEL, LabelEvent
from .records import DeviceRecord, SampleRecord

__all__ = ["open_store", "Store", "SampleRecord", "DeviceRecord", "LabelEvent", "INVALID_LABEL",
           "QUARANTINE_KEEP_BYTES", "DEFAULT_STORE"]

DEFAULT_STORE = "sqlite:///edgekit-samples.db"


def open_store(url: str) -> Store:
    """``sqlite:///path.db`` (relative), ``sqlite:////abs/path.db``, a plain path, or ``postgresql://...``."""
    if not isinstance(url, str) or not url.strip():
        raise StoreError(f"store URL {url!r} is empty; use sqlite:///samples.db or postgresql://host/db")
    url = url.strip()
    if url.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresStore

        return PostgresStore(url)
    if url.startswith("sqlite://"):
        path = url[len("sqlite://"):]
        if not path.startswith("/") or len(path) < 2:
            raise StoreError(f"store URL {url!r} has no path; use sqlite:///samples.db")
        path = path[1:]
    elif "://" in url:
        raise StoreError(f"store URL {url!r}: unknown scheme; use sqlite:///path.db or postgresql://host/db")
    else:
        path = url
    from .sqlite import SQLiteStore

    return SQLiteStore(path)
