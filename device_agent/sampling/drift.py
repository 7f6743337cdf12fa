"""Input and confidence drift against the bundle's ``reference`` statistics (docs/bundle.md).

The converter writes, for the training inputs, the per-channel mean and std in
model-input units and a histogram of the int8 model's top-1 confidence. The
agent feeds :class:`DriftMonitor` once per inference with the per-channel mean
of that input (model-input units) and the prediction's confidence; it keeps the
last ``window`` inferences in ring buffers; an update appends to a list, and the
list reaches the buffers in blocks (every 256 inferences and at each snapshot), with
one ``searchsorted`` on the reference's bin edges.

:meth:`DriftMonitor.snapshot` gives, over the window:

* ``input_z`` — per channel, ``(live mean - reference mean) / reference std``;
  ``input_z_max`` is the largest absolute value. The std is the reference's
  per-value std, so ``|z| = 0.5`` means the average pixel moved by half the
  spread of the training pixels.
* ``confidence_mean`` next to the reference's ``confidence_mean_ref``.
* ``confidence_psi`` — the population stability index of the live confidence
  histogram ``p`` against the reference histogram ``q`` (same bins)::

      PSI = sum_i (p_i - q_i) * ln(p_i / q_i)     with p_i, q_i floored at 1e-4

  Usual reading: < 0.1 stable, 0.1 - 0.25 moderate shift, > 0.25 significant
  shift (``level``). With a few dozen inferences in the window it is noisy;
  ``samples`` says how many it describes.

A bundle without a usable ``reference`` (older bundles) gives no monitor
(:func:`monitor_for` returns None) and telemetry says ``"drift": null``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

__all__ = ["Drift", "DriftMonitor", "monitor_for", "channel_means", "psi", "psi_level", "DEFAULT_WINDOW"]

DEFAULT_WINDOW = 500
_FLOOR = 1e-4
_MAX_CHANNELS = 4096  # the monitor keeps window x channels floats: a reference cannot make it allocate more
_MAX_BINS = 1000


def psi(live_counts: Sequence[float], ref_counts: Sequence[float]) -> float:
    """Population stability index of two histograms over the same bins (counts, not fractions)."""
    p = np.asarray(live_counts, dtype=np.float64)
    q = np.asarray(ref_counts, dtype=np.float64)
    p = np.maximum(p / max(p.sum(), 1.0), _FLOOR)
    q = np.maximum(q / max(q.sum(), 1.0), _FLOOR)
    return float(np.sum((p - q) * np.log(p / q)))


def psi_level(value: Optional[float]) -> Optional[str]:
    """``stable`` (< 0.1), ``moderate`` (0.1 - 0.25) or ``significant`` (> 0.25)."""
    if value is None:
        return None
    return "stable" if value < 0.1 else "moderate" if value <= 0.25 else "significant"


@dataclass(frozen=True)
class Drift:
    """Drift over the last ``samples`` inferences (``None`` where nothing was seen or no reference)."""

    samples: int
    window: int
    input_z: Optional[Tuple[float, ...]]
    input_z_max: Optional[float]
    confidence_mean: Optional[float]
    confidence_mean_ref: Optional[float]
    confidence_psi: Optional[float]
    level: Optional[str]

    def to_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        out["input_z"] = None if self.input_z is None else list(self.input_z)
        return out


def _floats(value: Any, limit: int) -> Optional[np.ndarray]:
    if not isinstance(value, (list, tuple)) or not 0 < len(value) <= limit:
        return None
    try:
        arr = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError, OverflowError):
        return None
    return arr if 0 < arr.size <= limit and np.all(np.isfinite(arr)) else None


class DriftMonitor:
    """Per-inference bookkeeping against ``reference`` (the manifest's ``reference`` block).

    Raises ValueError when the reference has neither usable input statistics
    nor a usable confidence histogram; :func:`monitor_for` turns that into None.
    """

    def __init__(self, reference: Mapping[str, Any], *, window: int = DEFAULT_WINDOW):
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window={window!r} must be a positive int")
        ref = reference if isinstance(reference, Mapping) else {}
        inp = ref.get("input") if isinstance(ref.get("input"), Mapping) else {}
        conf = ref.get("confidence") if isinstance(ref.get("confidence"), Mapping) else {}
        mean, std = _floats(inp.get("mean"), _MAX_CHANNELS), _floats(inp.get("std"), _MAX_CHANNELS)
        if mean is None or std is None or mean.shape != std.shape or np.any(std <= 0):
            mean = std = None
        hist = conf.get("histogram") if isinstance(conf.get("histogram"), Mapping) else {}
        edges, counts = _floats(hist.get("edges"), _MAX_BINS + 1), _floats(hist.get("counts"), _MAX_BINS)
        if (edges is None or counts is None or edges.size != counts.size + 1 or counts.sum() <= 0
                or np.any(np.diff(edges) <= 0)):
            edges = counts = None
        if mean is None and counts is None:
            raise ValueError("reference has neither input.mean/std nor a confidence histogram")
        self.window = window
        self._mean, self._std = mean, std
        self._ref_counts = counts
        self._inner_edges = [] if edges is None else [float(e) for e in edges[1:-1]]  # bin i: edges[i] <= c < edges[i+1]
        c_mean = conf.get("mean")
        self._conf_mean_ref = float(c_mean) if isinstance(c_mean, (int, float)) and math.isfinite(c_mean) else None
        channels = 1 if mean is None else mean.size
        self._means = np.zeros((window, channels), dtype=np.float64)
        self._conf = np.zeros(window, dtype=np.float64)
        self._bins = np.zeros(window, dtype=np.intp)
        self._n = 0  # inferences seen since the last reset (written to the arrays)
        self._channels = None if self._mean is None else int(self._mean.size)
        self._pending_means: list = []  # inferences since the last write to the arrays: they go in a block
        self._pending_conf: list = []

    @property
    def channels(self) -> Optional[int]:
        """How many per-channel means :meth:`update` expects (None when the reference has no input stats)."""
        return self._channels

    def reset(self) -> None:
        self._n = 0
        self._pending_means, self._pending_conf = [], []

    def update(self, channel_mean: Any, confidence: float) -> None:
        """One inference: the per-channel mean of its model input, and its top-1 confidence (kept in a list,
        written to the window in a block: two appends here instead of three numpy item writes)."""
        if self._mean is not None:
            self._pending_means.append(channel_mean)
        self._pending_conf.append(confidence)
        if len(self._pending_conf) >= 256:
            self._settle()

    def _settle(self) -> None:
        """Write the pending inferences into the window, in order (the same values :meth:`update` once wrote)."""
        conf = self._pending_conf
        if not conf:
            return
        means = self._pending_means
        self._pending_means, self._pending_conf = [], []
        if len(conf) > self.window:  # only the newest window's worth can still be in it
            skip = len(conf) - self.window
            self._n += skip
            conf, means = conf[skip:], means[skip:]
        idx = (self._n + np.arange(len(conf))) % self.window
        c = np.asarray(conf, dtype=np.float64)
        if self._mean is not None:
            self._means[idx] = np.asarray(means, dtype=np.float64).reshape(len(conf), -1)
        self._conf[idx] = c
        self._bins[idx] = np.searchsorted(self._inner_edges, c, side="right")  # = bisect_right, item by item
        self._n += len(conf)

    def snapshot(self) -> Drift:
        self._settle()
        n = min(self._n, self.window)
        z = z_max = c_mean = value = None
        if n:
            if self._mean is not None:
                zs = (self._means[:n].mean(axis=0) - self._mean) / self._std
                z = tuple(round(float(v), 4) for v in zs)
                z_max = round(float(np.max(np.abs(zs))), 4)
            c_mean = round(float(self._conf[:n].mean()), 6)
            if self._ref_counts is not None:
                live = np.bincount(self._bins[:n], minlength=self._ref_counts.size)
                value = round(psi(live, self._ref_counts), 4)
        return Drift(samples=n, window=self.window, input_z=z, input_z_max=z_max, confidence_mean=c_mean,
                     confidence_mean_ref=self._conf_mean_ref, confidence_psi=value, level=psi_level(value))


def monitor_for(reference: Optional[Mapping[str, Any]], *, window: int = DEFAULT_WINDOW) -> Optional[DriftMonitor]:
    """A monitor for a manifest's ``reference`` block, or None when it has nothing usable."""
    try:
        return DriftMonitor(reference or {}, window=window)
    except ValueError:
        return None


def channel_means(x: np.ndarray, channels: int) -> Any:
    """The per-channel (last axis) mean of one model input; a float when ``channels`` is 1."""
    if channels == 1:
        return float(x.mean())
    return [float(x[..., j].mean()) for j in range(channels)]  # strided per channel: cheaper than axis 0
