"""Scores to a prediction: top-1, confidence, margin, entropy, top-k.

Results are small immutable types (as pycoral's ``Class``). When the model
emits logits, softmax is applied first (the logistic function for a single
logit: a binary classifier), so confidence is always a probability.
Quantized softmax outputs rarely sum to exactly 1, so they are normalized: the
confidence the board compares with its threshold is the one the host derived
the threshold from (:func:`probabilities_batch` is the same arithmetic over a
whole test set).

Classifiers have few classes; for up to ``_SMALL`` of them the arithmetic runs on
Python floats, which after an ``invoke()`` is several times faster than a chain of
numpy calls on a tiny array (the agent pays this on every inference).
"""

from __future__ import annotations

import math
from typing import Any, List, NamedTuple, Sequence, Tuple

import numpy as np

__all__ = ["Class", "Prediction", "probabilities", "probabilities_batch", "classify", "classify_table"]

_SMALL = 64


class Class(NamedTuple):
    index: int
    label: str
    score: float


class Prediction(NamedTuple):
    index: int
    label: str
    confidence: float  # top-1 probability
    margin: float  # top-1 minus top-2 probability
    entropy: float  # in nats, of the probability vector
    top_k: Tuple[Class, ...]

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "index": self.index,
            "confidence": round(self.confidence, 6),
            "margin": round(self.margin, 6),
            "entropy": round(self.entropy, 6),
            "top_k": [{"label": c.label, "index": c.index, "score": round(c.score, 6)} for c in self.top_k],
        }


def _sigmoid(v: float) -> float:
    return v if 0.0 <= v <= 1.0 else 1.0 / (1.0 + math.exp(-v))


def _logistic(v: float) -> float:
    if v >= 0.0:
        return 1.0 / (1.0 + math.exp(-v))
    e = math.exp(v)
    return e / (1.0 + e)


def _probs_list(s: List[float], activation: str) -> List[float]:
    if activation == "logits" and len(s) == 1:  # one logit: a binary classifier (Dense(1), from_logits=True)
        p = _logistic(s[0])
        return [1.0 - p, p]
    if activation == "logits":
        top = max(s)
        e = [math.exp(v - top) for v in s]
        total = sum(e)
        return [v / total for v in e]
    if activation == "sigmoid" and len(s) == 1:
        p = _sigmoid(s[0])
        return [1.0 - p, p]
    s = [v if v > 0.0 else 0.0 for v in s]
    total = sum(s)
    return [v / total for v in s] if total > 0 else [1.0 / len(s)] * len(s)


def probabilities(scores: np.ndarray, activation: str = "softmax") -> np.ndarray:
    """Scores as probabilities summing to 1 (softmax for logits)."""
    return np.asarray(_probs_list(np.asarray(scores, dtype=np.float64).reshape(-1).tolist(), activation))


def probabilities_batch(scores: np.ndarray, activation: str = "softmax") -> np.ndarray:
    """:func:`probabilities` for every row of a (N, classes) array, vectorized."""
    s = np.asarray(scores, dtype=np.float64)
    if activation == "logits" and s.shape[1] == 1:
        p = 0.5 * (1.0 + np.tanh(0.5 * s[:, 0]))  # the logistic function, without overflow
        return np.stack([1.0 - p, p], axis=1)
    if activation == "logits":
        e = np.exp(s - s.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    if activation == "sigmoid" and s.shape[1] == 1:
        v = s[:, 0]
        p = np.where((v >= 0.0) & (v <= 1.0), v, 1.0 / (1.0 + np.exp(-v)))
        return np.stack([1.0 - p, p], axis=1)
    s = np.clip(s, 0.0, None)
    total = s.sum(axis=1, keepdims=True)
    uniform = np.full_like(s, 1.0 / s.shape[1])
    return np.where(total > 0, s / np.where(total > 0, total, 1.0), uniform)


def classify(
    scores: np.ndarray, labels: Sequence[str], activation: str = "softmax", top_k: int = 3
) -> Prediction:
    """One vector of scores to a :class:`Prediction`."""
    flat = np.asarray(scores).reshape(-1)
    k = max(1, top_k)
    if flat.size <= _SMALL:
        return _predict(_probs_list(flat.astype(np.float64).tolist(), activation), labels, k)
    arr = probabilities(flat, activation)
    order = np.argsort(-arr, kind="stable")[: max(k, 2)].tolist()
    nz = arr[arr > 0]
    entropy = float(-(nz * np.log(nz)).sum())
    return _prediction(arr, order, entropy, labels, k)


def classify_table(raw: np.ndarray, table: Sequence[float], labels: Sequence[str], activation: str = "softmax",
                   top_k: int = 3) -> Prediction:
    """:func:`classify` of an 8-bit output read through ``table`` (raw byte -> its dequantized score,
    ``TFLiteModel.score_table()``): the same floats, hence the same prediction, without numpy arithmetic."""
    return _predict(_probs_list([table[b] for b in raw.view(np.uint8).ravel().tolist()], activation), labels,
                    max(1, top_k))


def _predict(p: List[float], labels: Sequence[str], k: int) -> Prediction:
    order = sorted(range(len(p)), key=p.__getitem__, reverse=True)  # stable: ties keep index order
    entropy = -math.fsum([v * math.log(v) for v in p if v > 0.0])
    return _prediction(p, order, entropy, labels, k)


def _prediction(p: Any, order: List[int], entropy: float, labels: Sequence[str], k: int) -> Prediction:
    n = len(labels)
    top = tuple([Class(i, labels[i] if i < n else str(i), float(p[i])) for i in order[:k]])
    conf = top[0].score
    second = float(p[order[1]]) if len(order) > 1 else 0.0
    return Prediction(order[0], top[0].label, conf, conf - second, entropy + 0.0, top)
