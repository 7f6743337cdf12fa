"""Hostile inputs built the way an attacker who can publish on the broker would build them.

Archives are written with :mod:`tarfile` member by member (links, ``..``, deep trees, huge declared
sizes); bundle messages are wrapped without the host's checks (``protocol.bundle_payload`` refuses
what a board refuses, so it cannot make them).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import shutil
import tarfile
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Tuple

from device_agent.delivery import protocol

from conftest import DATA

V2 = DATA / "digits-bundle-v2"


class Zeros(io.RawIOBase):
    """``n`` bytes of ``fill`` without holding them in memory (tarfile reads members in chunks)."""

    def __init__(self, n: int, fill: bytes = b" "):
        self.left, self.fill = n, fill

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        k = min(len(b), self.left)
        b[:k] = self.fill * k
        self.left -= k
        return k


def entry(name: str, data: Optional[bytes] = None, *, kind: bytes = tarfile.REGTYPE, size: Optional[int] = None,
          stream: Optional[io.RawIOBase] = None, link: str = "") -> Tuple[tarfile.TarInfo, Optional[io.IOBase]]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.linkname = link
    if kind in (tarfile.REGTYPE, tarfile.AREGTYPE):
        info.size = len(data) if data is not None else int(size or 0)
        return info, io.BytesIO(data) if data is not None else io.BufferedReader(stream or Zeros(info.size))
    return info, None


def tar_gz(entries: Iterable[Tuple[tarfile.TarInfo, Optional[io.IOBase]]], level: int = 6) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, fh in entries:
            tar.addfile(info, fh)
    return gzip.compress(raw.getvalue(), compresslevel=level, mtime=0)


def message(archive: bytes, *, name: str = "digits", version: str = "x", sha256: Optional[str] = None) -> bytes:
    """An ``edgekit.bundle/1`` message around ``archive``, as anyone with a publish right can send it."""
    payload = {
        "schema": "edgekit.bundle/1",
        "name": name,
        "version": version,
        "sha256": sha256 or hashlib.sha256((V2 / "model.tflite").read_bytes()).hexdigest(),
        "archive_sha256": hashlib.sha256(archive).hexdigest(),
        "size": len(archive),
        "encoding": "base64",
        "archive": base64.b64encode(archive).decode("ascii"),
        "ts": time.time(),
    }
    return json.dumps(payload).encode()


def edited_bundle(tmp_path: Path, change: Callable[[dict], None], name: str = "edited",
                  source: Path = V2) -> Path:
    """A copy of ``source`` whose manifest ``change`` edits (the model and its sha256 stay)."""
    out = tmp_path / name
    shutil.copytree(source, out)
    manifest = json.loads((out / "manifest.json").read_text())
    change(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))  # NaN is written as NaN, as json.dumps does
    return out


def packed(bundle_dir: Path) -> bytes:
    """The bundle packed exactly as ``edgekit fleet push`` packs it (no checks)."""
    return protocol.pack_bundle(bundle_dir)


def model_bytes() -> bytes:
    return (V2 / "model.tflite").read_bytes()


def manifest_bytes() -> bytes:
    return (V2 / "manifest.json").read_bytes()


def exif_block(order: bytes, count: int, tag: int, typ: int, n: int, value: int, junk: bytes) -> bytes:
    """A TIFF structure as an EXIF block holds it: header, an IFD that declares ``count`` entries and holds one
    (``tag``, ``typ``, ``n`` values, ``value``), then ``junk``. Any field may lie."""
    import struct

    e = "<" if order == b"II" else ">"
    if typ == 3 and n == 1 and order == b"MM" and value < 0x10000:  # a SHORT sits in the field's first two bytes
        value <<= 16
    header = order + struct.pack(e + "HI", 42, 8)
    ifd = struct.pack(e + "H", count) + struct.pack(e + "HHII", tag, typ, n, value) + struct.pack(e + "I", 0)
    return header + ifd + junk


def jpeg_with_exif(block: bytes, size: Tuple[int, int] = (10, 6)) -> bytes:
    """A small JPEG (``size`` = width, height) whose APP1 segment carries ``block`` after the "Exif" marker."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", size, (200, 30, 90)).save(out, "JPEG")
    jpeg = out.getvalue()
    app1 = b"Exif\x00\x00" + block[:65000]
    return jpeg[:2] + b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1 + jpeg[2:]
