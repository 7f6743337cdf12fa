"""Every prediction as one JSON line, to a file (``--results FILE``) or stdout (``-``).

A flagged prediction's line carries its ``sample_id``, so one input can be
traced from the board to the sample store.

Lines are encoded as they come and written in blocks, at most ``flush_every_s`` apart (the first
line of a run at once; and at :meth:`ResultsWriter.flush` / :meth:`~ResultsWriter.close`);
``before_flush`` runs first, so the agent commits the flagged samples a block names before the block
reaches the file. A ``kill -9`` loses the lines of the block being gathered (up to ``flush_every_s``
of them), never leaves a line on disk whose sample is not in the outbox.

A write that fails (a full disk, a closed pipe) never stops the agent: the file is
closed, lines are counted as lost (``on_error``) and dropped, and the file is opened
again a few seconds later.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, TextIO

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
                 before_flush: Optional[Callable[[], None]] = None):
        self.path = path
        self._before_flush = before_flush
        self._block: List[str] = []  # encoded lines not yet handed to the file
        self._started = False
        self.flush_every_s = flush_every_s
        self.lost = 0  # lines not written because the file could not be written
        self._on_error = on_error
        self._retry_at = 0.0
        self._last_flush = time.monotonic()
        self._fh: Optional[TextIO] = None
        self._own = False
        if path == "-":
            self._fh = sys.stdout
        elif path:
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                self._fh = open(path, "a", encoding="utf-8")
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
        try:
            if block:
                self._fh.write("".join(block))
            self._fh.flush()
        except (OSError, ValueError) as exc:
            self._broken(exc, max(1, len(block)))

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
            self._fh = open(self.path, "a", encoding="utf-8") if self._own else sys.stdout
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
