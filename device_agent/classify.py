"""Scores to a prediction: top-1, confidence, margin, entropy, top-k.

Results are small immutable types (as pycoral's ``Class``). When the model
emits logits, softmax is applied first, so confidence is always a probability.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence, Tuple

import numpy as np

__all__ = ["Class", "Prediction", "probabilities", "classify"]


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


def probabilities(scores: np.ndarray, activation: str = "softmax") -> np.ndarray:
    """Scores as probabilities summing to 1 (softmax for logits)."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if activation == "logits":
        e = np.exp(s - s.max())
        return e / e.sum()
    if activation == "sigmoid" and s.size == 1:
        p = 1.0 / (1.0 + math.exp(-float(s[0]))) if not (0.0 <= s[0] <= 1.0) else float(s[0])
        return np.array([1.0 - p, p])
    s = np.clip(s, 0.0, None)
    total = s.sum()
    return s / total if total > 0 else np.full_like(s, 1.0 / s.size)


def classify(
    scores: np.ndarray, labels: Sequence[str], activation: str = "softmax", top_k: int = 3
) -> Prediction:
    """One vector of scores to a :class:`Prediction`."""
    p = probabilities(scores, activation)
    order = np.argsort(-p, kind="stable")
    first = int(order[0])
    second = float(p[order[1]]) if p.size > 1 else 0.0
    nz = p[p > 0]
    entropy = float(-(nz * np.log(nz)).sum())

    def name(i: int) -> str:
        return labels[i] if i < len(labels) else str(i)

    top = tuple(Class(int(i), name(int(i)), float(p[i])) for i in order[: max(1, top_k)])
    return Prediction(first, name(first), float(p[first]), float(p[first]) - second, entropy, top)
