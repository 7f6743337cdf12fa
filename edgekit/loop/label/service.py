"""The labeling page's logic, without HTTP: the queue, leases, saves, undo, skips, the grid, progress.

:class:`LabelService` serves any number of labelers (each a name) from one store; several
services (one per ``edgekit label`` process) may share a PostgreSQL or SQLite store:

* the queue is the unlabelled samples matching the filters, in the chosen order
  (:mod:`edgekit.loop.order`), recomputed when new samples arrive;
* :meth:`LabelService.next` hands a labeler the first sample nobody else holds and leases it
  to them (``lease_seconds``; the page renews it while the sample is on screen), so two people
  labelling at once never get the same sample at the same time;
* :meth:`LabelService.save` writes only if the sample is still at the version the page showed;
  otherwise :class:`~edgekit.errors.LabelConflictError` says who changed it, and nothing is
  overwritten;
* :meth:`LabelService.undo` takes back one's own last change (the label it replaced comes back).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set

from ...errors import DataError, LabelConflictError
from ..order import Embedder, order_samples
from ..store import INVALID_LABEL, SampleRecord, Store
from .render import kind, series

__all__ = ["LabelService", "check_user"]

log = logging.getLogger(__name__)

MAX_GRID = 200


def check_user(user: Any) -> str:
    """A labeler's name: 1-64 printable characters."""
    if not isinstance(user, str) or not user.strip() or len(user) > 64 or not user.isprintable():
        raise DataError(f"user={user!r}: give your name (1-64 printable characters)")
    return user.strip()


class LabelService:
    """See the module docstring. ``classes`` are the model's classes in index order."""

    def __init__(self, store: Store, *, classes: Sequence[str], filters: Optional[Mapping[str, Any]] = None,
                 order: str = "informative", embed: Optional[Embedder] = None, lease_seconds: float = 300.0,
                 refresh_seconds: float = 10.0, seed: int = 0) -> None:
        if lease_seconds <= 0:
            raise DataError(f"lease_seconds={lease_seconds} must be > 0")
        self.store = store
        self.classes = tuple(classes)
        if INVALID_LABEL in self.classes:
            raise DataError(f"{INVALID_LABEL!r} is reserved for 'none of these'; rename that class")
        self.filters = {k: v for k, v in (filters or {}).items() if v is not None}
        self.order_name = order
        self.embed = embed
        self.lease_seconds = float(lease_seconds)
        self.refresh_seconds = float(refresh_seconds)
        self.seed = seed
        self._lock = threading.RLock()
        self._order: List[str] = []
        self._known: Set[str] = set()
        self._predicted: Dict[str, str] = {}
        self._checked = 0.0
        self._skipped: Dict[str, Set[str]] = {}

    # -- the queue -------------------------------------------------------
    def refresh(self, force: bool = False) -> List[str]:
        """The ordered queue of unlabelled ids, recomputed when samples arrived since the last look."""
        with self._lock:
            now = time.monotonic()
            if not force and now - self._checked < self.refresh_seconds and self._order:
                return self._order
            self._checked = now
            unlabeled = self.store.unlabeled_ids(**self.filters)
            if force or not unlabeled <= self._known:
                records = self.store.list_samples(labeled=False, **self.filters)
                t0 = time.perf_counter()
                ordered = order_samples(records, self.order_name, embed=self.embed, seed=self.seed)
                self._order = [r.sample_id for r in ordered]
                self._known = set(self._order)
                self._predicted = {r.sample_id: r.label_pred for r in ordered}
                log.info("queue: %d unlabelled samples in %s order (%.1f s)", len(self._order), self.order_name,
                         time.perf_counter() - t0)
            return self._order

    def next(self, user: str, *, exclude: Iterable[str] = ()) -> Optional[Dict[str, Any]]:
        """Lease and return the first sample of the queue that is free for ``user`` (None: all done).
        The user's other leases are given back. Skipped samples come back once nothing else is left."""
        user = check_user(user)
        exclude = set(exclude)
        with self._lock:
            order = self.refresh()
            skipped = self._skipped.setdefault(user, set())
        unlabeled = self.store.unlabeled_ids(**self.filters)
        held = self.store.leased_by_others(user)
        for pass_skipped in (False, True):
            for sid in order:
                if sid not in unlabeled or sid in held or sid in exclude or (sid in skipped) != pass_skipped:
                    continue
                if self.store.claim_lease(sid, user, self.lease_seconds):
                    self.store.release_leases(user, keep=[sid])
                    if pass_skipped:
                        skipped.discard(sid)
                    return self.view(sid)
        self.store.release_leases(user)
        return None

    def open(self, user: str, sample_id: str) -> Dict[str, Any]:
        """A sample the labeler moved to (arrows, undo): leased to them when it is unlabelled and free."""
        user = check_user(user)
        view = self.view(sample_id)
        view["held_by"] = None
        if view["label"] is None:
            if self.store.claim_lease(sample_id, user, self.lease_seconds):
                self.store.release_leases(user, keep=[sample_id])
            else:
                view["held_by"] = self.store.leased_by_others(user).get(sample_id)
        return view

    def renew(self, user: str, sample_ids: Sequence[str]) -> List[str]:
        """Keep the leases of what is on screen; returns the ids still held."""
        user = check_user(user)
        return [sid for sid in sample_ids if self.store.claim_lease(sid, user, self.lease_seconds)]

    def skip(self, user: str, sample_id: str) -> None:
        user = check_user(user)
        with self._lock:
            self._skipped.setdefault(user, set()).add(sample_id)
        self.store.release_leases(user)

    # -- writes ----------------------------------------------------------
    def check_label(self, label: Any) -> str:
        if label not in self.classes and label != INVALID_LABEL:
            raise DataError(f"label {label!r} is not one of the classes {list(self.classes)} "
                            f"(or {INVALID_LABEL!r} for 'none of these')")
        return str(label)

    def save(self, user: str, sample_id: str, label: Any, version: Any, action: str = "label") -> Dict[str, Any]:
        """Label ``sample_id`` if it is still at ``version``; raises LabelConflictError otherwise."""
        user = check_user(user)
        label = self.check_label(label)
        if not isinstance(version, int) or isinstance(version, bool):
            raise DataError(f"version={version!r} must be the integer the page was shown")
        new = self.store.save_label(sample_id, label, by=user, expected_version=version, action=action)
        return {"sample_id": sample_id, "label": label, "label_version": new}

    def undo(self, user: str, sample_id: str, version: Any) -> Dict[str, Any]:
        """Take back the change that brought ``sample_id`` to ``version``; returns the sample as it is now."""
        user = check_user(user)
        if not isinstance(version, int) or isinstance(version, bool):
            raise DataError(f"version={version!r} must be the integer the save returned")
        self.store.undo_label(sample_id, by=user, expected_version=version)
        with self._lock:
            self._known.discard(sample_id)  # back in the queue: the next refresh re-orders
            self._checked = 0.0
        return self.open(user, sample_id)

    def accept(self, user: str, items: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
        """The grid: save many (each {sample_id, label, label_version}); conflicts are reported, not fatal."""
        user = check_user(user)
        saved, conflicts = [], []
        for item in items:
            try:
                saved.append(self.save(user, str(item.get("sample_id")), item.get("label"), item.get("label_version"),
                                       action="accept"))
            except LabelConflictError as exc:
                conflicts.append({"sample_id": item.get("sample_id"), "error": str(exc), "current": exc.current})
        return {"saved": saved, "conflicts": conflicts}

    # -- the grid --------------------------------------------------------
    def grid(self, user: str, n: int = 36, predicted: Optional[str] = None,
             exclude: Iterable[str] = ()) -> List[Dict[str, Any]]:
        """Lease and return up to ``n`` queue samples (only those predicted ``predicted`` when given)."""
        user = check_user(user)
        if not isinstance(n, int) or not 1 <= n <= MAX_GRID:
            raise DataError(f"n={n!r} must be 1..{MAX_GRID}")
        if predicted is not None and predicted not in self.classes:
            raise DataError(f"predicted={predicted!r} is not one of the classes")
        order = self.refresh()
        unlabeled = self.store.unlabeled_ids(**self.filters)
        held = self.store.leased_by_others(user)
        skipped = self._skipped.get(user, set()) | set(exclude)
        candidates = [sid for sid in order if sid in unlabeled and sid not in held and sid not in skipped]
        if predicted is not None:
            candidates = [sid for sid in candidates if self._predicted.get(sid) == predicted]
        got: List[str] = []
        for sid in candidates:
            if self.store.claim_lease(sid, user, self.lease_seconds):
                got.append(sid)
                if len(got) == n:
                    break
        self.store.release_leases(user, keep=got)
        return [self.view(sid, with_history=False) for sid in got]

    # -- reads -----------------------------------------------------------
    def view(self, sample_id: str, with_history: bool = True) -> Dict[str, Any]:
        """What the page shows of one sample (the input itself comes from /api/samples/<id>.png)."""
        r = self.store.get_sample(sample_id)
        return sample_view(r, self.store.label_history(sample_id, limit=10) if with_history else [])

    def progress(self) -> Dict[str, Any]:
        counts = self.store.label_counts(**self.filters)
        left = counts.pop(None, 0)
        return {"labeled": sum(counts.values()), "left": left, "by_class": counts,
                "invalid": counts.get(INVALID_LABEL, 0)}

    def history(self, limit: int = 50) -> List[Dict[str, Any]]:
        if not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise DataError(f"limit={limit!r} must be 1..1000")
        return [e.to_dict() for e in self.store.label_history(limit=limit)]


def sample_view(r: SampleRecord, history: Sequence[Any] = ()) -> Dict[str, Any]:
    arr = r.array()
    k = kind(arr)
    return {
        "sample_id": r.sample_id, "kind": k, "series": series(arr) if k == "series" else None,
        "shape": list(r.input_shape), "dtype": r.input_dtype, "fleet": r.fleet, "device": r.device, "seq": r.seq,
        "model": {"name": r.model_name, "version": r.model_version},
        "predicted": r.label_pred, "pred_index": r.pred_index, "confidence": r.confidence, "margin": r.margin,
        "entropy": r.entropy, "top_k": [{"label": t.get("label"), "score": t.get("score")} for t in r.top_k],
        "reasons": list(r.reasons), "ts": r.ts, "received_at": r.received_at, "source": r.source,
        "label": r.label, "labeled_by": r.labeled_by, "labeled_at": r.labeled_at, "label_version": r.label_version,
        "history": [e.to_dict() for e in history],
    }
