"""Model updates on the board: a pushed bundle is staged, verified and opened beside the running one.

The host publishes the bundle the board should run as a retained
``edgekit.bundle/1`` message on ``.../<device>/bundle`` (``edgekit fleet
push``). :meth:`Updater.offer` (called on the MQTT thread) checks the message's
size and keeps only the newest one; a worker thread then, in this order:

1. checks the message (size, JSON depth, base64, ``archive_sha256``);
2. refuses at once an archive refused before (it crashed the agent, failed its trial run, broke a
   limit): a retained message that comes back after a restart is not staged again; checks the archive's
   rules on the stream (:func:`.archive.check`, nothing written), then, with a :class:`~.signature.Verifier`,
   the signature and release on the archive in memory, before anything is written;
3. streams the archive into ``<state dir>/bundles/.staging-*/`` (docs/bundle.md, "The .tar.gz":
   manifest.json, the model and signature.json only, sizes checked before a byte is written) and
   runs :func:`load_bundle` (manifest limits; the model's sha256 before an interpreter opens it);
   a bundle whose manifest is the running one's is what already runs: nothing to do;
4. moves it to ``bundles/<name>-<version>-<archive sha256[:16]>/`` (the cache is keyed by the archive);
5. runs the model in a child process (:mod:`.sandbox`): a crash, a signal, a timeout or too much
   memory refuses it;
6. counts the attempt in the installed-bundle state (:mod:`.state`), then opens the model with the
   agent's ``open_model`` and runs the agent's ``check``.

What comes out — a :class:`Staged` bundle ready to swap in, or a :class:`Failed` reason — waits on
:attr:`Updater.ready` until the agent loop takes it between two inferences. The running model is
never touched here. Chores that may take long (removing stale staging directories at start-up,
pruning old bundles after a swap) run on the same thread and can never fail an update.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import re
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

from ..delivery import protocol
from ..errors import AgentError, BundleError, ConfigError, ProtocolError, SignatureError
from .archive import check, remove_tree, unpack
from .manifest import MANIFEST_NAME, Bundle, load_bundle
from .sandbox import TrialTimeout
from .state import Slot, StateFile, UpdateState

if TYPE_CHECKING:  # pragma: no cover
    from .signature import Verifier

__all__ = ["Staged", "Failed", "Unchanged", "Updater"]

log = logging.getLogger(__name__)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class Staged:
    """A verified bundle and its opened model, waiting for the loop to swap it in."""

    bundle: Bundle
    model: Any  # TFLiteModel, opened on the same runtime and threads as the running one
    meta: Dict[str, Any] = field(default_factory=dict)
    slot: Optional[Slot] = None


@dataclass(frozen=True)
class Failed:
    """An update that was refused; the running model stays."""

    reason: str
    meta: Dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Unchanged:
    """The newest bundle message names what already runs, or the bundle topic was cleared (a shadow run ends)."""

    why: str = ""


Result = Union[Staged, Failed, Unchanged]


def _unpack(archive: bytes, into: Path, max_bytes: int) -> Path:
    """Stream a bundle archive into ``into`` (see :mod:`.archive`); the folder holding manifest.json."""
    try:
        return unpack(archive, into, what="bundle archive (pack it with `edgekit fleet push`)", max_total=8 * max_bytes)
    except OSError as exc:  # the disk, not the archive
        raise OSError(exc.errno, f"bundle cannot be unpacked into {into} ({exc.strerror}); check the disk space") from exc


def manifest_digest(bundle_dir: Union[str, os.PathLike]) -> str:
    """sha256 of a bundle's manifest.json bytes: two bundles with the same digest are the same model
    with the same settings."""
    with open(Path(bundle_dir) / MANIFEST_NAME, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


class Updater:
    """Stages pushed bundles in the background; see the module docstring."""

    def __init__(
        self,
        state_dir: Union[str, os.PathLike],
        *,
        device: str,
        open_model: Optional[Callable[[Path], Any]] = None,
        check: Optional[Callable[[Bundle, Any], None]] = None,
        running: Optional[Callable[[], Bundle]] = None,
        trial: Optional[Callable[[Path, threading.Event], Any]] = None,
        max_bytes: int = protocol.DEFAULT_MAX_BUNDLE_BYTES,
        keep: int = 2,
        max_attempts: int = 3,
        verifier: Optional["Verifier"] = None,
        running_sha256: Optional[Callable[[], str]] = None,  # earlier API: unused (``running`` replaces it)
    ):
        self.state_dir = Path(state_dir)
        self.dir = self.state_dir / "bundles"
        self.pointer_path = self.state_dir / f"current_bundle-{device}.json"
        self.states = StateFile(self.pointer_path)
        self.max_bytes = int(max_bytes)
        self.keep = int(keep)
        self.max_attempts = int(max_attempts)
        self.ready: "queue.SimpleQueue[Result]" = queue.SimpleQueue()
        self._open_model = open_model
        self._check = check
        self._running = running
        self._trial = trial
        self.verifier = verifier  # with trusted keys: signature and release checked before anything is unpacked
        self._cond = threading.Condition()
        self._payload: Optional[bytes] = None  # the newest bundle message not yet taken by the worker
        self._chores: List[Callable[[], None]] = []
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        self._cancel = threading.Event()
        self._digests: Dict[str, str] = {}

    @property
    def state(self) -> UpdateState:
        return self.states.state

    # -- MQTT thread --------------------------------------------------------
    def offer(self, topic: str, payload: bytes) -> None:
        """A message on the bundle topic: keep it for the worker (only the newest waits; an empty one
        clears the topic and changes nothing; an oversized one is refused here, unread)."""
        if not payload:
            log.info("the retained bundle on %s was cleared; the running model stays", topic)
            self.ready.put(Unchanged("the bundle topic was cleared"))
            return
        limit = protocol.max_bundle_message_bytes(self.max_bytes)
        if len(payload) > limit:
            self.ready.put(Failed(f"bundle message is {len(payload)} bytes, too big for max_bytes={self.max_bytes}; "
                                  "raise [update].max_bytes if the model really is that big"))
            return
        self._submit(payload=bytes(payload))

    def start(self) -> None:
        """Start the worker; its first chore removes staging directories a crash left behind."""
        self._submit(chore=self._clean_stale)

    def _submit(self, payload: Optional[bytes] = None, chore: Optional[Callable[[], None]] = None) -> None:
        with self._cond:
            if self._closed:
                return
            if payload is not None:
                self._payload = payload  # a newer desired state replaces one not yet started
            if chore is not None:
                self._chores.append(chore)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="edgekit-updater", daemon=True)
                self._thread.start()
            self._cond.notify()

    # -- worker thread ------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._closed and self._payload is None and not self._chores:
                    self._cond.wait()
                if self._closed:
                    return
                chores, self._chores = self._chores, []
                payload, self._payload = self._payload, None
            for chore in chores:
                try:
                    chore()
                except Exception:  # noqa: BLE001 - a chore (cleaning up) must never stop updates
                    log.warning("update: a clean-up step failed; it is retried after the next update", exc_info=True)
            if payload is None:
                continue
            try:
                result = self._stage_guarded(payload)
            except BaseException as exc:  # noqa: BLE001 - RecursionError, MemoryError, ...: never end the worker
                log.warning("update: unexpected %s while staging: %s", exc.__class__.__name__, exc)
                result = Failed(f"{exc.__class__.__name__}: {exc}")
            self.ready.put(result if result is not None else Unchanged("the bundle message names what runs"))

    def _stage_guarded(self, payload: bytes) -> Optional[Result]:
        meta: Dict[str, Any] = {}
        try:
            return self.stage(payload, meta)
        except (ConfigError, TrialTimeout, SignatureError, OSError) as exc:
            # the board (its source, its load, its disk, the keys it trusts), not only the bundle: may pass next time
            self._forget_try()
            return Failed(f"{exc}", meta)
        except AgentError as exc:
            self._forget_try()
            if meta.get("archive_sha256"):  # the archive's bytes were verified: they are what is refused
                self._remember(meta, str(exc))
            return Failed(f"{exc}", meta)
        except Exception as exc:  # noqa: BLE001 - one bad message must not end updates for good
            self._forget_try()
            log.warning("update: unexpected %s: %s", exc.__class__.__name__, exc, exc_info=True)
            return Failed(f"{exc.__class__.__name__}: {exc}", meta)

    def stage(self, payload: bytes, meta: Optional[Dict[str, Any]] = None) -> Optional[Result]:
        """Check, unpack, verify, trial-run and open one ``edgekit.bundle/1`` message; None when it is what
        already runs. ``meta`` (if given) receives the message's fields once they are verified."""
        fields, archive = protocol.parse_bundle(payload, max_bytes=self.max_bytes)
        meta = meta if meta is not None else {}
        meta.update(fields)
        archive_sha = fields["archive_sha256"]
        what = f"bundle {fields['name'][:64]} v{fields['version'][:64]}"
        refused = self.state.refusal(archive_sha)
        if refused is not None:
            meta["refused_archive"] = meta.pop("archive_sha256", None)  # already remembered
            raise BundleError(f"{what} (archive {archive_sha[:12]}...) was refused before ({refused.reason}); it is "
                              "not staged again: push a fixed bundle")
        check(archive, what="bundle archive (pack it with `edgekit fleet push`)", max_total=8 * self.max_bytes)
        signed = self.verifier.check_archive(archive, max_total=8 * self.max_bytes) if self.verifier else None
        self.dir.mkdir(parents=True, exist_ok=True)
        target = self.dir / f"{_UNSAFE.sub('_', fields['name'] + '-' + fields['version'])[:80]}-{archive_sha[:16]}"
        bundle = self._reuse(target, fields["sha256"])
        if bundle is not None and signed is not None and not self.verifier.matches(target, signed):
            bundle = None  # the same archive name under another signed manifest: unpack that
        created = bundle is None
        if bundle is None:
            staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.dir))
            try:
                root = _unpack(archive, staging, self.max_bytes)
                bundle = load_bundle(root)  # limits, then the model's sha256 before any interpreter opens it
                if bundle.manifest.sha256 != fields["sha256"]:
                    raise ProtocolError(f"bundle message says sha256={fields['sha256'][:12]}... but its manifest says "
                                        f"{bundle.manifest.sha256[:12]}...; push it again with `edgekit fleet push`")
                if signed is not None:
                    self.verifier.check_unpacked(root, signed)  # nothing slipped in between
                if self._is_running(root):
                    log.info("%s (sha256 %s...) is what already runs; nothing to do", what, fields["sha256"][:12])
                    return None
                if target.exists():
                    remove_tree(target)
                os.replace(root, target)
            finally:
                remove_tree(staging)
            bundle = load_bundle(target)
        elif self._is_running(target):
            log.info("%s (sha256 %s...) is what already runs; nothing to do", what, fields["sha256"][:12])
            return None
        try:
            if self._trial is not None:
                result = self._trial(bundle.model_path, self._cancel)
                log.info("%s: trial run in a child process passed (%.0f ms)", what, getattr(result, "ms", 0.0))
            slot = Slot(path=str(target.resolve()), name=bundle.manifest.name, version=bundle.manifest.version,
                        sha256=bundle.manifest.sha256, archive_sha256=archive_sha, installed=protocol.now())
            tried = self.states_update(lambda s: s.trying(slot)).pending
            if tried is not None and tried.attempts > self.max_attempts:
                raise BundleError(f"{what} crashed or hung the agent {tried.attempts - 1} times while it was opened; "
                                  "refused")
            model = self._open_model(bundle.model_path)
            try:
                self._check(bundle, model)
            except BaseException:
                model.close()
                raise
        except BaseException:
            if created:
                remove_tree(target)
            raise
        try:
            os.utime(target)  # newest install first when pruning
        except OSError:
            pass
        return Staged(bundle=bundle, model=model, meta=meta, slot=slot)

    def _is_running(self, bundle_dir: Path) -> bool:
        running = self._running() if self._running is not None else None
        if running is None:
            return False
        key = str(Path(running.path).resolve())
        if key not in self._digests:
            try:
                self._digests[key] = manifest_digest(running.path)
            except OSError:
                return False
        return manifest_digest(bundle_dir) == self._digests[key]

    @staticmethod
    def _reuse(target: Path, sha256: str) -> Optional[Bundle]:
        """A previously installed copy of the same archive (a rollback), if it still verifies."""
        if not (target / MANIFEST_NAME).is_file():
            return None
        try:
            bundle = load_bundle(target)
        except BundleError:
            return None
        return bundle if bundle.manifest.sha256 == sha256 else None

    # -- the installed-bundle state (see .state) ----------------------------
    def states_update(self, change: Callable[[UpdateState], UpdateState]) -> UpdateState:
        """Change the state and write it; a write that fails (a full disk) is logged, the change kept in memory."""
        try:
            return self.states.update(change)
        except OSError as exc:
            log.warning("update state %s cannot be written (%s); it is kept in memory until the next write",
                        self.pointer_path, exc)
            return self.states.state

    def _remember(self, meta: Dict[str, Any], reason: str) -> None:
        self.states_update(lambda s: s.refuse(meta["archive_sha256"], meta.get("name", ""), meta.get("version", ""),
                                              reason))

    def _forget_try(self) -> None:
        if self.state.pending is not None:
            self.states_update(lambda s: s.done_trying())

    def boot(self) -> Tuple[Optional[Bundle], Optional[str]]:
        """At start-up: the bundle to run (None: the configured one), and a notice when it fell back.

        An uncommitted bundle gets one more attempt, written to disk before anything opens it; past
        ``max_attempts`` it is refused and the last good bundle runs (see :mod:`.state`).
        """
        before = self.state
        state, notice = before.boot(self.max_attempts)
        bundle = None
        while state.current is not None:
            cur = state.current
            try:
                bundle = load_bundle(cur.path)
                if bundle.manifest.sha256 != cur.sha256:
                    raise BundleError(f"its model sha256={bundle.manifest.sha256[:12]}... is not the installed "
                                      f"{cur.sha256[:12]}...")
                break
            except (AgentError, OSError) as exc:
                bundle = None
                state, notice = state.fall_back(str(exc))
        if state != before:
            self.states_update(lambda s: state)  # the attempt is on disk before any interpreter opens the model
        if notice:
            log.warning("%s", notice)
        if state.current is not None:
            cur = state.current
            log.info("running the bundle an update installed, %s (%s, %s); `edgekit-agent run --reset-bundle` goes "
                     "back to the configured bundle", cur.label, cur.path,
                     "committed" if cur.committed else f"attempt {cur.attempts} of {self.max_attempts}")
        return bundle, notice

    def load_pointer(self) -> Optional[Bundle]:
        """The bundle an earlier update installed, if there is one and it still loads and verifies
        (for ``edgekit-agent check``: counts no attempt)."""
        cur = self.state.current
        if cur is None:
            return None
        try:
            bundle = load_bundle(cur.path)
            if bundle.manifest.sha256 != cur.sha256:
                raise BundleError(f"its model sha256={bundle.manifest.sha256[:12]}... is not the installed "
                                  f"{cur.sha256[:12]}...")
            return bundle
        except (AgentError, OSError) as exc:
            log.warning("installed bundle in %s cannot be used (%s); starting on the configured bundle",
                        self.pointer_path, exc)
            return None

    def save_pointer(self, bundle: Bundle) -> Path:
        """Make ``bundle`` (a directory) the one a restart runs, committed, as the single pointer of earlier agents did."""
        m = bundle.manifest
        slot = Slot(path=str(Path(bundle.path).resolve()), name=m.name, version=m.version, sha256=m.sha256,
                    installed=protocol.now())
        self.states.update(lambda s: s.install(slot).commit())
        return self.pointer_path

    def installed(self, staged: Staged) -> None:
        """``staged`` was swapped in: it runs after a restart too (uncommitted until :meth:`commit`)."""
        slot = staged.slot or Slot(path=str(Path(staged.bundle.path).resolve()), name=staged.bundle.manifest.name,
                                   version=staged.bundle.manifest.version, sha256=staged.bundle.manifest.sha256,
                                   installed=protocol.now())
        self.states_update(lambda s: s.install(slot))
        state = self.state
        keep = [p for p in (state.current, state.last_good) if p is not None]
        self._submit(chore=lambda: self.prune(running=[p.path for p in keep]))

    def commit(self) -> None:
        """The running bundle ran well: it is what a restart runs without counting, and the next fallback."""
        if self.state.current is not None and not self.state.current.committed:
            self.states_update(lambda s: s.commit())
            log.info("bundle %s ran well: committed", self.state.current.label)

    def revert(self, reason: str) -> Optional[Slot]:
        """The running, uncommitted bundle failed its probation: refuse its archive (a retained message that
        brings it back is refused at once) and make the last good bundle current. Returns that slot (None: the
        configured bundle is what should run)."""
        target: List[Optional[Slot]] = [None]

        def change(state: UpdateState) -> UpdateState:
            new, target[0] = state.revert(reason)
            return new

        cur = self.state.current
        self.states_update(change)
        log.warning("bundle %s refused: %s", cur.label if cur else "?", reason)
        return target[0]

    def shadow_ended(self) -> None:
        """A shadow run ended cleanly: its open is no longer an attempt to count."""
        self._forget_try()

    def shadow_failed(self, slot: Optional[Slot], reason: str) -> None:
        """A shadow candidate failed: its archive is refused (a retained message that brings it back is refused)."""
        self.not_installed(slot, reason, remember=True)

    def not_installed(self, slot: Optional[Slot], reason: str, *, remember: bool) -> None:
        """A staged bundle was not swapped in after all (the agent could not prepare its loop for it, or its shadow
        run failed): its attempt ends; with ``remember`` its archive is refused (a retained message that brings it
        back is refused at once)."""
        if remember and slot is not None and slot.archive_sha256:
            self.states_update(lambda s: s.refuse(slot.archive_sha256, slot.name, slot.version, reason))
        else:
            self._forget_try()

    def stopped(self) -> None:
        """A clean stop: this run is not counted against an uncommitted bundle."""
        if self.state.current is not None or self.state.pending is not None:
            self.states_update(lambda s: s.stopped())

    def reset(self) -> bool:
        """Forget the installed bundle: the next start runs the configured one. True if there was one.
        Archives refused before stay refused."""
        had = self.state.current is not None
        if had or self.pointer_path.exists():
            try:
                self.states.update(lambda s: s.reset())
            except OSError as exc:
                log.warning("update state %s cannot be written (%s)", self.pointer_path, exc)
        return had

    # -- chores (worker thread) ---------------------------------------------
    def _clean_stale(self) -> None:
        """At start-up: staging directories a crash or a kill left behind, and old bundles beyond ``keep``."""
        if not self.dir.is_dir():
            return
        for d in list(self.dir.iterdir()):
            if d.name.startswith(".staging-"):
                log.info("removing %s, left by an update that did not finish", d)
                remove_tree(d)
        state = self.state
        self.prune(running=[p.path for p in (state.current, state.last_good, state.pending) if p is not None])

    def prune(self, running: Iterable[Union[str, os.PathLike]]) -> None:
        """Delete bundle directories beyond the newest ``keep`` that are not ``running``; never raises."""
        try:
            if not self.dir.is_dir():
                return
            running_paths = {Path(p).resolve() for p in running}
            old = []
            for d in self.dir.iterdir():
                try:
                    if d.name.startswith(".staging-") or d.is_symlink() or not d.is_dir():
                        continue
                    if d.resolve() not in running_paths:
                        old.append((d.stat().st_mtime, d))
                except OSError:
                    continue
            old.sort(key=lambda item: item[0], reverse=True)
            for _, d in old[self.keep:]:
                log.info("removing old bundle %s (keeping %d previous)", d, self.keep)
                if not remove_tree(d):
                    log.warning("old bundle %s could not be removed entirely; the next update tries again", d)
        except Exception as exc:  # noqa: BLE001 - pruning can never fail an update
            log.warning("pruning %s failed (%s: %s); the next update tries again", self.dir,
                        exc.__class__.__name__, exc)

    def close(self) -> None:
        """Stop the worker (a trial run in progress is cancelled); a staged model nobody took is closed."""
        self._cancel.set()
        with self._cond:
            self._closed = True
            thread = self._thread
            self._cond.notify_all()
        if thread is not None:
            thread.join(10)
        while not self.ready.empty():
            item = self.ready.get_nowait()
            if isinstance(item, Staged):
                item.model.close()

