"""The MQTT contract between boards and the host (docs/protocol.md).

Topics live under ``edgekit/v1/<fleet>/<device>/``:

=============  ==========  =====  ========  =======================================
suffix         direction   QoS    retained  payload schema
=============  ==========  =====  ========  =======================================
samples        dev -> host 1      no        ``edgekit.sample/1``
telemetry      dev -> host 0      no        ``edgekit.telemetry/1``
status         dev -> host 1      yes       ``edgekit.status/1`` (last will: offline)
predictions    dev -> host 0      no        ``edgekit.prediction/1`` (optional)
cmd            host -> dev 1      no        ``edgekit.cmd/1``
=============  ==========  =====  ========  =======================================

Every payload is a UTF-8 JSON object with a ``schema`` field. The JSON Schemas
below are the reference; the collector validates against them, the agent
builds its payloads with the functions here so both sides agree.
"""

from __future__ import annotations

import base64
import re
import time
import uuid
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np

from .errors import ProtocolError

__all__ = [
    "PREFIX",
    "KINDS",
    "SCHEMAS",
    "MAX_PAYLOAD_BYTES",
    "topic",
    "subscription",
    "parse_topic",
    "encode_array",
    "decode_array",
    "sample_payload",
    "status_payload",
    "telemetry_payload",
    "prediction_payload",
    "parse_cmd",
]

PREFIX = "edgekit/v1"
KINDS = ("samples", "telemetry", "status", "predictions", "cmd")
MAX_PAYLOAD_BYTES = 4 * 1024 * 1024
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_DTYPES = ["uint8", "int8", "int16", "uint16", "int32", "float16", "float32", "float64"]


def check_name(value: str, what: str) -> str:
    """Fleet and device names are one topic level: letters, digits, ``._-``."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise ProtocolError(f"{what}={value!r} is not a valid name; use 1-64 letters, digits, '.', '_' or '-'")
    return value


def topic(fleet: str, device: str, kind: str) -> str:
    if kind not in KINDS:
        raise ProtocolError(f"topic kind={kind!r}, expected one of {KINDS}")
    return f"{PREFIX}/{check_name(fleet, 'fleet')}/{check_name(device, 'device')}/{kind}"


def subscription(fleet: Optional[str], kind: str, share_group: Optional[str] = None) -> str:
    """Topic filter for one kind over a fleet (``+`` for all fleets), optionally shared."""
    f = check_name(fleet, "fleet") if fleet else "+"
    filt = f"{PREFIX}/{f}/+/{kind}"
    return f"$share/{check_name(share_group, 'share group')}/{filt}" if share_group else filt


def parse_topic(name: str) -> Dict[str, str]:
    """``edgekit/v1/<fleet>/<device>/<kind>`` to its parts."""
    parts = name.split("/")
    if len(parts) != 5 or "/".join(parts[:2]) != PREFIX or parts[4] not in KINDS:
        raise ProtocolError(f"topic {name!r} is not {PREFIX}/<fleet>/<device>/<kind>")
    return {"fleet": parts[2], "device": parts[3], "kind": parts[4]}


def encode_array(x: np.ndarray) -> Dict[str, Any]:
    x = np.ascontiguousarray(x)
    if x.dtype.name not in _DTYPES:
        x = x.astype(np.float32)
    return {
        "dtype": x.dtype.name,
        "shape": list(x.shape),
        "encoding": "base64",
        "data": base64.b64encode(x.tobytes()).decode("ascii"),
    }


def decode_array(obj: Mapping[str, Any]) -> np.ndarray:
    """The ``input`` object of a sample back to an array; checks size against shape."""
    try:
        dtype = np.dtype(str(obj["dtype"]))
        shape = tuple(int(d) for d in obj["shape"])
        if obj.get("encoding", "base64") != "base64":
            raise ProtocolError(f"input.encoding={obj.get('encoding')!r}, expected 'base64'")
        raw = base64.b64decode(obj["data"], validate=True)
    except ProtocolError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"input is malformed ({exc.__class__.__name__}: {exc}); see docs/protocol.md") from exc
    if dtype.name not in _DTYPES:
        raise ProtocolError(f"input.dtype={dtype.name!r}, expected one of {_DTYPES}")
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ProtocolError(f"input data has {len(raw)} bytes, expected={expected} for shape {list(shape)} {dtype.name}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def now() -> float:
    return round(time.time(), 3)


def sample_payload(
    *,
    device: str,
    fleet: str,
    seq: int,
    model: Mapping[str, str],
    prediction: Mapping[str, Any],
    reasons: Sequence[str],
    raw: np.ndarray,
    source: Optional[Mapping[str, Any]] = None,
    sample_id: Optional[str] = None,
    ts: Optional[float] = None,
) -> Dict[str, Any]:
    """One flagged input, as ``edgekit.sample/1``."""
    return {
        "schema": "edgekit.sample/1",
        "sample_id": sample_id or str(uuid.uuid4()),
        "device": device,
        "fleet": fleet,
        "seq": int(seq),
        "ts": ts if ts is not None else now(),
        "model": dict(model),
        "prediction": dict(prediction),
        "reasons": list(reasons),
        "input": encode_array(raw),
        "source": dict(source or {}),
    }


def status_payload(*, device: str, fleet: str, state: str, model: Optional[Mapping[str, str]] = None,
                   agent_version: str = "", ts: Optional[float] = None) -> Dict[str, Any]:
    return {
        "schema": "edgekit.status/1",
        "device": device,
        "fleet": fleet,
        "state": state,
        "ts": ts if ts is not None else now(),
        "model": dict(model or {}),
        "agent_version": agent_version,
    }


def telemetry_payload(*, device: str, fleet: str, model: Mapping[str, str], uptime_s: float, inferences: int,
                      outbox: Mapping[str, int], ts: Optional[float] = None, **fields: Any) -> Dict[str, Any]:
    """Periodic health, as ``edgekit.telemetry/1``; ``fields`` are the optional properties of the schema."""
    out: Dict[str, Any] = {
        "schema": "edgekit.telemetry/1",
        "device": device,
        "fleet": fleet,
        "ts": ts if ts is not None else now(),
        "uptime_s": round(float(uptime_s), 3),
        "inferences": int(inferences),
        "outbox": {k: int(v) for k, v in outbox.items()},
        "model": dict(model),
    }
    out.update(fields)
    return out


def prediction_payload(*, device: str, seq: int, label: str, confidence: float, sample_id: Optional[str] = None,
                       ts: Optional[float] = None, **fields: Any) -> Dict[str, Any]:
    """One prediction (published only when ``[mqtt].publish_predictions`` is on), as ``edgekit.prediction/1``."""
    out: Dict[str, Any] = {
        "schema": "edgekit.prediction/1",
        "device": device,
        "seq": int(seq),
        "ts": ts if ts is not None else now(),
        "label": label,
        "confidence": float(confidence),
        "sample_id": sample_id,
    }
    out.update(fields)
    return out


COMMANDS = ("ping", "set_thresholds", "flush", "reload_bundle", "send_telemetry")


def parse_cmd(payload: bytes) -> Dict[str, Any]:
    """Validate an ``edgekit.cmd/1`` message; raises :class:`ProtocolError` with one line."""
    import json

    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"command is not UTF-8 JSON ({exc.__class__.__name__}); see docs/protocol.md") from exc
    if not isinstance(obj, dict) or obj.get("schema") != "edgekit.cmd/1":
        raise ProtocolError("command must be a JSON object with schema 'edgekit.cmd/1'")
    if obj.get("cmd") not in COMMANDS:
        raise ProtocolError(f"command cmd={obj.get('cmd')!r} is unknown; expected one of {COMMANDS}")
    args = obj.get("args", {})
    if not isinstance(args, dict):
        raise ProtocolError("command args must be a JSON object")
    return {"cmd": obj["cmd"], "args": args, "id": str(obj.get("id", ""))}


# ---------------------------------------------------------------------------
# JSON Schemas (draft 2020-12). docs/protocol.md shows them; the collector and
# the tests validate with them.
_MODEL = {
    "type": "object",
    "required": ["name", "version", "sha256"],
    "properties": {
        "name": {"type": "string"},
        "version": {"type": "string"},
        "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
    },
}
_NAMEPAT = {"type": "string", "pattern": _NAME.pattern}
_NUM = {"type": "number"}
_NUM_OR_NULL = {"type": ["number", "null"]}

SCHEMAS: Dict[str, Dict[str, Any]] = {
    "edgekit.sample/1": {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "edgekit.sample/1: one flagged input",
        "type": "object",
        "required": ["schema", "sample_id", "device", "fleet", "seq", "ts", "model", "prediction", "reasons", "input"],
        "properties": {
            "schema": {"const": "edgekit.sample/1"},
            "sample_id": {"type": "string", "format": "uuid",
                          "pattern": "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"},
            "device": _NAMEPAT,
            "fleet": _NAMEPAT,
            "seq": {"type": "integer", "minimum": 0},
            "ts": _NUM,
            "model": _MODEL,
            "prediction": {
                "type": "object",
                "required": ["label", "index", "confidence", "margin", "entropy", "top_k"],
                "properties": {
                    "label": {"type": "string"},
                    "index": {"type": "integer", "minimum": 0},
                    "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                    "margin": {"type": "number", "minimum": 0, "maximum": 1},
                    "entropy": {"type": "number", "minimum": 0},
                    "top_k": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["label", "index", "score"],
                            "properties": {"label": {"type": "string"}, "index": {"type": "integer"}, "score": _NUM},
                        },
                    },
                },
            },
            "reasons": {
                "type": "array",
                "minItems": 1,
                "items": {"enum": ["low_confidence", "low_margin", "random", "manual"]},
            },
            "input": {
                "type": "object",
                "required": ["dtype", "shape", "encoding", "data"],
                "properties": {
                    "dtype": {"enum": _DTYPES},
                    "shape": {"type": "array", "items": {"type": "integer", "minimum": 1}, "maxItems": 4},
                    "encoding": {"const": "base64"},
                    "data": {"type": "string", "contentEncoding": "base64"},
                },
            },
            "source": {"type": "object"},
        },
    },
    "edgekit.telemetry/1": {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "edgekit.telemetry/1: periodic health",
        "type": "object",
        "required": ["schema", "device", "fleet", "ts", "uptime_s", "inferences", "outbox", "model"],
        "properties": {
            "schema": {"const": "edgekit.telemetry/1"},
            "device": _NAMEPAT,
            "fleet": _NAMEPAT,
            "ts": _NUM,
            "uptime_s": _NUM,
            "cpu_percent": _NUM_OR_NULL,
            "memory_rss_bytes": {"type": ["integer", "null"]},
            "memory_percent": _NUM_OR_NULL,
            "temperature_c": _NUM_OR_NULL,
            "disk_free_bytes": {"type": ["integer", "null"]},
            "inferences": {"type": "integer", "minimum": 0},
            "flagged": {"type": "integer", "minimum": 0},
            "latency_ms": {
                "type": "object",
                "properties": {"p50": _NUM_OR_NULL, "p95": _NUM_OR_NULL},
            },
            "low_confidence_rate": _NUM_OR_NULL,
            "outbox": {
                "type": "object",
                "required": ["depth", "bytes", "dropped"],
                "properties": {
                    "depth": {"type": "integer", "minimum": 0},
                    "bytes": {"type": "integer", "minimum": 0},
                    "dropped": {"type": "integer", "minimum": 0},
                },
            },
            "errors": {"type": "object", "additionalProperties": {"type": "integer"}},
            "model": _MODEL,
            "runtime": {"type": "string"},
        },
    },
    "edgekit.status/1": {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "edgekit.status/1: retained online/offline (the last will says offline)",
        "type": "object",
        "required": ["schema", "device", "fleet", "state", "ts"],
        "properties": {
            "schema": {"const": "edgekit.status/1"},
            "device": _NAMEPAT,
            "fleet": _NAMEPAT,
            "state": {"enum": ["online", "offline"]},
            "ts": _NUM,
            "model": {"type": "object"},
            "agent_version": {"type": "string"},
        },
    },
    "edgekit.prediction/1": {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "edgekit.prediction/1: every prediction (optional, off by default)",
        "type": "object",
        "required": ["schema", "device", "seq", "ts", "label", "confidence"],
        "properties": {
            "schema": {"const": "edgekit.prediction/1"},
            "device": _NAMEPAT,
            "seq": {"type": "integer"},
            "ts": _NUM,
            "label": {"type": "string"},
            "confidence": _NUM,
            "sample_id": {"type": ["string", "null"]},
        },
    },
    "edgekit.cmd/1": {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "edgekit.cmd/1: host to device command",
        "type": "object",
        "required": ["schema", "cmd"],
        "properties": {
            "schema": {"const": "edgekit.cmd/1"},
            "cmd": {"enum": list(COMMANDS)},
            "args": {"type": "object"},
            "id": {"type": "string"},
        },
    },
}
