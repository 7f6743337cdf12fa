"""Shadow runs: a pushed candidate classifies the same inputs as the running model, which still decides.

A bundle message with ``"shadow": true`` (``edgekit fleet push --shadow``) is staged like any update
(checks, signature, trial run in a child process) but not swapped in: the agent runs it after the
current model on every input and keeps, for the candidate against the current model, the figures
the host's rollout verdict needs (:meth:`ShadowStats.snapshot`, telemetry ``shadow``). Results,
flagging and samples stay the current model's. The shadow ends when the next bundle message
arrives (the candidate itself without ``shadow``: a promotion; anything else, or a cleared topic:
an abort); a candidate that fails more than ``[update].probation_max_errors`` inputs, or is slower than
the probation latency limits, is dropped and its archive refused, the current model untouched.
"""

from __future__ import annotations

import collections
from typing import Any, Deque, Dict, Optional

import numpy as np

__all__ = ["ShadowStats"]

_WINDOW = 1000


def _percentiles(values: Deque[float]) -> Dict[str, Optional[float]]:
    if not values:
        return {"p50": None, "p95": None}
    p50, p95 = np.percentile(np.fromiter(values, float), [50, 95])
    return {"p50": round(float(p50), 3), "p95": round(float(p95), 3)}


class ShadowStats:
    """Counts since the shadow started (the host pools them across boards); latencies of the last 1000."""

    def __init__(self, model: Dict[str, str], archive_sha256: str = ""):
        self.model = dict(model)
        self.archive_sha256 = archive_sha256
        self.inferences = 0
        self.agree = 0
        self.low_confidence = 0
        self.current_low_confidence = 0
        self.confidence_sum = 0.0
        self.current_confidence_sum = 0.0
        self.errors = 0
        self.latencies_ms: Deque[float] = collections.deque(maxlen=_WINDOW)
        self.current_latencies_ms: Deque[float] = collections.deque(maxlen=_WINDOW)

    def record(self, *, label: str, confidence: float, low: bool, latency_s: float,
               current_label: str, current_confidence: float, current_low: bool, current_latency_s: float) -> None:
        self.inferences += 1
        self.agree += label == current_label
        self.low_confidence += bool(low)
        self.current_low_confidence += bool(current_low)
        self.confidence_sum += float(confidence)
        self.current_confidence_sum += float(current_confidence)
        self.latencies_ms.append(latency_s * 1000.0)
        self.current_latencies_ms.append(current_latency_s * 1000.0)

    def error(self) -> None:
        self.errors += 1

    def snapshot(self) -> Dict[str, Any]:
        """Telemetry ``shadow`` (docs/protocol.md)."""
        n = self.inferences

        def rate(k: float) -> Optional[float]:
            return round(k / n, 6) if n else None

        return {
            "model": self.model,
            "archive_sha256": self.archive_sha256,
            "inferences": n,
            "agree": self.agree,
            "agreement": rate(self.agree),
            "low_confidence_rate": rate(self.low_confidence),
            "current_low_confidence_rate": rate(self.current_low_confidence),
            "confidence_mean": rate(self.confidence_sum),
            "current_confidence_mean": rate(self.current_confidence_sum),
            "latency_ms": _percentiles(self.latencies_ms),
            "current_latency_ms": _percentiles(self.current_latencies_ms),
            "errors": self.errors,
        }
