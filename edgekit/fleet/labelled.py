"""Both models on the labelled samples: accuracy and the exact McNemar test (``edgekit fleet rollout status --store``).

Flagged samples come back to the store; once someone labels them (``edgekit samples label``, ``edgekit label``),
the current and the candidate bundle each classify their raw inputs on the host through the board's own code
path (:func:`device_agent.inference.preprocess.preprocess`, the bundle's TFLite interpreter, and
:func:`device_agent.inference.classify.classify`, as ``edgekit evaluate`` does). Each model is right or wrong on
each sample; the pairs where exactly one is right are the *discordant* ones: ``b`` (current right, candidate
wrong) and ``c`` (current wrong, candidate right). Under "neither is better" each discordant pair falls either way
with probability 1/2, so ``b ~ Binomial(b + c, 1/2)``; the one-sided exact p value that the candidate is worse is
``P(X >= b)``.

The samples: the labelled samples of the cohort's boards received since the rollout started; when fewer than
``min_labelled``, every labelled sample of the fleet in the store (the report says which).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import EdgekitError

__all__ = ["binomial_tail", "mcnemar_exact", "Labelled", "predict_labels", "compare_on_labels"]


def binomial_tail(k: int, n: int) -> float:
    """``P(X >= k)`` for ``X ~ Binomial(n, 1/2)``, exactly (integer sums; no scipy)."""
    if n < 0 or k > n + 1:
        raise ValueError(f"k={k}, n={n}: need n >= 0")
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    term, total = math.comb(n, k), 0
    for i in range(k, n + 1):  # C(n, i+1) = C(n, i) (n - i) / (i + 1): one big-int step per term
        total += term
        term = term * (n - i) // (i + 1)
    return total / 2 ** n  # int / int: correctly rounded


def mcnemar_exact(b: int, c: int) -> Tuple[float, float]:
    """The exact (binomial) McNemar test on ``b`` (current right, candidate wrong) and ``c`` (the reverse).

    Returns ``(p_worse, p_two_sided)``: the one-sided p value of "the candidate is worse" (``P(X >= b)``,
    ``X ~ Binomial(b + c, 1/2)``) and the usual two-sided one (twice the smaller tail, at most 1).
    No discordant pair gives ``(1, 1)``.
    """
    if b < 0 or c < 0:
        raise ValueError(f"b={b}, c={c} must be >= 0")
    n = b + c
    if n == 0:
        return 1.0, 1.0
    worse = binomial_tail(b, n)
    better = binomial_tail(c, n)  # P(X <= b) = P(X' >= c) by symmetry
    return worse, min(1.0, 2 * min(worse, better))


@dataclass
class Labelled:
    """What both models did on the labelled samples."""

    samples: str  # which samples: "cohort since the rollout started" | "all labelled samples of the fleet"
    n: int  # samples both models classified
    current_correct: int
    candidate_correct: int
    b: int  # current right, candidate wrong
    c: int  # current wrong, candidate right
    p_worse: float
    p_two_sided: float
    skipped: int = 0  # labelled samples a model could not take (input shape, dtype) or marked invalid
    current: str = ""  # the current bundle's name and version
    candidate: str = ""

    @property
    def current_accuracy(self) -> Optional[float]:
        return self.current_correct / self.n if self.n else None

    @property
    def candidate_accuracy(self) -> Optional[float]:
        return self.candidate_correct / self.n if self.n else None

    def to_dict(self) -> Dict[str, Any]:
        return dict(asdict(self), current_accuracy=self.current_accuracy, candidate_accuracy=self.candidate_accuracy)

    def describe(self) -> str:
        if not self.n:
            return f"no labelled sample both models could classify ({self.samples}; {self.skipped} skipped)"
        return (f"on {self.n} labelled samples ({self.samples}) accuracy {self.current} {self.current_accuracy:.3f}, "
                f"candidate {self.candidate} {self.candidate_accuracy:.3f}; discordant pairs: {self.b} only the "
                f"current right, {self.c} only the candidate right; exact McNemar one-sided p = {self.p_worse:.3g}")


def predict_labels(bundle_path: Any, arrays: Sequence[np.ndarray], runtime: str = "auto") -> List[Optional[str]]:
    """The label a board running ``bundle_path`` gives each raw input (None where its preprocessing or
    interpreter refuses the input): the board's own preprocessing, interpreter and classification."""
    from device_agent.inference.classify import classify
    from device_agent.inference.interpreter import TFLiteModel
    from device_agent.errors import InputError
    from device_agent.inference.preprocess import preprocess
    from device_agent.update.manifest import load_bundle

    bundle = load_bundle(bundle_path)
    m = bundle.manifest
    out: List[Optional[str]] = []
    with TFLiteModel.open(bundle.model_path, runtime=runtime) as model:
        for raw in arrays:
            try:
                scores = model(preprocess(raw, m.preprocessing))
            except (InputError, RuntimeError, ValueError, MemoryError):
                out.append(None)
                continue
            out.append(classify(scores, m.labels, m.output_activation).label)
    return out


def _name(bundle_path: Any) -> str:
    from device_agent.update.manifest import load_bundle

    m = load_bundle(bundle_path, verify=False).manifest
    return f"v{m.version}"


def compare_on_labels(store: Any, fleet: str, cohort: Sequence[str], since: float, current: Any, candidate: Any,
                      *, min_labelled: int = 30, runtime: str = "auto") -> Labelled:
    """Both bundles on the labelled samples in ``store`` (module docstring: which ones)."""
    from ..loop.store import INVALID_LABEL

    if current is None:
        raise EdgekitError("accuracy on labelled samples needs the bundle the boards run now: push with --previous "
                           "DIR, or pass --previous DIR to `edgekit fleet rollout status`")
    every = [r for r in store.list_samples(fleet=fleet, labeled=True) if r.label != INVALID_LABEL]
    members = set(cohort)
    recent = [r for r in every if r.device in members and r.received_at >= since]
    if len(recent) >= min_labelled:
        records, which = recent, "the cohort's boards since the rollout started"
    else:
        records, which = every, (f"all labelled samples of fleet {fleet}: the cohort sent {len(recent)} since the "
                                 f"rollout started, fewer than {min_labelled}")
    arrays, skipped = [], 0
    keep = []
    for r in records:
        try:
            arrays.append(r.array())
            keep.append(r)
        except (ValueError, TypeError):
            skipped += 1
    cur = predict_labels(current, arrays, runtime) if arrays else []
    cand = predict_labels(candidate, arrays, runtime) if arrays else []
    n = cc = kc = b = c = 0
    for r, p, q in zip(keep, cur, cand):
        if p is None or q is None:
            skipped += 1
            continue
        n += 1
        ok_cur, ok_cand = p == r.label, q == r.label
        cc += ok_cur
        kc += ok_cand
        b += ok_cur and not ok_cand
        c += ok_cand and not ok_cur
    worse, two = mcnemar_exact(b, c)
    return Labelled(which, n, cc, kc, b, c, worse, two, skipped, _name(current), _name(candidate))
