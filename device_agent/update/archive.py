"""Unpacking a bundle archive (``.tar.gz``) as a stream, every member checked before a byte of it is written.

A bundle archive holds one top-level folder (the bundle's name) with, as plain names inside it:
``manifest.json``, the model file the manifest names, and optionally ``signature.json``;
nothing else (docs/bundle.md, "The .tar.gz"). :func:`unpack` reads the gzip stream once:

* at most :data:`MAX_MEMBERS` members: a tree of 150,000 files or 2,000 folders stops at the fifth;
* each member's name, type and size are checked from its header before its data is read: only
  regular files and the one folder, no links, devices, sparse files, absolute or ``..`` paths or
  anything deeper than ``<folder>/<plain name>``; ``manifest.json`` <= 1 MiB, ``signature.json``
  <= 64 KiB, every file and their sum <= ``max_total``;
* the decompressed stream itself is capped (a gzip bomb, or a PAX header that inflates to
  gigabytes, stops at the cap);
* files are written by this code (mode 0644) into ``into/<folder>/``, never by ``tarfile.extract``.

Any refusal is a :class:`~device_agent.errors.BundleError` with one line.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import shutil
import tarfile
import zlib
from pathlib import Path
from typing import BinaryIO, Dict, Optional, Union

from ..errors import BundleError
from ..limits import MAX_MANIFEST_BYTES, MAX_SIGNATURE_BYTES

__all__ = ["MAX_MEMBERS", "SIGNATURE_NAME", "PLAIN_NAME", "check", "unpack", "remove_tree"]

MAX_MEMBERS = 4  # the folder, manifest.json, the model, signature.json
SIGNATURE_NAME = "signature.json"
#: A file or folder name in a bundle: no path separators, no leading dot, at most 128 characters.
PLAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_HEADROOM = 1 << 20  # tar headers and padding on top of the members' bytes
_MAX_EXTENDED = 64 * 1024
_EXTENDED = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
             tarfile.GNUTYPE_LONGLINK)
_CHUNK = 1 << 16


class _Header(tarfile.TarInfo):
    """A tar header whose extended headers (PAX, GNU long names) are refused above 64 KiB before tarfile
    reads them into memory (``tarfile`` reads an extended header whole)."""

    def _proc_member(self, tar):  # tarfile's hook for every header it reads
        if self.type in _EXTENDED and self.size > _MAX_EXTENDED:
            raise BundleError(f"bundle archive holds a {self.size}-byte extended header, over the limit of "
                              f"{_MAX_EXTENDED}")
        return super()._proc_member(tar)


class _Capped(io.RawIOBase):
    """A reader that refuses to deliver more than ``cap`` bytes of ``raw`` (the decompressed stream)."""

    def __init__(self, raw: BinaryIO, cap: int, what: str):
        self.raw, self.cap, self.what, self.done = raw, cap, what, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        want = len(b)
        if self.done + want > self.cap:
            want = self.cap - self.done + 1  # one byte past the cap proves the stream is longer
            if want <= 0:
                raise BundleError(f"{self.what} unpacks to more than {self.cap} bytes")
        data = self.raw.read(want)
        if self.done + len(data) > self.cap:
            raise BundleError(f"{self.what} unpacks to more than {self.cap} bytes")
        b[:len(data)] = data
        self.done += len(data)
        return len(data)


def _limit(name: str, max_total: int) -> int:
    return {"manifest.json": MAX_MANIFEST_BYTES, SIGNATURE_NAME: MAX_SIGNATURE_BYTES}.get(name, max_total)


def check(source: Union[bytes, BinaryIO], *, what: str, max_total: int) -> None:
    """The same rules as :func:`unpack`, on the stream, writing nothing (before anything else reads the archive)."""
    _walk(source, None, what=what, max_total=max_total)


def unpack(source: Union[bytes, BinaryIO], into: Union[str, os.PathLike], *, what: str, max_total: int) -> Path:
    """Unpack the archive ``source`` (bytes or a binary file) into ``into``; the bundle folder's path.

    ``into`` must exist and be empty (a fresh staging directory): on any refusal the caller
    removes it. The model file's name is checked against the manifest by
    :func:`~device_agent.update.manifest.load_bundle` afterwards (the manifest names it).
    """
    return _walk(source, Path(into), what=what, max_total=max_total)


def _walk(source: Union[bytes, BinaryIO], into: Optional[Path], *, what: str, max_total: int) -> Optional[Path]:
    raw = gzip.GzipFile(fileobj=io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
    stream = io.BufferedReader(_Capped(raw, max_total + _HEADROOM, what), _CHUNK)
    root: Optional[str] = None
    files: Dict[str, int] = {}
    total = 0
    try:
        with tarfile.open(fileobj=stream, mode="r|", tarinfo=_Header) as tar:
            for count, member in enumerate(tar, start=1):
                if count > MAX_MEMBERS:
                    raise BundleError(f"{what} holds more than {MAX_MEMBERS} members; a bundle archive holds one "
                                      "folder with manifest.json, the model and optionally signature.json")
                parts = member.name.split("/")
                if parts and parts[-1] == "" and member.isdir():
                    parts = parts[:-1]  # "digits-v1/"
                if not parts or member.name.startswith("/") or any(not PLAIN_NAME.match(p) for p in parts):
                    raise BundleError(f"{what} holds an unsafe path {member.name[:200]!r}; a bundle archive holds "
                                      "one folder of plain names (`tar -czf b.tar.gz <bundle folder>`)")
                if len(parts) > 2 or (root is not None and parts[0] != root):
                    raise BundleError(f"{what} holds {member.name[:200]!r}: a bundle archive holds one folder with "
                                      "plain file names directly inside it")
                root = parts[0]
                if member.isdir():
                    if len(parts) != 1:
                        raise BundleError(f"{what} holds a folder {member.name[:200]!r} inside the bundle folder")
                    continue
                if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
                    raise BundleError(f"{what} holds a link, device or special file {member.name[:200]!r}")
                if len(parts) != 2:
                    raise BundleError(f"{what} holds a file {member.name[:200]!r} outside a bundle folder")
                name = parts[1]
                others = [f for f in files if f not in ("manifest.json", SIGNATURE_NAME)]
                if name in files or (name not in ("manifest.json", SIGNATURE_NAME) and others):
                    raise BundleError(f"{what} holds {name!r} besides {sorted(files)}; a bundle archive holds "
                                      "manifest.json, one model file and optionally signature.json")
                if member.size > _limit(name, max_total) or total + member.size > max_total:
                    raise BundleError(f"{what} member {name!r} is {member.size} bytes, over the limit of "
                                      f"{min(_limit(name, max_total), max_total - total)}")
                total += member.size
                if into is not None:
                    folder = into / root
                    folder.mkdir(mode=0o755, exist_ok=True)
                    with open(folder / name, "xb") as out:
                        shutil.copyfileobj(tar.extractfile(member), out, _CHUNK)
                        copied = out.tell()
                    if copied != member.size:
                        raise BundleError(f"{what} is cut short inside {name!r}; copy or push it again")
                    os.chmod(folder / name, 0o644)
                files[name] = member.size
    except BundleError:
        raise
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, UnicodeError, ValueError) as exc:
        raise BundleError(f"{what} is corrupt ({exc.__class__.__name__}: {exc}); copy or push it again") from exc
    except OSError as exc:
        if exc.errno:  # the disk, not the archive
            raise
        raise BundleError(f"{what} is corrupt ({exc.__class__.__name__}: {exc}); copy or push it again") from exc
    if root is None or "manifest.json" not in files:
        raise BundleError(f"{what} holds no <folder>/manifest.json; pack the bundle directory with "
                          "`edgekit fleet push` (or edgekit.convert.bundle.pack)")
    if into is None:
        return None
    (into / root).mkdir(mode=0o755, exist_ok=True)
    return into / root


def remove_tree(path: Union[str, os.PathLike]) -> bool:
    """Remove a directory tree, however deep; never raises. True when it is gone.

    ``shutil.rmtree`` recurses in Python and raises RecursionError (not an OSError its
    ``ignore_errors`` covers) on a tree a few thousand levels deep; ``rm -rf`` does not.
    """
    path = Path(path)
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        return True
    except (OSError, RecursionError, MemoryError):
        rm = shutil.which("rm")
        if rm:
            import subprocess

            try:
                subprocess.run([rm, "-rf", "--", str(path)], capture_output=True, timeout=600)
            except (OSError, subprocess.SubprocessError):
                pass
    return not os.path.lexists(path)
