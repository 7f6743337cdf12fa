"""What the agent prepares once per bundle so that each inference costs little (used by :class:`~device_agent.agent.Agent`).

* 8-bit pictures already at the model's size go in through one table lookup (:mod:`.lut`), written into a
  buffer of the model's own input shape, set with the interpreter's own bound methods;
* an 8-bit output is read through its score table (:func:`.classify.classify_table`), and the prediction of
  each distinct output is kept (``_MEMO_MAX`` of them): a confident softmax is the same few bytes again and
  again (on the 1,797 scikit-learn digits, 386 distinct outputs; 78% of inferences find theirs kept);
* the drift window's per-channel means are read from the raw bytes (a strided subsample for big pictures).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Dict, Optional

import numpy as np

from .classify import Prediction, classify_table
from .inputcheck import InputCheck
from .lut import lookup_table
from ..sampling.drift import DriftMonitor, channel_means, monitor_for

__all__ = ["FastPath", "classified"]

_log = logging.getLogger("device_agent.agent")

_MEMO_MAX = 2048  # distinct 8-bit outputs whose prediction is kept (~700 bytes each by tracemalloc: <= ~1.4 MiB)


class FastPath:
    """Mixin of :class:`~device_agent.agent.Agent`: needs ``self.model``, ``self.manifest`` and ``log``."""

    model: Any
    manifest: Any

    def _prepare_fast_path(self) -> None:
        self._check = InputCheck(self.manifest.preprocessing, self.manifest.reference)
        self._fits = self._check.expected if self._check.integer else None  # a dtype that needs no look at the values
        self._lut, self._lut_shape = self._lookup_table()
        if self._lut is not None:  # the lookup writes into a buffer of the model's own shape, set as it is
            self._qin = np.empty(self.model.input_spec.shape, dtype=self._lut.dtype)
            self._qbuf = self._qin.reshape(self._lut_shape)  # a view of it in the picture's shape
            self._qbuf_u8 = self._qbuf.view(np.uint8)
        self._set_input, self._invoke, self._output = self.model.calls()
        small = int(np.prod(self.model.output_spec.shape)) <= 64  # classify()'s arithmetic on Python floats
        self._scores = self.model.score_table() if small else None
        # An 8-bit output has few distinct values in practice (a confident softmax is one byte at the top, the
        # rest at the bottom): its prediction, and the rounded figures of its result line, computed once per
        # distinct output. The same immutable values classify_table() gives; bounded, emptied when full.
        self._memo: Dict[bytes, tuple] = {}
        self._lut_kind = "take"
        if self._lut is not None:
            every = np.arange(256, dtype=np.uint8)
            if self._lut.dtype == np.uint8 and np.array_equal(self._lut, every):
                self._lut_kind = "identity"
            elif self._lut.dtype == np.int8 and np.array_equal(self._lut, (every ^ np.uint8(128)).view(np.int8)):
                self._lut_kind = "xor"
            elif self._lut.dtype.itemsize == 1:  # bytes.translate: the same lookup, ~25% faster than np.take
                self._lut_kind = "translate"
                self._lut_bytes = self._lut.view(np.uint8).tobytes()

    def _prepare_drift(self) -> None:
        """A fresh drift window against this bundle's ``reference`` (None for bundles without one)."""
        self.drift: Optional[DriftMonitor] = monitor_for(self.manifest.reference)
        c = self.drift.channels if self.drift is not None else None
        last = int(self.model.input_spec.shape[-1]) if len(self.model.input_spec.shape) else 1
        if c is not None and c != 1 and c != last:
            _log.warning("bundle %s v%s: reference has %d input channels but the model input %s; drift is off",
                        self.manifest.name, self.manifest.version, c, list(self.model.input_spec.shape))
            self.drift = None
        self._drift_k = self._drift_offset = 0.0
        self._drift_step = 1
        if self._lut is not None:  # the fast path: model input = raw * scale + offset, value by value
            pre, (h, w, _) = self.manifest.preprocessing, self._lut_shape
            # Big images: the mean of every s-th row and column (<= 1024 pixels) costs a few us, all of them 100+.
            s = self._drift_step = max(1, math.ceil(math.sqrt(h * w / 1024)))
            pixels = len(range(0, h, s)) * len(range(0, w, s))
            self._drift_k, self._drift_offset = float(pre.scale) / pixels, float(pre.offset)

    def _feed_drift(self, raw: np.ndarray, x: Optional[np.ndarray], confidence: float) -> None:
        """Per-channel mean of the model input (from the raw bytes on the fast path) and the confidence."""
        drift = self.drift
        c = drift.channels
        if c is None:
            mean: Any = 0.0
        elif x is not None:
            mean = channel_means(x, c)
        else:
            s, k, offset = self._drift_step, self._drift_k, self._drift_offset
            sub = raw[::s, ::s] if s > 1 else raw
            if c == 1:  # up to 256 bytes, Python's sum over the bytes beats a numpy reduction in the loop
                mean = (sum(sub.tobytes()) if sub.size <= 256 else float(sub.sum())) * k + offset
            else:  # one strided sum per channel: far cheaper than a sum over axis 0 of (pixels, c)
                mean = [float(sub[:, :, j].sum()) * k + offset for j in range(c)]
        drift.update(mean, confidence)

    def _lookup_table(self):
        return lookup_table(self.manifest.preprocessing, self.model.input_spec)

    def _known(self, out: np.ndarray, scores, labels, activation: str):
        """``_classified(classify_table(out, ...))``, once per distinct output."""
        key = out.tobytes()
        known = self._memo.get(key)
        if known is None:
            known = classified(classify_table(out, scores, labels, activation))
            if len(self._memo) >= _MEMO_MAX:
                self._memo.clear()
            self._memo[key] = known
        return known


def classified(pred: Prediction) -> tuple:
    """A prediction with the rounded figures its result line carries."""
    return pred, round(pred.confidence, 6), round(pred.margin, 6), round(pred.entropy, 6) + 0.0

