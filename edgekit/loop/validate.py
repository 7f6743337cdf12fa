"""Is an MQTT message a valid protocol payload? The collector's gate (docs/protocol.md).

Checks in order: size, topic (its fleet and device must be exact names), UTF-8 JSON
object nested at most MAX_JSON_DEPTH levels deep, the JSON Schema of the topic's kind
(device_agent.delivery.protocol.SCHEMAS), the numbers the store keeps in columns (finite,
within the column's range: the schema's ``number`` and ``integer`` let NaN or a 400-digit
integer through), a sample's input (base64 size against dtype x shape), and the payload's
fleet/device against the topic's, which must be equal character for character: the topic
is the board's identity (the broker's ACL pins it to the board's certificate), the payload
only repeats it.
A failure raises :class:`Malformed` with the counter it goes to; whatever the bytes,
nothing else comes out of :func:`check_message`.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import re
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from device_agent import limits
from device_agent.delivery import protocol as wire
from device_agent.delivery.schemas import DTYPES

from .fastschema import Unsupported, compile_schema

__all__ = ["Malformed", "check_message", "sample_id_hint", "DEFAULT_MAX_PAYLOAD_BYTES", "KIND_SCHEMAS"]

log = logging.getLogger(__name__)

DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024
MAX_JSON_DEPTH = limits.MAX_JSON_DEPTH
"""No payload a board sends nests deeper than a few levels (a sample: 4); a deeper one is refused (``not_json``),
as the boards refuse one on every topic they read. Nothing deeper reaches the schema check or the store."""
KIND_SCHEMAS = {"samples": "edgekit.sample/1", "telemetry": "edgekit.telemetry/1", "status": "edgekit.status/1"}


class Malformed(Exception):
    """A payload the collector refuses; ``reason`` is the counter it goes to."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


_validators: Dict[str, Any] = {}
_fast: Dict[str, Any] = {}


def _validator(schema_id: str) -> Any:
    if schema_id not in _validators:
        import jsonschema

        _validators[schema_id] = jsonschema.Draft202012Validator(wire.SCHEMAS[schema_id])
    return _validators[schema_id]


def _schema_error(schema_id: str, obj: Any) -> Any:
    """The first JSON Schema error, or None. A compiled check answers valid payloads
    (the common case) fast; jsonschema has the last word and says what is wrong."""
    if schema_id not in _fast:
        try:
            _fast[schema_id] = compile_schema(wire.SCHEMAS[schema_id])
        except Unsupported as exc:
            log.debug("schema %s is checked by jsonschema only (%s)", schema_id, exc)
            _fast[schema_id] = None
    fast = _fast[schema_id]
    if fast is not None and fast(obj):
        return None
    return next(iter(_validator(schema_id).iter_errors(obj)), None)


_INT64_MAX = 2**63 - 1  # SQLite INTEGER, PostgreSQL BIGINT
_INT32_MAX = 2**31 - 1  # PostgreSQL INTEGER
# The numbers each kind's store row keeps in columns: (path, the largest integer allowed, or None for a finite
# float). Every one is required by its schema, which also gave it its type and lower bound.
_COLUMNS: Dict[str, Tuple[Tuple[Tuple[str, ...], Optional[int]], ...]] = {
    "samples": ((("seq",), _INT64_MAX), (("ts",), None), (("prediction", "index"), _INT32_MAX),
                (("prediction", "confidence"), None), (("prediction", "margin"), None),
                (("prediction", "entropy"), None)),
    "telemetry": ((("ts",), None),),
    "status": ((("ts",), None),),
}


def _show(value: Any) -> str:
    """A number for a log line: short, whatever its size (never 400 digits)."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    return repr(value)


def _fits(kind: str, obj: Dict[str, Any]) -> bool:
    """The usual answer of :func:`_check_columns` (every number fits), fast: ~0.4 us for a sample."""
    isfinite = math.isfinite
    try:
        if kind != "samples":
            return isfinite(obj["ts"])
        pred = obj["prediction"]
        return (obj["seq"] <= _INT64_MAX and pred["index"] <= _INT32_MAX and isfinite(obj["ts"])
                and isfinite(pred["confidence"]) and isfinite(pred["margin"]) and isfinite(pred["entropy"]))
    except OverflowError:
        return False


def _check_columns(kind: str, schema_id: str, obj: Dict[str, Any]) -> None:
    """Malformed("schema") for a number the store cannot keep as the schema let it through: not finite
    (NaN, or an overflow such as 1e400 parsed as inf), too big for a float (a 400-digit integer), or an
    integer beyond its column (``seq`` over 2**63 - 1, ``prediction.index`` over 2**31 - 1)."""
    if _fits(kind, obj):
        return
    for path, most in _COLUMNS[kind]:
        value: Any = obj
        for key in path:
            value = value[key]
        if most is None:
            try:
                ok = math.isfinite(value)
            except OverflowError:  # an int too big for a float
                ok = False
            why = "is not a finite number a float column can keep"
        else:
            ok = value <= most
            why = f"is over {most}, the largest its column keeps"
        if not ok:
            raise Malformed("schema", f"{schema_id} at {'/'.join(path)}: {_show(value)} {why}")


_ITEMSIZE = {name: np.dtype(name).itemsize for name in DTYPES}  # what wire.decode_input finds with numpy


def _input_bytes(inp: Dict[str, Any]) -> bytes:
    """A sample's input decoded and checked against dtype x shape. The usual input (a listed dtype, integer
    dimensions, strict base64 of the right size) is checked here without numpy; anything else goes to
    ``wire.decode_input``, which gives the same answer for it, or the error a board is told."""
    size = _ITEMSIZE.get(inp["dtype"]) if type(inp.get("dtype")) is str else None
    shape, data = inp.get("shape"), inp.get("data")
    if (size is not None and type(shape) is list and type(data) is str and inp.get("encoding", "base64") == "base64"
            and all(type(d) is int for d in shape)):
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raw = None
        if raw is not None and len(raw) == math.prod(shape) * size:
            return raw
    try:
        return wire.decode_input(inp)[0]
    except wire.ProtocolError as exc:
        raise Malformed("bad_input", str(exc)) from None


_TOPICS: Dict[str, Dict[str, str]] = {}  # topics seen valid: a fleet's boards repeat theirs on every message
_MAX_TOPICS = 65536


def _topic_parts(topic: str) -> Dict[str, str]:
    """A sample/telemetry/status topic's parts, or Malformed("bad_topic"); valid ones are remembered."""
    parts = _TOPICS.get(topic)
    if parts is not None:
        return parts
    try:
        parts = wire.parse_topic(topic)
    except wire.ProtocolError as exc:
        raise Malformed("bad_topic", str(exc)) from None
    try:  # the topic is the identity (the broker's ACL pins it to the certificate): exact names only
        wire.check_name(parts["fleet"], "topic fleet")
        wire.check_name(parts["device"], "topic device")
    except wire.ProtocolError as exc:
        raise Malformed("bad_topic", str(exc)) from None
    if parts["kind"] not in KIND_SCHEMAS:
        raise Malformed("bad_topic", f"topic kind={parts['kind']!r}, the collector takes {sorted(KIND_SCHEMAS)}")
    if len(_TOPICS) >= _MAX_TOPICS:  # bounded: a flood of new names costs the parse, never memory
        _TOPICS.clear()
    _TOPICS[topic] = parts
    return parts


def _opens_more_than(payload: bytes, limit: int) -> bool:
    """Whether ``payload`` has more than ``limit`` ``[`` and ``{`` (in strings too), cheaply: a board's sample
    opens about 10, none in its base64. ``bytes.count`` looks at every byte (~0.9 ns each: 0.36 ms for a
    200 KB sample); ``find`` skips to the next one at memchr speed and stops at ``limit`` + 1 (9 us)."""
    if len(payload) <= 4096:
        return payload.count(b"[") + payload.count(b"{") > limit
    n = 0
    for ch in (b"[", b"{"):
        i = payload.find(ch)
        while i >= 0:
            n += 1
            if n > limit:
                return True
            i = payload.find(ch, i + 1)
    return False


def _deeper_than(obj: Any, limit: int) -> bool:
    """Whether parsed JSON nests ``[`` and ``{`` more than ``limit`` levels deep (as
    ``device_agent.limits.json_depth`` counts them in the bytes); level by level, whatever the depth."""
    level = [obj] if obj.__class__ is dict or obj.__class__ is list else []  # json.loads makes no subclasses
    for _ in range(limit):
        below: List[Any] = []
        for node in level:
            below += [c for c in (node.values() if node.__class__ is dict else node)
                      if c.__class__ is dict or c.__class__ is list]
        if not below:
            return False
        level = below
    return bool(level)


def check_message(topic: str, payload: bytes, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES, *,
                  decode_input: bool = False) -> Tuple[str, Dict[str, Any]]:
    """Validate one MQTT message; returns ``(kind, payload_dict)`` or raises :class:`Malformed`.

    ``decode_input=True``: a sample's ``input.data`` comes back as the decoded bytes (checked against
    dtype x shape here anyway), so the store does not decode the base64 a second time.

    Reasons: ``oversized``, ``bad_topic``, ``not_json``, ``schema``, ``bad_input``, ``topic_mismatch``.
    """
    if len(payload) > max_bytes:
        raise Malformed("oversized", f"payload has {len(payload)} bytes, limit={max_bytes}")
    parts = _topic_parts(topic)
    kind = parts["kind"]
    try:
        obj = json.loads(payload.decode("utf-8"))
    except RecursionError:  # json's own limit (about 1,000 levels): a bracket bomb such as b"[" * 100000
        raise Malformed("not_json", f"payload nests JSON deeper than {MAX_JSON_DEPTH} levels") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise Malformed("not_json", f"payload is not UTF-8 JSON ({exc.__class__.__name__})") from None
    # Fewer brackets than the limit cannot nest deeper (every payload a board sends: about 10); only the
    # others are walked, after the parse (a scan of the bytes for strings is quadratic on some payloads).
    if _opens_more_than(payload, MAX_JSON_DEPTH) and _deeper_than(obj, MAX_JSON_DEPTH):
        raise Malformed("not_json", f"payload nests JSON deeper than {MAX_JSON_DEPTH} levels")
    if not isinstance(obj, dict):
        raise Malformed("not_json", f"payload is a JSON {type(obj).__name__}, expected an object")
    expected = KIND_SCHEMAS[kind]
    if obj.get("schema") != expected:
        raise Malformed("schema", f"schema={obj.get('schema')!r} on a {kind} topic, expected={expected!r}")
    error = _schema_error(expected, obj)
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        raise Malformed("schema", f"{expected} at {where}: {error.message[:200]}")
    _check_columns(kind, expected, obj)
    if kind == "samples":
        inp = obj["input"]
        raw = _input_bytes(inp)
        if decode_input:
            inp["data"] = raw  # obj is ours (parsed above): no copy
    # Exact, character for character: the payload may not speak for another board (or a look-alike name).
    if (obj["fleet"], obj["device"]) != (parts["fleet"], parts["device"]):
        raise Malformed("topic_mismatch", f"payload says {obj['fleet']}/{obj['device']}, topic says "
                                          f"{parts['fleet']}/{parts['device']}")
    return kind, obj


# How boards write a sample: the schema, then the sample id (compact or json.dumps spacing).
_SAMPLE_HEAD = re.compile(rb'^\{\s*"schema"\s*:\s*"edgekit\.sample/1"\s*,\s*"sample_id"\s*:\s*"'
                          rb'([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})"')


def sample_id_hint(payload: bytes) -> Optional[str]:
    """The sample id of a refused sample payload, read from its first 160 bytes only (nothing is parsed,
    so an oversized or broken payload costs nothing): the collector acknowledges it as quarantined so
    the board stops sending it. Only a payload that starts the way boards write one has an id here."""
    m = _SAMPLE_HEAD.match(bytes(payload[:160]))
    return m.group(1).decode("ascii") if m else None
