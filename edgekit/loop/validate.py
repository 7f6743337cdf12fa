"""Is an MQTT message a valid protocol payload? The collector's gate (docs/protocol.md).

Checks in order: size, topic (its fleet and device must be exact names), UTF-8
JSON object, the JSON Schema of the topic's kind (device_agent.delivery.protocol.SCHEMAS),
a sample's input (base64 size against dtype x shape), and the payload's fleet/device
against the topic's, which must be equal character for character: the topic is the
board's identity (the broker's ACL pins it to the board's certificate), the payload
only repeats it.
A failure raises :class:`Malformed` with the counter it goes to.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import re
from typing import Any, Dict, Optional, Tuple

import numpy as np

from device_agent.delivery import protocol as wire
from device_agent.delivery.schemas import DTYPES

from .fastschema import Unsupported, compile_schema

__all__ = ["Malformed", "check_message", "sample_id_hint", "DEFAULT_MAX_PAYLOAD_BYTES", "KIND_SCHEMAS"]

log = logging.getLogger(__name__)

DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024
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
    except (UnicodeDecodeError, ValueError) as exc:
        raise Malformed("not_json", f"payload is not UTF-8 JSON ({exc.__class__.__name__})") from None
    if not isinstance(obj, dict):
        raise Malformed("not_json", f"payload is a JSON {type(obj).__name__}, expected an object")
    expected = KIND_SCHEMAS[kind]
    if obj.get("schema") != expected:
        raise Malformed("schema", f"schema={obj.get('schema')!r} on a {kind} topic, expected={expected!r}")
    error = _schema_error(expected, obj)
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        raise Malformed("schema", f"{expected} at {where}: {error.message[:200]}")
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
