"""Every prediction as one JSON line, to a file (``--results FILE``) or stdout (``-``).

A flagged prediction's line carries its ``sample_id``, so one input can be
traced from the board to the sample store.

Lines are encoded as they come and written in blocks, at most ``flush_every_s`` apart (the first
line of a run at once; and at :meth:`ResultsWriter.flush` / :meth:`~ResultsWriter.close`);
``before_flush`` runs first, so the agent commits the flagged samples a block names before the block
reaches the file. A ``kill -9`` loses the lines of the block being gathered (up to ``flush_every_s``
of them), never leaves a line on disk whose sample is not in the outbox.

A write that fails (a full disk, a closed pipe) never stops the agent: what the failed block had
written is cut off again (the file keeps whole lines only), the file is closed, the block's lines are
counted as lost (``on_error``) and dropped, and the file is opened again a few seconds later.

Result lines never take the last ``keep_free`` bytes of their disk (``[results].keep_free_bytes``):
a block that would is dropped and counted the same way. On a board the outbox usually shares that disk,
and its samples (the data the learning loop is for) and its write-ahead log need the room more than a
log of predictions does: a results file left to grow filled a 2 MiB disk that the outbox had just
drained, and the outbox had to drop samples again (tests/device_agent/test_full_disk.py).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from .errors import ConfigError

__all__ = ["ResultsWriter"]

_ENCODER = json.JSONEncoder(separators=(",", ":"))
try:  # the C encoder json.JSONEncoder.encode builds anew on every call, built once (no cycle check: flat lines)
    from json.encoder import c_make_encoder as _c_make_encoder
    from json.encoder import encode_basestring_ascii as _ascii

    _C = _c_make_encoder(None, _ENCODER.default, _ascii, None, ":", ",", False, False, True) \
        if _c_make_encoder is not None else None
except ImportError:  # pragma: no cover - a Python without the C accelerator
    _C = None


def _encode(line: Dict[str, Any]) -> str:
    return "".join(_C(line, 0)) if _C is not None else _ENCODER.encode(line)

_RETRY_S = 5.0
log = logging.getLogger(__name__)


class ResultsWriter:
    """Appends JSON lines; ``path="-"`` writes to stdout, ``path=""`` writes nothing."""

    def __init__(self, path: str = "-", flush_every_s: float = 0.5, on_error: Optional[Callable[[], None]] = None,
                 before_flush: Optional[Callable[[], None]] = None, keep_free: int = 0):
        self.path = path
        self.keep_free = int(keep_free)
        self._short = False  # blocks are being dropped for want of room (logged once per episode)
        self._before_flush = before_flush
        self._block: List[str] = []  # encoded lines not yet handed to the file
        self._started = False
        self.flush_every_s = flush_every_s
        self.lost = 0  # lines not written because the file could not be written
        self._on_error = on_error
        self._retry_at = 0.0
        self._last_flush = time.monotonic()
        self._fh: Optional[Any] = None  # sys.stdout (text), or our own file (binary, unbuffered: whole lines only)
        self._own = False
        if path == "-":
            self._fh = sys.stdout
        elif path:
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                self._fh = open(path, "ab", buffering=0)
                self._own = True
            except OSError as exc:
                raise ConfigError(f"config [results].path={path!r} cannot be written ({exc}); use a writable path or '-'") from exc

    def write(self, line: Dict[str, Any]) -> None:
        if self._fh is None:
            if not self._retry_at or not self._reopen():
                return
        self._block.append(_encode(line) + "\n")
        if not self._started:  # the first line goes out at the next tick: whoever watches sees the agent work
            self._started = True
            self._last_flush = 0.0

    def tick(self) -> None:
        """Write the block if its oldest line has waited ``flush_every_s`` (called while the loop idles, too)."""
        if time.monotonic() - self._last_flush >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if self._fh is None:
            return
        if self._block and self._before_flush is not None:
            self._before_flush()
        block, self._block = self._block, []
        if not self._own:
            try:
                if block:
                    self._fh.write("".join(block))
                self._fh.flush()
            except (OSError, ValueError) as exc:
                self._broken(exc, max(1, len(block)))
            return
        if not block:
            return
        data = "".join(block).encode("utf-8")
        fd = self._fh.fileno()
        size = -1
        try:
            st = os.fstat(fd)
            size = st.st_size
            if self.keep_free and hasattr(os, "fstatvfs"):
                vfs = os.fstatvfs(fd)
                if vfs.f_bavail * vfs.f_frsize - len(data) < self.keep_free:
                    self._no_room(len(block))
                    return
            view = memoryview(data)
            while view:  # a write may be short on a filling disk; the next one then says why
                view = view[self._fh.write(view):]
        except (OSError, ValueError) as exc:
            if size >= 0:
                try:  # the lines of this block the disk took: cut off again, so the file holds whole lines only
                    os.ftruncate(fd, size)
                except OSError:
                    pass
            self._broken(exc, len(block))
            return
        if self._short:
            self._short = False
            log.info("results %s are written again: its disk has more than [results].keep_free_bytes=%d free "
                     "(%d lines were lost)", self.path, self.keep_free, self.lost)

    def _no_room(self, lines: int) -> None:
        """Fewer than ``keep_free`` bytes would be left: the block is dropped and counted, the file stays open."""
        self.lost += lines
        if self._on_error is not None:
            for _ in range(lines):
                self._on_error()
        if not self._short:
            self._short = True
            log.warning("results %s: its disk would have less than [results].keep_free_bytes=%d free; result lines "
                        "are dropped and counted in errors.results until there is room (the outbox's samples keep "
                        "it)", self.path, self.keep_free)

    def _broken(self, exc: BaseException, lines: int = 1) -> None:
        """A failed write: these lines are lost; try again in a few seconds."""
        self.lost += lines
        if self._on_error is not None:
            for _ in range(lines):
                self._on_error()
        if self._retry_at == 0.0 or self.lost == 1:
            log.warning("results %s cannot be written (%s: %s); lines are dropped and counted in errors.results "
                        "until it can", self.path, exc.__class__.__name__, exc)
        fh, self._fh = self._fh, None
        if self._own and fh is not None:
            try:
                fh.close()
            except (OSError, ValueError):
                pass  # the fd is closed even when the final flush fails
        self._retry_at = time.monotonic() + _RETRY_S

    def _reopen(self) -> bool:
        if time.monotonic() < self._retry_at:
            self.lost += 1
            if self._on_error is not None:
                self._on_error()
            return False
        try:
            self._fh = open(self.path, "ab", buffering=0) if self._own else sys.stdout
        except OSError as exc:
            self._broken(exc)
            return False
        log.info("results %s are written again (%d lines were lost)", self.path, self.lost)
        self._retry_at = 0.0
        return True

    def close(self) -> None:
        if self._fh is not None:
            self.flush()
        if self._fh is not None and self._own:
            try:
                self._fh.close()
            except (OSError, ValueError):
                pass
        self._fh = None
        self._retry_at = 0.0

    def __enter__(self) -> "ResultsWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
