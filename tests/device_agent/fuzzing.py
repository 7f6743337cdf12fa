"""Hypothesis strategies for what comes off the network (used by test_fuzz.py); only the parsers' public
modules are imported here, so the same strategies can be pointed at another version of device_agent."""

from __future__ import annotations

import json
import tarfile

from hypothesis import strategies as st

from device_agent.delivery import protocol
from device_agent.update.manifest import load_bundle

import craft
from conftest import BUNDLE

# JSON values, nested up to ~40 levels at times (the limit is 32).
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                     st.dictionaries(st.text(max_size=8), inner, max_size=5)),
                    max_leaves=60)


def nested(depth: int, leaf=1):
    value = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


def dumps(value) -> bytes:
    try:
        return json.dumps(value).encode()
    except (ValueError, RecursionError):
        return b"{}"


CMD_VALUES = st.one_of(
    st.binary(max_size=300),
    JSON.map(dumps),
    st.fixed_dictionaries({"schema": st.just("edgekit.cmd/1"), "cmd": st.sampled_from(protocol.COMMANDS + ("x",)),
                           "args": JSON, "id": JSON}).map(dumps),
    st.integers(min_value=0, max_value=3000).map(lambda d: dumps({"schema": "edgekit.cmd/1", "cmd": "ping",
                                                                  "args": nested(d)})),
    st.integers(min_value=0, max_value=3000).map(lambda d: b"[" * d + b"]" * d),
)


def npy(header: dict, data: bytes) -> bytes:
    text = repr(header).encode()
    text += b" " * (63 - (10 + len(text)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + data


DESCR = st.sampled_from(["<f4", "<f8", "|u1", "|i1", "<i8", "|O", "|b1", "<c8", "<U3", "|V8", "[('a','<f4')]",
                         "<f2", ">f4"])
SHAPE = st.lists(st.integers(min_value=-2, max_value=10 ** 9), max_size=9).map(tuple)
SENSOR_VALUES = st.one_of(
    st.binary(max_size=400),
    st.builds(lambda d, s, f, data: npy({"descr": d, "fortran_order": f, "shape": s}, data), DESCR, SHAPE,
              st.booleans(), st.binary(max_size=300)),
    st.builds(lambda s, data: npy({"descr": "|u1", "fortran_order": False, "shape": s}, data),
              SHAPE, st.binary(max_size=300)),
    st.binary(max_size=200).map(lambda junk: b"\x93NUMPY\x01\x00" + junk),
    JSON.map(lambda v: dumps({"values": v})),
    JSON.map(dumps),
    st.integers(min_value=0, max_value=3000).map(lambda d: dumps({"values": nested(d, 1.0)})),
    st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=60, max_size=70).map(
        lambda v: dumps({"values": v})),
)
DIGITS = load_bundle(BUNDLE).manifest.preprocessing

GOOD_ARCHIVE = protocol.pack_bundle(craft.V2)
GOOD = protocol.bundle_payload(GOOD_ARCHIVE)


def wrap(archive: bytes) -> bytes:
    return craft.message(archive)


def mutate(data: bytes, edits) -> bytes:
    out = bytearray(data)
    for pos, value in edits:
        out[pos % len(out)] = value
    return bytes(out)


NAMES = st.one_of(st.sampled_from(["digits-x", "digits-x/manifest.json", "digits-x/model.tflite", "digits-x/signature.json",
                                   "digits-x/a", "digits-x/a/b", "../x", "/etc/x", "digits-x/../x", "digits-x/.hidden",
                                   "digits-x/model.tflite/", "./digits-x/manifest.json", "", "digits-y/manifest.json"]),
                  st.text(max_size=30))
KINDS = st.sampled_from([tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
                         tarfile.FIFOTYPE, tarfile.CHRTYPE, tarfile.CONTTYPE])
MEMBERS = st.lists(st.tuples(NAMES, KINDS, st.binary(max_size=64), st.text(max_size=10)), max_size=8)


def archive_of(members) -> bytes:
    entries = []
    for name, kind, data, link in members:
        try:
            entries.append(craft.entry(name, data, kind=kind, link=link))
        except (ValueError, UnicodeError):
            continue
    try:
        return craft.tar_gz(entries, level=1)
    except (ValueError, UnicodeError, tarfile.TarError):
        return craft.tar_gz([], level=1)


EDITS = st.lists(st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255)), min_size=1, max_size=8)
BUNDLE_VALUES = st.one_of(
    st.binary(max_size=300),
    JSON.map(dumps),
    EDITS.map(lambda e: wrap(mutate(GOOD_ARCHIVE, e))),
    EDITS.map(lambda e: mutate(json.dumps(GOOD).encode(), e)),
    MEMBERS.map(lambda m: wrap(archive_of(m))),
    st.fixed_dictionaries({k: st.one_of(st.just(v), JSON) for k, v in GOOD.items()}).map(dumps),
    JSON.map(lambda v: dumps({**GOOD, "shadow": v})),  # a shadow run asked for in any shape
)

# EXIF blocks: the TIFF structure Pillow parses for the orientation tag, with hostile counts, offsets, types and
# values, or plain junk after the "Exif" marker.
EXIF_BLOCKS = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda order, count, tag, typ, n, value, junk: craft.exif_block(order, count, tag, typ, n, value, junk),
              st.sampled_from([b"II", b"MM", b"XX"]), st.integers(0, 0xFFFF), st.sampled_from([0x0112, 0x8769, 0x0000]),
              st.one_of(st.just(3), st.integers(0, 20)), st.integers(0, 2 ** 32 - 1), st.integers(0, 2 ** 32 - 1), st.binary(max_size=64)),
)

MANIFEST = json.loads(craft.manifest_bytes())


def paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value[:3]):
            yield from paths(v, prefix + (i,))


PATHS = list(paths(MANIFEST))[1:]
MANIFEST_EDITS = st.lists(st.tuples(st.sampled_from(PATHS), JSON, st.booleans()), min_size=1, max_size=4)


def edited(edits) -> dict:
    """MANIFEST with each (path, value, delete) applied where the path still exists."""
    obj = json.loads(json.dumps(MANIFEST))
    for where, value, delete in edits:
        target = obj
        try:
            for k in where[:-1]:
                target = target[k]
            if delete and isinstance(target, dict):
                target.pop(where[-1], None)
            else:
                target[where[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue
    return obj
