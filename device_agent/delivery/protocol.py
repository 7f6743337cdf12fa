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
bundle         host -> dev 1      yes       ``edgekit.bundle/1`` (the model the board should run)
ack            host -> dev 1      no        ``edgekit.ack/1`` (sample ids a collector committed)
=============  ==========  =====  ========  =======================================

Every payload is a UTF-8 JSON object with a ``schema`` field. The JSON Schemas
in :mod:`device_agent.delivery.schemas` (re-exported here as ``SCHEMAS``) are the
reference; the collector validates against them, the agent builds its payloads
with the functions here so both sides agree.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import math
import os
import re
import tarfile
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from .. import limits
from ..errors import AgentError, ProtocolError
from .schemas import COMMANDS, DTYPES as _DTYPES, MAX_ACK_IDS, NAME as _NAME, SCHEMAS, UUID as _UUID

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
    "decode_input",
    "sample_payload",
    "sample_message",
    "sample_parts",
    "SampleParts",
    "status_payload",
    "telemetry_payload",
    "prediction_payload",
    "parse_cmd",
    "MAX_ACK_BYTES",
    "MAX_ACK_IDS",
    "ack_payload",
    "parse_ack",
    "DEFAULT_MAX_BUNDLE_BYTES",
    "max_bundle_message_bytes",
    "pack_bundle",
    "bundle_payload",
    "parse_bundle",
]

PREFIX = "edgekit/v1"
KINDS = ("samples", "telemetry", "status", "predictions", "cmd", "bundle", "ack")
MAX_PAYLOAD_BYTES = 4 * 1024 * 1024
MAX_ACK_BYTES = 64 * 1024
"""Largest ``edgekit.ack/1`` message a board reads (MAX_ACK_IDS ids take about 40 KB)."""
DEFAULT_MAX_BUNDLE_BYTES = 16 * 1024 * 1024
"""Largest bundle archive (the .tar.gz, before base64) a ``bundle`` message may carry by default."""


def check_name(value: str, what: str) -> str:
    """Fleet and device names are one topic level: letters, digits, ``._-`` (the whole string: a
    trailing newline, which ``$`` lets through, would make a look-alike of another board's name)."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
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


_DTYPE_OF = {name: np.dtype(name) for name in _DTYPES}


def decode_input(obj: Mapping[str, Any]) -> "tuple[bytes, np.dtype, tuple]":
    """The ``input`` object of a sample to its raw bytes, dtype and shape; checks size against shape."""
    try:
        name = obj["dtype"]
        dtype = _DTYPE_OF.get(name) if isinstance(name, str) else None
        if dtype is None:
            dtype = np.dtype(str(name))
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
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise ProtocolError(f"input data has {len(raw)} bytes, expected={expected} for shape {list(shape)} {dtype.name}")
    return raw, dtype, shape


def decode_array(obj: Mapping[str, Any]) -> np.ndarray:
    """The ``input`` object of a sample back to an array; checks size against shape."""
    raw, dtype, shape = decode_input(obj)
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


_JSON = json.JSONEncoder(separators=(",", ":")).encode
_MARK = "\x00" + uuid.uuid4().hex  # stands in for the base64 data while the rest is encoded (no string holds it)


class SampleParts(NamedTuple):
    """A sample message in the parts it is made of: its JSON up to the input's base64 text (``head``), the
    input's raw bytes (``data``) and its JSON after them (``tail``). The outbox stores these (the raw bytes,
    a quarter fewer than their base64) and :meth:`message` makes the bytes published."""

    head: bytes
    data: bytes
    tail: bytes

    def message(self) -> bytes:
        """The ``edgekit.sample/1`` JSON: the same bytes as :func:`sample_message`."""
        return b"".join((self.head, base64.b64encode(self.data), self.tail))

    @property
    def size(self) -> int:
        """Bytes stored: the parts, not the message."""
        return len(self.head) + len(self.data) + len(self.tail)


_MARK_JSON = _JSON(_MARK)[1:-1]  # the marker as the encoder writes it (escaped)


def sample_parts(*, device: str, fleet: str, seq: int, model: Mapping[str, str], prediction: Mapping[str, Any],
                 reasons: Sequence[str], raw: np.ndarray, source: Optional[Mapping[str, Any]] = None,
                 sample_id: Optional[str] = None, ts: Optional[float] = None) -> SampleParts:
    """``sample_message(...)`` in its parts (:class:`SampleParts`), base64 not yet made. The fields of
    :func:`sample_payload`, in its order, built here without its detour through :func:`encode_array`."""
    x = raw if type(raw) is np.ndarray and raw.flags.c_contiguous else np.ascontiguousarray(raw)
    name = x.dtype.name
    if name not in _DTYPES:
        x = x.astype(np.float32)
        name = "float32"
    payload = {
        "schema": "edgekit.sample/1",
        "sample_id": sample_id or str(uuid.uuid4()),
        "device": device,
        "fleet": fleet,
        "seq": int(seq),
        "ts": ts if ts is not None else now(),
        "model": dict(model),
        "prediction": dict(prediction),
        "reasons": list(reasons),
        "input": {"dtype": name, "shape": list(x.shape), "encoding": "base64", "data": _MARK},
        "source": dict(source or {}),
    }
    head, tail = _JSON(payload).split(_MARK_JSON, 1)  # ASCII only (ensure_ascii): the same split as bytes
    return SampleParts(head.encode(), x.tobytes(), tail.encode())


def sample_message(*, raw: np.ndarray, **fields: Any) -> bytes:
    """``sample_payload(raw=raw, **fields)`` as the compact JSON bytes the board publishes.

    The same bytes as ``json.dumps(..., separators=(",", ":")).encode()``, built cheaper for big inputs:
    the base64 text (which holds nothing JSON escapes) is spliced in as bytes rather than scanned by the
    encoder and copied twice more (:func:`sample_parts`)."""
    return sample_parts(raw=raw, **fields).message()


def status_payload(*, device: str, fleet: str, state: str, model: Optional[Mapping[str, str]] = None,
                   agent_version: str = "", ts: Optional[float] = None,
                   last_update_error: Optional[str] = None, last_update_archive: Optional[str] = None) -> Dict[str, Any]:
    """``last_update_error``: why the newest ``bundle`` message was refused (absent when it was not)."""
    out = {
        "schema": "edgekit.status/1",
        "device": device,
        "fleet": fleet,
        "state": state,
        "ts": ts if ts is not None else now(),
        "model": dict(model or {}),
        "agent_version": agent_version,
    }
    if last_update_error:
        out["last_update_error"] = str(last_update_error)
        if last_update_archive and _SHA256.match(last_update_archive):
            out["last_update_archive"] = last_update_archive
    return out


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




def _json_object(payload: bytes, schema: str, what: str, max_bytes: int) -> Dict[str, Any]:
    """``payload`` as a JSON object whose ``schema`` is ``schema``; :class:`ProtocolError` with one line if not.

    Its size and nesting depth are checked before ``json.loads`` sees it (limits.MAX_JSON_DEPTH).
    """
    obj = limits.loads(bytes(payload), what=what, max_bytes=max_bytes, error=ProtocolError)
    if not isinstance(obj, dict) or obj.get("schema") != schema:
        raise ProtocolError(f"{what} must be a JSON object with schema '{schema}'")
    return obj


def parse_cmd(payload: bytes) -> Dict[str, Any]:
    """Validate an ``edgekit.cmd/1`` message; raises :class:`ProtocolError` with one line."""
    obj = _json_object(payload, "edgekit.cmd/1", "command", limits.MAX_CMD_BYTES)
    if obj.get("cmd") not in COMMANDS:
        raise ProtocolError(f"command cmd={obj.get('cmd')!r} is unknown; expected one of {COMMANDS}")
    args = obj.get("args", {})
    if not isinstance(args, dict):
        raise ProtocolError("command args must be a JSON object")
    return {"cmd": obj["cmd"], "args": args, "id": str(obj.get("id", ""))[:128]}


# ---------------------------------------------------------------------------
# End-to-end acknowledgement: the collector names the samples it has committed.
def ack_payload(stored: Sequence[str], quarantined: Sequence[str] = (), *, ts: Optional[float] = None) -> Dict[str, Any]:
    """``edgekit.ack/1`` for at most MAX_ACK_IDS sample ids (split bigger batches over several messages)."""
    if len(stored) + len(quarantined) > MAX_ACK_IDS:
        raise ProtocolError(f"an ack names {len(stored) + len(quarantined)} sample ids, more than "
                            f"MAX_ACK_IDS={MAX_ACK_IDS}; split it")
    out: Dict[str, Any] = {"schema": "edgekit.ack/1", "ts": ts if ts is not None else now(), "stored": list(stored)}
    if quarantined:
        out["quarantined"] = list(quarantined)
    return out


def parse_ack(payload: bytes) -> Tuple[list, list]:
    """Check an ``edgekit.ack/1`` message: its ``(stored, quarantined)`` sample ids.

    The size is checked before the JSON is parsed; raises :class:`ProtocolError` with one line.
    """
    if len(payload) > MAX_ACK_BYTES:
        raise ProtocolError(f"ack message is {len(payload)} bytes, over MAX_ACK_BYTES={MAX_ACK_BYTES}")
    obj = _json_object(payload, "edgekit.ack/1", "ack message", MAX_ACK_BYTES)
    lists = []
    for key in ("stored", "quarantined"):
        ids = obj.get(key, [] if key == "quarantined" else None)
        if not isinstance(ids, list) or not all(isinstance(i, str) and _UUID.match(i) for i in ids):
            raise ProtocolError(f"ack message field {key!r} must be a list of sample ids (lower-case UUIDs)")
        lists.append(ids)
    if len(lists[0]) + len(lists[1]) > MAX_ACK_IDS:
        raise ProtocolError(f"ack message names {len(lists[0]) + len(lists[1])} sample ids, over MAX_ACK_IDS={MAX_ACK_IDS}")
    return lists[0], lists[1]


# ---------------------------------------------------------------------------
# Model updates: a bundle travels as a base64 .tar.gz in one retained message.
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def pack_bundle(bundle_dir: Union[str, os.PathLike]) -> bytes:
    """What a board needs of a bundle directory (manifest.json, signature.json when signed, and the model)
    as ``.tar.gz`` bytes, in one top-level folder, in that order; the same bytes for the same files."""
    root = Path(bundle_dir)
    if not (root / "manifest.json").is_file():
        raise ProtocolError(f"{root} is not a bundle directory (no manifest.json); pass what `edgekit convert -o` wrote")
    try:
        model_file = str(json.loads((root / "manifest.json").read_text(encoding="utf-8"))["model"]["file"])
    except (OSError, ValueError, KeyError, TypeError):
        model_file = "model.tflite"
    if not (root / model_file).is_file():
        raise ProtocolError(f"{root} has no {model_file}; pass the whole bundle directory")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        signature = [root / "signature.json"] if (root / "signature.json").is_file() else []
        for path in (root, root / "manifest.json", *signature, root / model_file):
            info = tar.gettarinfo(str(path), arcname=str(Path(root.name) / path.relative_to(root)))
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if info.isfile():
                with open(path, "rb") as fh:
                    tar.addfile(info, fh)
            elif info.isdir():
                tar.addfile(info)
    return gzip.compress(buf.getvalue(), mtime=0)


def archive_manifest(archive: bytes, max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES) -> Dict[str, Any]:
    """The manifest inside a bundle archive, after checking it as a board would: the archive rules
    (docs/bundle.md), the manifest's limits and its model's sha256 (unpacked into a temporary directory)."""
    import tempfile

    from ..update.archive import remove_tree, unpack
    from ..update.manifest import load_bundle

    tmp = tempfile.mkdtemp(prefix="edgekit-check-")
    try:
        root = unpack(archive, tmp, what="bundle archive", max_total=8 * max_bytes)
        load_bundle(root)
        return limits.loads((root / "manifest.json").read_bytes(), what="manifest.json",
                            max_bytes=limits.MAX_MANIFEST_BYTES, error=ProtocolError)
    except ProtocolError:
        raise
    except (AgentError, OSError) as exc:
        raise ProtocolError(f"{exc}") from exc
    finally:
        remove_tree(tmp)


def bundle_payload(source: Union[bytes, str, os.PathLike], *, max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES,
                   ts: Optional[float] = None, shadow: bool = False) -> Dict[str, Any]:
    """``edgekit.bundle/1`` for a bundle directory, a ``.tar.gz`` file or the archive's bytes.

    ``shadow``: the boards run it beside their current model on the same inputs instead of installing it.

    The archive is refused when it is over ``max_bytes`` or its model does not match its manifest.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        archive = bytes(source)
    else:
        path = Path(source)
        if path.is_dir():
            archive = pack_bundle(path)
        elif path.is_file():
            archive = path.read_bytes()
        else:
            raise ProtocolError(f"bundle {path} does not exist; pass a bundle directory or its .tar.gz")
    if len(archive) > max_bytes:
        raise ProtocolError(f"bundle archive is {len(archive)} bytes, over max_bytes={max_bytes}; "
                            "use a smaller model or raise the limit on both sides ([update].max_bytes)")
    manifest = archive_manifest(archive, max_bytes)
    out = {
        "schema": "edgekit.bundle/1",
        "name": str(manifest.get("name", "")),
        "version": str(manifest.get("version", "")),
        "sha256": str(manifest["model"]["sha256"]),
        "archive_sha256": hashlib.sha256(archive).hexdigest(),
        "size": len(archive),
        "encoding": "base64",
        "archive": base64.b64encode(archive).decode("ascii"),
        "ts": ts if ts is not None else now(),
    }
    if shadow:
        out["shadow"] = True
    return out


def max_bundle_message_bytes(max_bytes: int) -> int:
    """The largest ``bundle`` message for an archive of at most ``max_bytes``: base64 plus the JSON around it."""
    return int(max_bytes) * 4 // 3 + 65536


def parse_bundle(payload: bytes, *, max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES) -> Tuple[Dict[str, Any], bytes]:
    """Check an ``edgekit.bundle/1`` message: its fields (without ``archive``) and the archive's bytes.

    Checks the size limit before decoding and the archive's sha256 after; raises
    :class:`ProtocolError` with one line.
    """
    if len(payload) > max_bundle_message_bytes(max_bytes):
        raise ProtocolError(f"bundle message is {len(payload)} bytes, too big for max_bytes={max_bytes}; "
                            "raise [update].max_bytes if the model really is that big")
    obj = _json_object(payload, "edgekit.bundle/1", "bundle message", max_bundle_message_bytes(max_bytes))
    for key in ("name", "version", "sha256", "archive_sha256", "archive"):
        if not isinstance(obj.get(key), str):
            raise ProtocolError(f"bundle message field {key!r}={obj.get(key)!r} must be a string")
    for key in ("sha256", "archive_sha256"):
        if not _SHA256.match(obj[key]):
            raise ProtocolError(f"bundle message field {key!r}={obj[key][:16]!r} is not a hex sha256")
    size = obj.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ProtocolError(f"bundle message field 'size'={size!r} must be a non-negative integer")
    if size > max_bytes:
        raise ProtocolError(f"bundle archive size={size} is over max_bytes={max_bytes}; "
                            "raise [update].max_bytes if the model really is that big")
    if not isinstance(obj.get("shadow", False), bool):
        raise ProtocolError(f"bundle message field 'shadow'={str(obj.get('shadow'))[:32]!r} must be true or false")
    if obj.get("encoding", "base64") != "base64":
        raise ProtocolError(f"bundle message encoding={obj.get('encoding')!r}, expected 'base64'")
    try:
        archive = base64.b64decode(obj["archive"], validate=True)
    except ValueError as exc:
        raise ProtocolError(f"bundle message archive is not valid base64 ({exc})") from exc
    if len(archive) != size:
        raise ProtocolError(f"bundle archive has {len(archive)} bytes, expected size={size}")
    actual = hashlib.sha256(archive).hexdigest()
    if actual != obj["archive_sha256"]:
        raise ProtocolError(f"bundle archive sha256={actual[:12]}... does not match archive_sha256="
                            f"{obj['archive_sha256'][:12]}...; it was damaged on the way: push it again")
    meta = {k: obj[k] for k in ("schema", "name", "version", "sha256", "archive_sha256", "size", "ts", "shadow")
            if k in obj}  # the known fields only: nothing else of the message travels further
    return meta, archive
