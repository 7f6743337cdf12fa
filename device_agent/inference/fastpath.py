"""What the agent prepares once per bundle so that each inference costs little (used by :class:`~device_agent.agent.Agent`).

* 8-bit pictures already at the model's size go in through one table lookup (:mod:`.lut`), written into a
  buffer of the model's own input shape, set with the interpreter's own bound methods;
* an 8-bit output is read through its score table (:func:`.classify.classify_table`), and the prediction of
  each distinct output is kept (``_MEMO_MAX`` of them): a confident softmax is the same few bytes again and
  again (on the 1,797 scikit-learn digits, 386 distinct outputs; 78% of inferences find theirs kept);
* the drift window's per-channel means are read from the raw bytes (a strided subsample for big pictures).

:func:`prepare` computes all of it for a model and its manifest without touching the agent; the agent takes it
in one go (at start-up, and when an update swaps a bundle in: a bundle whose preparation fails changes nothing).
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

__all__ = ["FastPath", "classified", "prepare"]

_log = logging.getLogger("device_agent.agent")

_MEMO_MAX = 2048  # distinct 8-bit outputs whose prediction is kept (~700 bytes each by tracemalloc: <= ~1.4 MiB)


def prepare(model: Any, manifest: Any) -> Dict[str, Any]:
    """Everything the loop reads for ``model`` running ``manifest`` (the fast path's and the drift window's state),
    as the agent attributes it becomes, computed without touching any agent.

    A bundle update prepares this before anything of the running bundle changes (update/live.py): when it raises,
    the agent still runs its bundle as before, model, manifest and fast path alike.
    """
    st: Dict[str, Any] = {}
    st["_check"] = check = InputCheck(manifest.preprocessing, manifest.reference)
    st["_fits"] = check.expected if check.integer else None  # a dtype that needs no look at the values
    lut, lut_shape = lookup_table(manifest.preprocessing, model.input_spec)
    st["_lut"], st["_lut_shape"] = lut, lut_shape
    st["_qin"] = st["_qbuf"] = st["_qbuf_u8"] = st["_lut_bytes"] = None
    if lut is not None:  # the lookup writes into a buffer of the model's own shape, set as it is
        st["_qin"] = qin = np.empty(model.input_spec.shape, dtype=lut.dtype)
        st["_qbuf"] = qbuf = qin.reshape(lut_shape)  # a view of it in the picture's shape
        st["_qbuf_u8"] = qbuf.view(np.uint8)
    small = int(np.prod(model.output_spec.shape)) <= 64  # classify()'s arithmetic on Python floats
    st["_scores"] = model.score_table() if small else None
    # An 8-bit output has few distinct values in practice (a confident softmax is one byte at the top, the
    # rest at the bottom): its prediction, and the rounded figures of its result line, computed once per
    # distinct output. The same immutable values classify_table() gives; bounded, emptied when full.
    st["_memo"] = {}
    st["_lut_kind"] = "take"
    if lut is not None:
        every = np.arange(256, dtype=np.uint8)
        if lut.dtype == np.uint8 and np.array_equal(lut, every):
            st["_lut_kind"] = "identity"
        elif lut.dtype == np.int8 and np.array_equal(lut, (every ^ np.uint8(128)).view(np.int8)):
            st["_lut_kind"] = "xor"
        elif lut.dtype.itemsize == 1:  # bytes.translate: the same lookup, ~25% faster than np.take
            st["_lut_kind"] = "translate"
            st["_lut_bytes"] = lut.view(np.uint8).tobytes()
    st.update(_drift_state(model, manifest, lut_shape if lut is not None else None))
    # Last: nothing after this can fail, so the interpreter's bound calls never outlive a preparation that did.
    st["_set_input"], st["_invoke"], st["_output"] = model.calls()
    return st


def _drift_state(model: Any, manifest: Any, lut_shape: Optional[tuple]) -> Dict[str, Any]:
    """A fresh drift window against the bundle's ``reference`` (None for bundles without one)."""
    drift = monitor_for(manifest.reference)
    c = drift.channels if drift is not None else None
    last = int(model.input_spec.shape[-1]) if len(model.input_spec.shape) else 1
    if c is not None and c != 1 and c != last:
        _log.warning("bundle %s v%s: reference has %d input channels but the model input %s; drift is off",
                     manifest.name, manifest.version, c, list(model.input_spec.shape))
        drift = None
    st: Dict[str, Any] = {"drift": drift, "_drift_k": 0.0, "_drift_offset": 0.0, "_drift_step": 1}
    if lut_shape is not None:  # the fast path: model input = raw * scale + offset, value by value
        pre, (h, w, _) = manifest.preprocessing, lut_shape
        # Big images: the mean of every s-th row and column (<= 1024 pixels) costs a few us, all of them 100+.
        s = st["_drift_step"] = max(1, math.ceil(math.sqrt(h * w / 1024)))
        pixels = len(range(0, h, s)) * len(range(0, w, s))
        st["_drift_k"], st["_drift_offset"] = float(pre.scale) / pixels, float(pre.offset)
    return st


class FastPath:
    """Mixin of :class:`~device_agent.agent.Agent`: needs ``self.model``, ``self.manifest`` and ``log``."""

    model: Any
    manifest: Any
    drift: Optional[DriftMonitor]

    def _prepare_fast_path(self) -> None:
        """The fast path and a fresh drift window for the agent's own model and manifest (at start-up)."""
        self._use_prepared(prepare(self.model, self.manifest))

    def _use_prepared(self, state: Dict[str, Any]) -> None:
        """Take what :func:`prepare` computed (plain assignments: nothing here can fail half-way)."""
        self.__dict__.update(state)

    def _drop_calls(self) -> None:
        """Forget the interpreter's bound calls (they keep it alive): once the model is closed, it can be freed."""
        self._set_input = self._invoke = self._output = None

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

