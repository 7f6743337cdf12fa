"""Model updates on the board: a pushed bundle is staged, verified and opened beside the running one.

The host publishes the bundle the board should run as a retained
``edgekit.bundle/1`` message on ``.../<device>/bundle`` (``edgekit fleet
push``). :meth:`Updater.offer` (called on the MQTT thread) only queues the
message; a worker thread checks it (size, ``archive_sha256``; with a :class:`~.signature.Verifier`, the
signature and release on the archive in memory, before anything is written), unpacks it into
``<state dir>/bundles/<name>-<version>-<sha12>/``, runs :func:`load_bundle`
(the model's sha256 is checked before an interpreter opens it), opens the
model with the agent's ``open_model`` and runs the agent's ``check``. What
comes out — a :class:`Staged` bundle ready to swap in, or a :class:`Failed`
reason — waits on :attr:`Updater.ready` until the agent loop takes it between
two inferences. The running model is never touched here.

``current_bundle-<device>.json`` in the state dir remembers the installed
bundle (written atomically), so a restart runs it; :meth:`Updater.prune` keeps
at most ``keep`` previous bundle directories.
"""

from __future__ import annotations

import io
import json
import logging
import os
import queue
import re
import shutil
import tarfile
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Optional, Union

from ..delivery import protocol
from ..errors import AgentError, BundleError, ProtocolError
from .manifest import MANIFEST_NAME, Bundle, extract_archive, load_bundle

if TYPE_CHECKING:  # pragma: no cover
    from .signature import Verifier

__all__ = ["Staged", "Failed", "Updater"]

log = logging.getLogger(__name__)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class Staged:
    """A verified bundle and its opened model, waiting for the loop to swap it in."""

    bundle: Bundle
    model: Any  # TFLiteModel, opened on the same runtime and threads as the running one
    meta: Dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Failed:
    """An update that was refused; the running model stays."""

    reason: str
    meta: Dict[str, Any] = field(default_factory=dict)


Result = Union[Staged, Failed]


def _unpack(archive: bytes, into: Path, max_bytes: int) -> Path:
    """Extract a bundle archive (no links, no absolute or ``..`` paths); the folder holding manifest.json."""
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            return extract_archive(tar, into, name="bundle archive (pack it with `edgekit fleet push`)",
                                   max_total=8 * max_bytes)
    except OSError as exc:
        if exc.errno:  # the disk, not the archive
            raise BundleError(f"bundle cannot be unpacked into {into} ({exc}); check the disk space") from exc
        raise BundleError(f"bundle archive is corrupt ({exc.__class__.__name__}: {exc}); push it again") from exc
    except (tarfile.TarError, EOFError, zlib.error, ValueError) as exc:
        raise BundleError(f"bundle archive is corrupt ({exc.__class__.__name__}: {exc}); push it again") from exc


class Updater:
    """Stages pushed bundles in the background; see the module docstring."""

    def __init__(
        self,
        state_dir: Union[str, os.PathLike],
        *,
        device: str,
        open_model: Callable[[Path], Any],
        check: Callable[[Bundle, Any], None],
        running_sha256: Callable[[], str],
        max_bytes: int = protocol.DEFAULT_MAX_BUNDLE_BYTES,
        keep: int = 2,
        verifier: Optional["Verifier"] = None,
    ):
        self.state_dir = Path(state_dir)
        self.dir = self.state_dir / "bundles"
        self.pointer_path = self.state_dir / f"current_bundle-{device}.json"
        self.max_bytes = int(max_bytes)
        self.keep = int(keep)
        self.ready: "queue.SimpleQueue[Result]" = queue.SimpleQueue()
        self._open_model = open_model
        self._check = check
        self._running_sha256 = running_sha256
        self.verifier = verifier  # with trusted keys: signature and release checked before anything is unpacked
        self._inbox: "queue.SimpleQueue[Optional[bytes]]" = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._closed = False

    # -- MQTT thread --------------------------------------------------------
    def offer(self, topic: str, payload: bytes) -> None:
        """A message on the bundle topic: queue it for the worker (an empty one clears, and changes nothing)."""
        if not payload:
            log.info("the retained bundle on %s was cleared; the running model stays", topic)
            return
        with self._lock:
            if self._closed:
                return
            self._inbox.put(bytes(payload))
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="edgekit-updater", daemon=True)
                self._thread.start()

    # -- worker thread ------------------------------------------------------
    def _work(self) -> None:
        while True:
            payload = self._inbox.get()
            while payload is not None and not self._inbox.empty():  # only the newest desired state matters
                payload = self._inbox.get()  # None: closing
            if payload is None:
                return
            try:
                result = self.stage(payload)
            except (AgentError, OSError) as exc:
                result = Failed(f"{exc}")
            except Exception as exc:  # noqa: BLE001 - one bad message must not end updates for good
                log.exception("update: unexpected failure")
                result = Failed(f"{exc.__class__.__name__}: {exc}")
            if result is not None:
                self.ready.put(result)

    def stage(self, payload: bytes) -> Optional[Result]:
        """Check, unpack, verify and open one ``edgekit.bundle/1`` message; None when it is what already runs."""
        meta, archive = protocol.parse_bundle(payload, max_bytes=self.max_bytes)
        if meta["sha256"] == self._running_sha256():
            log.info("bundle %s v%s (sha256 %s...) is what already runs; nothing to do",
                     meta["name"], meta["version"], meta["sha256"][:12])
            return None
        signed = self.verifier.check_archive(archive, max_total=8 * self.max_bytes) if self.verifier else None
        name = _UNSAFE.sub("_", f"{meta['name']}-{meta['version']}")[:80]
        target = self.dir / f"{name}-{meta['sha256'][:12]}"
        self.dir.mkdir(parents=True, exist_ok=True)
        bundle = self._reuse(target, meta["sha256"])
        if bundle is not None and signed is not None and not self.verifier.matches(target, signed):
            bundle = None  # the same model under another signed manifest (a re-signed rollback): unpack that
        created = bundle is None
        if bundle is None:
            staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.dir))
            try:
                root = _unpack(archive, staging, self.max_bytes)
                if target.exists():
                    shutil.rmtree(target)
                os.replace(root, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            try:
                bundle = load_bundle(target)  # sha256 checked before any interpreter opens it
            except BundleError:
                shutil.rmtree(target, ignore_errors=True)
                raise
        if signed is not None:
            self.verifier.check_unpacked(target, signed)
        if bundle.manifest.sha256 != meta["sha256"]:
            shutil.rmtree(target, ignore_errors=True)
            raise ProtocolError(f"bundle message says sha256={meta['sha256'][:12]}... but its manifest says "
                                f"{bundle.manifest.sha256[:12]}...; push it again with `edgekit fleet push`")
        try:
            model = self._open_model(bundle.model_path)
        except BaseException:
            if created:
                shutil.rmtree(target, ignore_errors=True)
            raise
        try:
            self._check(bundle, model)
        except BaseException:
            model.close()
            if created:
                shutil.rmtree(target, ignore_errors=True)
            raise
        os.utime(target)  # newest install first when pruning
        return Staged(bundle=bundle, model=model, meta=meta)

    @staticmethod
    def _reuse(target: Path, sha256: str) -> Optional[Bundle]:
        """A previously installed copy of the same model (a rollback), if it still verifies."""
        if not (target / MANIFEST_NAME).is_file():
            return None
        try:
            bundle = load_bundle(target)
        except BundleError:
            return None
        return bundle if bundle.manifest.sha256 == sha256 else None

    # -- the installed bundle ----------------------------------------------
    def save_pointer(self, bundle: Bundle) -> Path:
        """Remember ``bundle`` as the one to run after a restart (atomic: a crash leaves the old or the new)."""
        m = bundle.manifest
        data = {"path": str(Path(bundle.path).resolve()), "name": m.name, "version": m.version, "sha256": m.sha256,
                "installed": protocol.now()}
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.pointer_path.with_name(self.pointer_path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.pointer_path)
        return self.pointer_path

    def load_pointer(self) -> Optional[Bundle]:
        """The bundle an earlier update installed, if there is one and it still loads and verifies."""
        if not self.pointer_path.exists():
            return None
        try:
            data = json.loads(self.pointer_path.read_text(encoding="utf-8"))
            bundle = load_bundle(data["path"])
            if bundle.manifest.sha256 != data["sha256"]:
                raise BundleError(f"its model sha256={bundle.manifest.sha256[:12]}... is not the installed "
                                  f"{str(data['sha256'])[:12]}...")
            return bundle
        except (OSError, ValueError, KeyError, TypeError, BundleError) as exc:
            log.warning("installed bundle in %s cannot be used (%s); starting on the configured bundle",
                        self.pointer_path, exc)
            return None

    def reset(self) -> bool:
        """Forget the installed bundle: the next start runs the configured one. True if there was one."""
        try:
            self.pointer_path.unlink()
            return True
        except FileNotFoundError:
            return False

    def prune(self, running: Iterable[Union[str, os.PathLike]]) -> None:
        """Delete bundle directories beyond the newest ``keep`` that are not ``running``, and stale staging."""
        if not self.dir.is_dir():
            return
        running_paths = {Path(p).resolve() for p in running}
        old = []
        for d in self.dir.iterdir():
            if not d.is_dir():
                continue
            if d.name.startswith(".staging-"):
                if time.time() - d.stat().st_mtime > 3600:
                    shutil.rmtree(d, ignore_errors=True)
                continue
            if d.resolve() not in running_paths:
                old.append(d)
        old.sort(key=lambda d: d.stat().st_mtime, reverse=True)
        for d in old[self.keep:]:
            log.info("removing old bundle %s (keeping %d previous)", d, self.keep)
            shutil.rmtree(d, ignore_errors=True)

    def close(self) -> None:
        """Stop the worker; a staged model nobody took is closed."""
        with self._lock:
            self._closed = True
            thread = self._thread
            self._inbox.put(None)
        if thread is not None:
            thread.join(10)
        while not self.ready.empty():
            item = self.ready.get_nowait()
            if isinstance(item, Staged):
                item.model.close()
