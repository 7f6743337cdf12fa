"""Every prediction as one JSON line, to a file (``--results FILE``) or stdout (``-``).

A flagged prediction's line carries its ``sample_id``, so one input can be
traced from the board to the sample store.

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
from typing import Any, Callable, Dict, Optional, TextIO

from .errors import ConfigError

__all__ = ["ResultsWriter"]

_ENCODE = json.JSONEncoder(separators=(",", ":")).encode  # one encoder: json.dumps(separators=...) builds one per call
_RETRY_S = 5.0
log = logging.getLogger(__name__)


class ResultsWriter:
    """Appends JSON lines; ``path="-"`` writes to stdout, ``path=""`` writes nothing."""

    def __init__(self, path: str = "-", flush_every_s: float = 0.5, on_error: Optional[Callable[[], None]] = None):
        self.path = path
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
        try:
            self._fh.write(_ENCODE(line) + "\n")
            now = time.monotonic()
            if now - self._last_flush >= self.flush_every_s:
                self._fh.flush()
                self._last_flush = now
        except (OSError, ValueError) as exc:
            self._broken(exc)

    def tick(self) -> None:
        """Flush if a line has waited ``flush_every_s`` (called while the loop idles, too)."""
        if self._fh is not None and time.monotonic() - self._last_flush >= self.flush_every_s:
            self.flush()
            self._last_flush = time.monotonic()

    def flush(self) -> None:
        if self._fh is not None:
            try:
                self._fh.flush()
            except (OSError, ValueError) as exc:
                self._broken(exc)

    def _broken(self, exc: BaseException) -> None:
        """A failed write: this line is lost (and what the buffer held); try again in a few seconds."""
        self.lost += 1
        if self._on_error is not None:
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
