"""Probation: a swapped-in bundle must run well for a while before it is committed.

As Mender commits an update only after its health check: after a swap (or a start on an
uncommitted bundle) the new model is on probation until it has run ``[update].commit_after``
inferences *and* ``[update].probation_s`` seconds have passed. It fails its probation, and the
agent goes back to the previous bundle by itself (:meth:`UpdateState.revert`), when

- more than ``probation_max_errors`` inputs fail under it (its preprocessing refuses an input the
  source produced, or the interpreter fails), checked after every inference; or
- at the end, the p95 latency of its probation inferences is above ``probation_latency_ms``
  (absolute cap, 0 = none) or above ``probation_latency_ratio`` times the p95 of the model it
  replaced, measured on the same board just before the swap (0 = none; no ratio when the board
  had not run an inference before). The ratio is taken against at least ``probation_latency_floor_ms``
  (5 ms): on a busy board a 1 ms model that takes 3 ms for a while is noise, not a slow model. With a
  latency limit on, probation lasts at least :data:`MIN_LATENCY_SAMPLES` (50) inferences: a p95 of fewer
  is one stall.

A crash or a hang of the agent during probation is boot counting's part (:mod:`.state`): the
bundle is uncommitted, so every start on it counts an attempt, and after ``max_attempts`` the last
good bundle runs (a hang ends when the service manager's watchdog kills the agent).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

__all__ = ["ProbationLimits", "Probation", "MIN_LATENCY_SAMPLES"]

MIN_LATENCY_SAMPLES = 50
"""With a latency limit on, probation lasts at least this many inferences: a p95 of 20 is the second-largest
value, one stall of a busy board (bench/bench_rollout.py saw 10 of 50 boards refuse a good model that way)."""


@dataclass(frozen=True)
class ProbationLimits:
    inferences: int = 20
    seconds: float = 0.0
    max_errors: int = 2
    latency_ratio: float = 3.0
    latency_ms: float = 0.0
    latency_floor_ms: float = 5.0

    @classmethod
    def from_config(cls, update: Any) -> "ProbationLimits":
        return cls(inferences=update.commit_after, seconds=update.probation_s, max_errors=update.probation_max_errors,
                   latency_ratio=update.probation_latency_ratio, latency_ms=update.probation_latency_ms,
                   latency_floor_ms=update.probation_latency_floor_ms)


class Probation:
    """The figures of one bundle on probation; :meth:`verdict` says whether it goes on, passed or failed."""

    def __init__(self, label: str, limits: ProbationLimits, *, baseline_p95_ms: Optional[float] = None,
                 now: Optional[float] = None):
        self.label = label
        self.limits = limits
        self.baseline_p95_ms = baseline_p95_ms
        self.started = time.monotonic() if now is None else now
        self.inferences = 0
        self.errors = 0
        self.latencies_ms: List[float] = []

    def record(self, latency_s: float) -> None:
        self.inferences += 1
        if len(self.latencies_ms) < 10_000:
            self.latencies_ms.append(latency_s * 1000.0)

    def error(self) -> None:
        self.errors += 1

    def p95_ms(self) -> Optional[float]:
        return float(np.percentile(self.latencies_ms, 95)) if self.latencies_ms else None

    def verdict(self, now: Optional[float] = None) -> Tuple[str, str]:
        """``("running", "")``, ``("passed", summary)`` or ``("failed", reason)``."""
        lim = self.limits
        if self.errors > lim.max_errors:
            return "failed", (f"{self.errors} inputs failed under it in its first {self.inferences + self.errors} "
                              f"(probation_max_errors={lim.max_errors})")
        now = time.monotonic() if now is None else now
        if self.inferences < lim.inferences or now - self.started < lim.seconds:
            return "running", ""
        judged = lim.latency_ms > 0 or (lim.latency_ratio > 0 and self.baseline_p95_ms)
        if judged and len(self.latencies_ms) < MIN_LATENCY_SAMPLES:
            return "running", ""
        p95 = self.p95_ms()
        if p95 is not None and lim.latency_ms > 0 and p95 > lim.latency_ms:
            return "failed", (f"its p95 latency {p95:.3f} ms over {self.inferences} inferences is above "
                              f"probation_latency_ms={lim.latency_ms:g}")
        base = self.baseline_p95_ms
        if p95 is not None and base and lim.latency_ratio > 0 and p95 > lim.latency_ratio * max(base, lim.latency_floor_ms):
            return "failed", (f"its p95 latency {p95:.3f} ms is {p95 / base:.1f}x the previous model's {base:.3f} ms "
                              f"(probation_latency_ratio={lim.latency_ratio:g}, "
                              f"probation_latency_floor_ms={lim.latency_floor_ms:g})")
        return "passed", (f"{self.inferences} inferences, {self.errors} errors, p95 "
                          + (f"{p95:.3f} ms" if p95 is not None else "-")
                          + (f" (previous {base:.3f} ms)" if base else ""))

    def snapshot(self, now: Optional[float] = None) -> Dict[str, Any]:
        """For telemetry ``probation``."""
        now = time.monotonic() if now is None else now
        p95 = self.p95_ms()
        return {
            "inferences": self.inferences,
            "errors": self.errors,
            "elapsed_s": round(now - self.started, 3),
            "latency_p95_ms": None if p95 is None else round(p95, 3),
            "baseline_p95_ms": None if self.baseline_p95_ms is None else round(float(self.baseline_p95_ms), 3),
        }
