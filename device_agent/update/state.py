"""The installed-bundle state: what runs at start-up, what last ran well, what was tried and what was refused.

Boot counting as RAUC (``BOOT_x_LEFT``), greenboot (``GREENBOOT_MAX_BOOTS``) and U-Boot's
``bootcount`` do it, for bundles instead of root filesystems: a new bundle is *uncommitted* until it
has proved itself (``[update].commit_after`` inferences); every time the agent brings an uncommitted
bundle up (opens it in its own process, or starts on it) the attempt is counted and written to disk
*before* the interpreter opens the model. A bundle that crashed or hung the agent
``[update].max_attempts`` times without committing is refused for good, and the agent starts on
the last bundle that ran well (``last_good``), else on the configured one, and says so.

``<state dir>/current_bundle-<device>.json`` (written atomically and fsync'd)::

    {"format": "edgekit-update-state/1",
     "current":   {"path", "name", "version", "sha256", "archive_sha256", "installed", "committed", "attempts"},
     "last_good": {...} | null,      # the newest committed bundle before "current": the fallback
     "pending":   {...} | null,      # being opened by the updater right now (a crash there counts too)
     "refused":   [{"archive_sha256", "name", "version", "reason", "ts"}, ...]}   # at most 32, newest last

A retained bundle message whose archive sha256 is in ``refused`` is refused again at once, without
unpacking it: no retained message can put a board in a restart loop.

Probation (:mod:`.probation`: errors or latency past limits after a swap) decides *when*
:meth:`UpdateState.commit` happens, and a failed probation is :meth:`UpdateState.revert`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

__all__ = ["FORMAT", "MAX_REFUSED", "Slot", "Refused", "UpdateState", "StateFile"]

log = logging.getLogger(__name__)

FORMAT = "edgekit-update-state/1"
MAX_REFUSED = 32


@dataclass(frozen=True)
class Slot:
    """One installed bundle."""

    path: str
    name: str
    version: str
    sha256: str  # the model's
    archive_sha256: str = ""  # the archive it was unpacked from ("" for bundles from before this field)
    installed: float = 0.0
    committed: bool = False
    attempts: int = 0

    @property
    def label(self) -> str:
        return f"{self.name} v{self.version} (archive {self.archive_sha256[:12] or '?'}...)"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Slot":
        return cls(path=str(data["path"]), name=str(data["name"]), version=str(data["version"]),
                   sha256=str(data["sha256"]), archive_sha256=str(data.get("archive_sha256", "")),
                   installed=float(data.get("installed", 0.0)), committed=bool(data.get("committed", False)),
                   attempts=int(data.get("attempts", 0)))


@dataclass(frozen=True)
class Refused:
    """An archive that will not be staged again (its bytes are what was refused)."""

    archive_sha256: str
    name: str
    version: str
    reason: str
    ts: float = 0.0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Refused":
        return cls(archive_sha256=str(data["archive_sha256"]), name=str(data.get("name", "")),
                   version=str(data.get("version", "")), reason=str(data.get("reason", ""))[:500],
                   ts=float(data.get("ts", 0.0)))


@dataclass(frozen=True)
class UpdateState:
    """An immutable snapshot; every transition returns a new one (:class:`StateFile` saves it)."""

    current: Optional[Slot] = None
    last_good: Optional[Slot] = None
    pending: Optional[Slot] = None
    refused: Tuple[Refused, ...] = field(default_factory=tuple)

    # -- questions ----------------------------------------------------------
    def refusal(self, archive_sha256: str) -> Optional[Refused]:
        return next((r for r in self.refused if r.archive_sha256 == archive_sha256), None)

    # -- transitions --------------------------------------------------------
    def boot(self, max_attempts: int) -> Tuple["UpdateState", Optional[str]]:
        """At start-up: count one more attempt of an uncommitted ``current``, or give up on it.

        Returns the new state and, when it fell back, the one line that says so.
        """
        cur = self.current
        if cur is None or cur.committed:
            return self, None
        if cur.attempts < max_attempts:
            return replace(self, current=replace(cur, attempts=cur.attempts + 1)), None
        reason = (f"it crashed, hung or was killed {cur.attempts} times before it ran well (see the log of the earlier "
                  "runs)")
        back = self.refuse(cur.archive_sha256, cur.name, cur.version, reason) if cur.archive_sha256 else self
        notice = (f"bundle {cur.label} refused: {reason}; falling back to "
                  + (f"{self.last_good.label}, the last bundle that ran well" if self.last_good is not None
                     else "the configured bundle"))
        return replace(back, current=self.last_good, last_good=None), notice

    def fall_back(self, why: str) -> Tuple["UpdateState", str]:
        """``current`` cannot be used (it no longer loads): the last good one, else the configured bundle."""
        cur = self.current
        target = self.last_good if self.last_good is not None and self.last_good != cur else None
        notice = (f"installed bundle {cur.label if cur else '?'} cannot be used ({why}); starting on "
                  + (f"{target.label}, the last bundle that ran well" if target else "the configured bundle"))
        return replace(self, current=target, last_good=None if target else self.last_good), notice

    def trying(self, slot: Slot) -> "UpdateState":
        """The updater is about to open ``slot`` in the agent's process: one more attempt of it."""
        before = self.pending.attempts if self.pending and self.pending.archive_sha256 == slot.archive_sha256 else 0
        return replace(self, pending=replace(slot, committed=False, attempts=before + 1))

    def done_trying(self) -> "UpdateState":
        return replace(self, pending=None) if self.pending is not None else self

    def install(self, slot: Slot) -> "UpdateState":
        """``slot`` was swapped in: it is ``current`` (uncommitted, its attempts so far carried over)."""
        tried = self.pending.attempts if self.pending and self.pending.archive_sha256 == slot.archive_sha256 else 1
        old = self.current
        last_good = old if old is not None and old.committed and old.archive_sha256 != slot.archive_sha256 \
            else self.last_good
        if last_good is not None and last_good.archive_sha256 == slot.archive_sha256:
            last_good = None
        return replace(self, current=replace(slot, committed=False, attempts=max(1, tried)), last_good=last_good,
                       pending=None)

    def commit(self) -> "UpdateState":
        """``current`` ran well: it stays, and becomes the fallback for the next update."""
        if self.current is None or self.current.committed:
            return self
        return replace(self, current=replace(self.current, committed=True, attempts=0))

    def revert(self, reason: str) -> Tuple["UpdateState", Optional[Slot]]:
        """Give up on an uncommitted ``current`` while running (probation failed): it is refused, and the
        last good bundle (None: the configured one) is what should run."""
        cur = self.current
        back = self.refuse(cur.archive_sha256, cur.name, cur.version, reason) if cur and cur.archive_sha256 else self
        return replace(back, current=self.last_good, last_good=None), self.last_good

    def stopped(self) -> "UpdateState":
        """A clean stop: the running bundle did not crash this run, so this start is not held against it."""
        cur = self.current
        state = self.done_trying()
        if cur is not None and not cur.committed and cur.attempts > 0:
            state = replace(state, current=replace(cur, attempts=cur.attempts - 1))
        return state

    def refuse(self, archive_sha256: str, name: str, version: str, reason: str) -> "UpdateState":
        kept = tuple(r for r in self.refused if r.archive_sha256 != archive_sha256)
        entry = Refused(archive_sha256, str(name)[:256], str(version)[:256], str(reason)[:500], round(time.time(), 3))
        pending = None if self.pending and self.pending.archive_sha256 == archive_sha256 else self.pending
        return replace(self, refused=(kept + (entry,))[-MAX_REFUSED:], pending=pending)

    def reset(self) -> "UpdateState":
        """``--reset-bundle``: run the configured bundle; what was refused stays refused."""
        return UpdateState(refused=self.refused)

    # -- file format --------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return {
            "format": FORMAT,
            "current": asdict(self.current) if self.current else None,
            "last_good": asdict(self.last_good) if self.last_good else None,
            "pending": asdict(self.pending) if self.pending else None,
            "refused": [asdict(r) for r in self.refused],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "UpdateState":
        if data.get("format") != FORMAT:
            if "path" in data and "sha256" in data:  # the single pointer of earlier agents: it ran, so it is good
                slot = Slot.from_dict({**data, "installed": data.get("installed", 0.0) or 0.0})
                return cls(current=replace(slot, committed=True))
            raise ValueError(f"format={data.get('format')!r}, expected {FORMAT!r}")

        def slot(key: str) -> Optional[Slot]:
            return Slot.from_dict(data[key]) if data.get(key) else None

        refused = tuple(Refused.from_dict(r) for r in (data.get("refused") or [])[-MAX_REFUSED:])
        return cls(current=slot("current"), last_good=slot("last_good"), pending=slot("pending"), refused=refused)


class StateFile:
    """Load, change and save an :class:`UpdateState` (atomically: a crash leaves the old or the new file)."""

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = Path(path)
        self._lock = threading.RLock()
        self._state: Optional[UpdateState] = None

    @property
    def state(self) -> UpdateState:
        with self._lock:
            if self._state is None:
                self._state = self._load()
            return self._state

    def _load(self) -> UpdateState:
        try:
            with open(self.path, "rb") as fh:
                data = json.loads(fh.read(1 << 20).decode("utf-8"))
            return UpdateState.from_dict(data)
        except FileNotFoundError:
            return UpdateState()
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            log.warning("update state %s cannot be read (%s: %s); starting on the configured bundle",
                        self.path, exc.__class__.__name__, exc)
            return UpdateState()

    def update(self, change: Callable[[UpdateState], UpdateState]) -> UpdateState:
        """Apply ``change`` and write the result; OSError (a full disk) leaves the file as it was, and the
        new state in memory."""
        with self._lock:
            new = change(self.state)
            self._state = new
            self._write(new)
            return new

    def _write(self, state: UpdateState) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(state.to_dict(), fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        try:  # the rename itself survives a power cut only once the directory is synced
            fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass
