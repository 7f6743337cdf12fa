"""Which predictions to send home: low confidence, low margin, a random baseline, within caps.

The policy sees a :class:`~device_agent.inference.classify.Prediction` and the digest
of the raw input; it never touches tensors. Order of the checks:

1. reasons: ``low_confidence`` (top-1 < threshold), ``low_margin``
   (top-1 minus top-2 < margin threshold), ``random`` (a seeded draw below
   ``random_fraction``, an unbiased baseline). No reason: not flagged.
2. ``duplicate``: the same raw bytes were already sent (``dedupe``).
3. ``rate_limited``: the minute/hour/day cap or the per-class hourly cap is full.
"""

from __future__ import annotations

import collections
import random
from dataclasses import dataclass
from typing import Callable, Deque, Dict, Optional, Tuple, Union

from ..inference.classify import Prediction

__all__ = ["Decision", "Policy"]

_WINDOWS = (("max_per_minute", 60.0), ("max_per_hour", 3600.0), ("max_per_day", 86400.0))


@dataclass(frozen=True)
class Decision:
    flagged: bool
    reasons: Tuple[str, ...] = ()
    skipped: str = ""  # why a prediction with reasons was not sent: duplicate | rate_limited

    @property
    def low_confidence(self) -> bool:
        return "low_confidence" in self.reasons


_PASS = Decision(False)  # the common answer, one shared instance (Decision is immutable)


class Policy:
    """Stateful: remembers what it flagged to apply the caps (``seen`` answers dedupe)."""

    def __init__(
        self,
        cfg,
        *,
        confidence_threshold: float,
        margin_threshold: float,
        seen: Optional[Callable[[str], bool]] = None,
    ):
        self.cfg = cfg
        self.confidence_threshold = float(
            cfg.confidence_threshold if cfg.confidence_threshold is not None else confidence_threshold
        )
        self.margin_threshold = float(cfg.margin_threshold if cfg.margin_threshold is not None else margin_threshold)
        self._rng = random.Random(cfg.seed)
        self._seen = seen or (lambda digest: False)
        self._windows: Dict[str, Deque[float]] = {k: collections.deque() for k, _ in _WINDOWS}
        self._per_class: Dict[str, Deque[float]] = collections.defaultdict(collections.deque)
        self.skipped: Dict[str, int] = collections.Counter()

    def set_thresholds(self, confidence: Optional[float] = None, margin: Optional[float] = None) -> None:
        for name, value in (("confidence", confidence), ("margin", margin)):
            if value is not None and not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"{name} threshold={value} must be within [0, 1]")
        if confidence is not None:
            self.confidence_threshold = float(confidence)
        if margin is not None:
            self.margin_threshold = float(margin)

    def reasons(self, pred: Prediction) -> Tuple[str, ...]:
        out = []
        if pred.confidence < self.confidence_threshold:
            out.append("low_confidence")
        if pred.margin < self.margin_threshold:
            out.append("low_margin")
        draw = self._rng.random()  # drawn for every prediction, so a seed replays exactly
        if draw < self.cfg.random_fraction:
            out.append("random")
        return tuple(out)

    def _full(self, label: str, now: float) -> bool:
        for key, span in _WINDOWS:
            cap = getattr(self.cfg, key)
            if cap:
                q = self._windows[key]
                while q and q[0] <= now - span:
                    q.popleft()
                if len(q) >= cap:
                    return True
        cap = self.cfg.max_per_class_per_hour
        if cap:
            q = self._per_class[label]
            while q and q[0] <= now - 3600.0:
                q.popleft()
            if len(q) >= cap:
                return True
        return False

    def decide(self, pred: Prediction, digest: Union[str, Callable[[], str]], now: float) -> Decision:
        """Flag or not; a flag is counted against the caps at once.

        ``digest`` identifies the raw input for dedupe; pass a callable to
        compute it only when the prediction has a reason to be sent.
        """
        reasons = self.reasons(pred)
        if not reasons:
            return _PASS
        if self.cfg.dedupe and self._seen(digest() if callable(digest) else digest):
            self.skipped["duplicate"] += 1
            return Decision(False, reasons, "duplicate")
        if self._full(pred.label, now):
            self.skipped["rate_limited"] += 1
            return Decision(False, reasons, "rate_limited")
        for key, _ in _WINDOWS:
            if getattr(self.cfg, key):
                self._windows[key].append(now)
        if self.cfg.max_per_class_per_hour:
            self._per_class[pred.label].append(now)
        return Decision(True, reasons)
