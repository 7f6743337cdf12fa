"""Every prediction as one JSON line, to a file (``--results FILE``) or stdout (``-``).

A flagged prediction's line carries its ``sample_id``, so one input can be
traced from the board to the sample store.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, TextIO

from .errors import ConfigError

__all__ = ["ResultsWriter"]

_ENCODE = json.JSONEncoder(separators=(",", ":")).encode  # one encoder: json.dumps(separators=...) builds one per call


class ResultsWriter:
    """Appends JSON lines; ``path="-"`` writes to stdout, ``path=""`` writes nothing."""

    def __init__(self, path: str = "-", flush_every_s: float = 0.5):
        self.path = path
        self.flush_every_s = flush_every_s
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
            return
        self._fh.write(_ENCODE(line) + "\n")
        now = time.monotonic()
        if now - self._last_flush >= self.flush_every_s:
            self._fh.flush()
            self._last_flush = now

    def tick(self) -> None:
        """Flush if a line has waited ``flush_every_s`` (called while the loop idles, too)."""
        if self._fh is not None and time.monotonic() - self._last_flush >= self.flush_every_s:
            self._fh.flush()
            self._last_flush = time.monotonic()

    def flush(self) -> None:
        if self._fh is not None:
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            if self._own:
                self._fh.close()
            self._fh = None

    def __enter__(self) -> "ResultsWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
