"""The sample store: one SQL implementation, two backends (SQLite, PostgreSQL).

Backends differ only in how they connect, their DDL and their parameter
marker; every query lives here, so both behave the same and one test suite
runs against both.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import threading
import time
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

from ...errors import StoreError
from .labeling import LabelingMixin
from .records import DeviceRecord, SampleRecord, loads

__all__ = ["Store", "QUARANTINE_KEEP_BYTES"]

log = logging.getLogger(__name__)

QUARANTINE_KEEP_BYTES = 64 * 1024
"""A quarantined payload keeps at most this many bytes (its full size is recorded)."""

_SAMPLE_COLS = (
    "sample_id, device, fleet, seq, ts, received_at, model_name, model_version, model_sha256, label_pred, "
    "pred_index, confidence, margin, entropy, reasons, top_k, source, input_dtype, input_shape, input_data, "
    "label, labeled_by, labeled_at, label_version"
)
_INSERT_COLS = _SAMPLE_COLS.split(", label, labeled_by")[0]


class Store(LabelingMixin):
    """Samples, device telemetry and status, and quarantined payloads.

    Thread-safe: one lock serialises every call, so the collector's writer
    thread and a reader may share one store. ``with store.batch():`` groups
    many writes in one transaction (the collector acks a batch after it).
    """

    url: str = ""
    _marker = "?"

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._batch_depth = 0
        self._closed = False
        self._touches: Dict[Any, Any] = {}  # device rows to update at the end of a batch

    # -- backend hooks ---------------------------------------------------
    def _connection(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _close_connection(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _sql(self, query: str) -> str:
        return query if self._marker == "?" else query.replace("?", self._marker)

    def _exec(self, query: str, params: Sequence[Any] = (), **driver: Any) -> Any:
        if self._closed:
            raise StoreError(f"store {self.url} is closed")
        try:
            return self._connection().execute(self._sql(query), tuple(params), **driver)
        except StoreError:
            raise
        except Exception as exc:  # driver errors (sqlite3.Error, psycopg.Error) carry their own class
            self._rollback()
            raise StoreError(f"store {self.url}: {exc.__class__.__name__}: {exc}".strip()) from exc

    def _rollback(self) -> None:
        with contextlib.suppress(Exception):
            self._connection().rollback()

    def _commit(self) -> None:
        if self._batch_depth == 0:
            try:
                self._connection().commit()
            except Exception as exc:
                raise StoreError(f"store {self.url}: commit failed: {exc}") from exc

    @contextlib.contextmanager
    def batch(self) -> Iterator["Store"]:
        """Every write inside is one transaction, committed on exit (rolled back on error)."""
        with self._lock:
            self._batch_depth += 1
            try:
                yield self
            except BaseException:
                self._batch_depth -= 1
                if self._batch_depth == 0:
                    self._touches.clear()
                    self._rollback()
                raise
            self._batch_depth -= 1
            if self._batch_depth == 0:
                try:
                    self._flush_touches()
                except BaseException:
                    self._rollback()
                    raise
            self._commit()

    # -- writes ----------------------------------------------------------
    def put_sample(self, payload: Mapping[str, Any], topic: str = "") -> bool:
        """Store one validated ``edgekit.sample/1``; False when its sample_id is stored already."""
        return self.put_samples([payload])[0]

    def put_samples(self, payloads: Sequence[Mapping[str, Any]]) -> List[bool]:
        """Store validated samples with one multi-row INSERT per 200; for each, whether it was new
        (a repeat of a stored sample_id, or of an earlier one in the same call, is not)."""
        if not payloads:
            return []
        now = time.time()
        rows = [_row(p, now, self.url) for p in payloads]
        new_ids: set = set()
        with self._lock:
            for i in range(0, len(rows), 200):
                new_ids.update(self._insert_samples(rows[i:i + 200]))
            for p in payloads:
                key, model = (p["fleet"], p["device"]), p.get("model") or {}
                if self._batch_depth:  # one device update per batch, not one per sample
                    self._touches[key] = (now, model)
                else:
                    self._touch_device(key[0], key[1], now, model)
            self._commit()
        out = []
        for p in payloads:
            sid = p["sample_id"]
            out.append(sid in new_ids)
            new_ids.discard(sid)
        return out

    def _insert_samples(self, rows: List[tuple]) -> List[str]:
        """INSERT rows (at most 200) unless their sample_id is stored; the sample ids inserted."""
        width = len(rows[0])
        values = ", ".join(["(" + ", ".join("?" * width) + ")"] * len(rows))
        cur = self._exec(
            f"INSERT INTO samples ({_INSERT_COLS}) VALUES {values} "
            "ON CONFLICT (sample_id) DO NOTHING RETURNING sample_id",
            [v for row in rows for v in row],
        )
        return [r[0] for r in cur.fetchall()]

    def put_telemetry(self, payload: Mapping[str, Any]) -> None:
        """Append one ``edgekit.telemetry/1`` and make it the device's latest."""
        now = time.time()
        ts = _ts(payload, self.url)
        text = json.dumps(dict(payload))
        with self._lock:
            self._exec(
                "INSERT INTO telemetry (fleet, device, ts, received_at, payload) VALUES (?, ?, ?, ?, ?)",
                (payload["fleet"], payload["device"], ts, now, text),
            )
            self._touch_device(payload["fleet"], payload["device"], now, payload.get("model") or {})
            self._exec(
                "UPDATE devices SET telemetry = ?, telemetry_ts = ? WHERE fleet = ? AND device = ? "
                "AND (telemetry_ts IS NULL OR telemetry_ts <= ?)",
                (text, ts, payload["fleet"], payload["device"], ts),
            )
            self._commit()

    def put_status(self, payload: Mapping[str, Any]) -> None:
        """Record an ``edgekit.status/1`` (online, or offline from the last will)."""
        now = time.time()
        ts = _ts(payload, self.url)
        model = payload.get("model") or {}
        with self._lock:
            self._touch_device(payload["fleet"], payload["device"], now, model,
                               seen=payload.get("state") == "online")
            # The latest to arrive wins, not the latest ts: a last will is composed when
            # the board connects, so its ts is older than the "online" that follows it.
            self._exec(
                "UPDATE devices SET state = ?, state_ts = ? WHERE fleet = ? AND device = ?",
                (payload["state"], ts, payload["fleet"], payload["device"]),
            )
            self._commit()

    def _flush_touches(self) -> None:
        """The batch's device rows in one statement per 100 (a round trip each to PostgreSQL), in key order.
        Telemetry and status upsert their device row where they come in the batch, so two collectors sharing a
        PostgreSQL database can still lock two rows in opposite orders: PostgreSQL then aborts one batch as a
        deadlock, and its messages are stored one by one (a cost, nothing lost)."""
        touches, self._touches = self._touches, {}
        rows = [(fleet, device, now, model.get("name") or None, model.get("version") or None)
                for (fleet, device), (now, model) in sorted(touches.items(), key=lambda kv: kv[0])]
        for i in range(0, len(rows), 100):
            self._upsert_devices(rows[i:i + 100])

    def _touch_device(self, fleet: str, device: str, now: float, model: Mapping[str, Any], seen: bool = True) -> None:
        self._upsert_devices([(fleet, device, now if seen else None, model.get("name") or None,
                               model.get("version") or None)])

    def _upsert_devices(self, rows: List[tuple]) -> None:
        """(fleet, device, last_seen, model_name, model_version) rows; a None keeps what the row had."""
        self._exec(
            "INSERT INTO devices (fleet, device, last_seen, model_name, model_version) VALUES "
            + ", ".join(["(?, ?, ?, ?, ?)"] * len(rows)) + " "
            "ON CONFLICT (fleet, device) DO UPDATE SET "
            "last_seen = COALESCE(excluded.last_seen, devices.last_seen), "
            "model_name = COALESCE(excluded.model_name, devices.model_name), "
            "model_version = COALESCE(excluded.model_version, devices.model_version)",
            [v for row in rows for v in row],
        )

    def quarantine(self, topic: str, payload: bytes, reason: str, detail: str = "") -> None:
        """Keep a payload the collector refused, with why (at most QUARANTINE_KEEP_BYTES of it)."""
        with self._lock:
            self._exec(
                "INSERT INTO quarantine (received_at, topic, reason, detail, size, payload) VALUES (?, ?, ?, ?, ?, ?)",
                (time.time(), topic[:1024], reason, detail[:1024], len(payload), bytes(payload[:QUARANTINE_KEEP_BYTES])),
            )
            self._commit()

    def set_label(self, sample_id: str, label: str, by: str = "cli") -> None:
        self.set_labels({sample_id: label}, by=by)

    def set_labels(self, mapping: Mapping[str, str], by: str = "cli", action: str = "label") -> int:
        """Label many samples in one transaction; unknown ids fail the whole call.
        Each change is kept in the label history (with the label it replaced)."""
        items = [(str(k), str(v)) for k, v in mapping.items()]
        for sid, label in items:
            if not label.strip():
                raise StoreError(f"label for sample {sid} is empty; give a class name")
        with self._lock:
            missing = [sid for sid, _ in items if self._exec("SELECT 1 FROM samples WHERE sample_id = ?", (sid,)).fetchone() is None]
            if missing:
                raise StoreError(f"{len(missing)} sample id(s) not in the store, e.g. {missing[:3]}; check `edgekit samples list`")
            with self.batch():
                self._write_labels(items, by, action)
        return len(items)

    # -- reads -----------------------------------------------------------
    def list_samples(
        self,
        device: Optional[str] = None,
        model_version: Optional[str] = None,
        reason: Optional[str] = None,
        max_confidence: Optional[float] = None,
        min_confidence: Optional[float] = None,
        labeled: Optional[bool] = None,
        limit: Optional[int] = None,
        fleet: Optional[str] = None,
        since: Optional[float] = None,
    ) -> List[SampleRecord]:
        where, params = [], []
        for col, val in (("device", device), ("model_version", model_version), ("fleet", fleet)):
            if val is not None:
                where.append(f"{col} = ?")
                params.append(val)
        if reason is not None:
            where.append("reasons LIKE ?")
            params.append(f'%"{reason}"%')
        if max_confidence is not None:
            where.append("confidence <= ?")
            params.append(float(max_confidence))
        if min_confidence is not None:
            where.append("confidence >= ?")
            params.append(float(min_confidence))
        if labeled is not None:
            where.append("label IS NOT NULL" if labeled else "label IS NULL")
        if since is not None:
            where.append("received_at >= ?")
            params.append(float(since))
        query = f"SELECT {_SAMPLE_COLS} FROM samples"
        if where:
            query += " WHERE " + " AND ".join(where)
        query += " ORDER BY received_at, fleet, device, seq"
        if limit is not None:
            query += " LIMIT ?"
            params.append(int(limit))
        with self._lock:
            rows = self._exec(query, params).fetchall()
        return [_sample(r) for r in rows]

    def get_sample(self, sample_id: str) -> SampleRecord:
        with self._lock:
            row = self._exec(f"SELECT {_SAMPLE_COLS} FROM samples WHERE sample_id = ?", (sample_id,)).fetchone()
        if row is None:
            raise StoreError(f"sample {sample_id!r} is not in the store; see `edgekit samples list`")
        return _sample(row)

    def count_samples(self, labeled: Optional[bool] = None) -> int:
        query = "SELECT COUNT(*) FROM samples"
        if labeled is not None:
            query += " WHERE label IS NOT NULL" if labeled else " WHERE label IS NULL"
        with self._lock:
            return int(self._exec(query).fetchone()[0])

    def count_telemetry(self) -> int:
        with self._lock:
            return int(self._exec("SELECT COUNT(*) FROM telemetry").fetchone()[0])

    def quarantined(self, limit: Optional[int] = None) -> List[Dict[str, Any]]:
        query = "SELECT received_at, topic, reason, detail, size, payload FROM quarantine ORDER BY id"
        params: list = []
        if limit is not None:
            query += " LIMIT ?"
            params.append(int(limit))
        with self._lock:
            rows = self._exec(query, params).fetchall()
        keys = ("received_at", "topic", "reason", "detail", "size", "payload")
        return [dict(zip(keys, r[:5] + (bytes(r[5]),))) for r in rows]

    def quarantine_counts(self) -> Dict[str, int]:
        with self._lock:
            rows = self._exec("SELECT reason, COUNT(*) FROM quarantine GROUP BY reason").fetchall()
        return {r[0]: int(r[1]) for r in rows}

    def devices(self) -> List[DeviceRecord]:
        query = (
            "SELECT d.fleet, d.device, d.last_seen, d.state, d.state_ts, d.model_name, d.model_version, "
            "(SELECT COUNT(*) FROM samples s WHERE s.fleet = d.fleet AND s.device = d.device), "
            "d.telemetry, d.telemetry_ts FROM devices d ORDER BY d.fleet, d.device"
        )
        with self._lock:
            rows = self._exec(query).fetchall()
        return [
            DeviceRecord(fleet=r[0], device=r[1], last_seen=r[2], state=r[3], state_ts=r[4], model_name=r[5],
                         model_version=r[6], samples=int(r[7]), telemetry=loads(r[8], {}), telemetry_ts=r[9])
            for r in rows
        ]

    # -- lifetime --------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._close_connection()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


_JSON_LISTS: Dict[tuple, str] = {}  # the JSON text of a list of strings or ints: reasons and shapes repeat


def _json_list(items: Any) -> str:
    """``json.dumps(list(items))``, remembered for short lists of plain strings and ints (only: 1.0 and True
    equal 1 as keys, and must keep their own text), bounded."""
    key = tuple(items)
    if len(key) > 8 or not all(type(v) is str or type(v) is int for v in key):
        return json.dumps(list(key))
    text = _JSON_LISTS.get(key)
    if text is None:
        if len(_JSON_LISTS) >= 1024:
            _JSON_LISTS.clear()
        text = _JSON_LISTS[key] = json.dumps(list(key))
    return text


def _ts(payload: Mapping[str, Any], url: str) -> float:
    """A telemetry's or status's ``ts`` for its float column; StoreError, not OverflowError, for one that no
    float holds (a 400-digit integer passes the schema's ``number``; the collector refuses it before)."""
    try:
        return float(payload["ts"])
    except (TypeError, ValueError, OverflowError) as exc:
        raise StoreError(f"store {url}: {payload.get('schema')} from {payload.get('fleet')}/"
                         f"{payload.get('device')} has a ts no float column holds ({exc})") from None


def _row(payload: Mapping[str, Any], now: float, url: str = "") -> tuple:
    """A sample's column values; StoreError (as for a row the database refuses) when a field cannot be
    converted, e.g. a 400-digit ``ts`` (the collector refuses such a sample before it comes here)."""
    try:
        return _columns(payload, now)
    except (TypeError, ValueError, OverflowError, KeyError) as exc:  # binascii.Error is a ValueError
        raise StoreError(f"store {url}: sample {payload.get('sample_id')} cannot be stored: "
                         f"{exc.__class__.__name__}: {exc}") from None


def _columns(payload: Mapping[str, Any], now: float) -> tuple:
    model = payload.get("model") or {}
    pred = payload.get("prediction") or {}
    inp = payload["input"]
    source = payload.get("source")
    return (
        payload["sample_id"], payload["device"], payload["fleet"], int(payload["seq"]), float(payload["ts"]),
        now, model.get("name", ""), model.get("version", ""), model.get("sha256", ""),
        str(pred.get("label", "")), int(pred.get("index", -1)), float(pred.get("confidence", 0.0)),
        float(pred.get("margin", 0.0)), float(pred.get("entropy", 0.0)),
        _json_list(payload.get("reasons", ())), json.dumps(list(pred.get("top_k", []))),
        json.dumps(dict(source)) if source else "{}", str(inp["dtype"]), _json_list(inp["shape"]),
        # bytes: decoded already (the collector's validation decodes once); str: the wire's base64
        inp["data"] if isinstance(inp["data"], (bytes, bytearray)) else base64.b64decode(inp["data"]),
    )


def _sample(r: Sequence[Any]) -> SampleRecord:
    return SampleRecord(
        sample_id=r[0], device=r[1], fleet=r[2], seq=int(r[3]), ts=float(r[4]), received_at=float(r[5]),
        model_name=r[6], model_version=r[7], model_sha256=r[8], label_pred=r[9], pred_index=int(r[10]),
        confidence=float(r[11]), margin=float(r[12]), entropy=float(r[13]), reasons=tuple(loads(r[14], [])),
        top_k=tuple(loads(r[15], [])), source=loads(r[16], {}), input_dtype=r[17],
        input_shape=tuple(loads(r[18], [])), input_data=bytes(r[19]), label=r[20], labeled_by=r[21],
        labeled_at=r[22], label_version=int(r[23] or 0),
    )
