"""Convert: a Keras model and data become a proven int8 bundle.

``load`` reads Keras files, ``quantize`` does QAT / PTQ, ``evaluate`` and ``report``
prove what changed, ``bundle`` writes it atomically, ``pipeline`` ties them together::

    from edgekit.convert import convert
    convert("model.keras", load_dataset("digits"), mode="qat", output="bundles/v1")

``prune`` and ``distill`` shrink a model further (docs/shrink.md)::

    convert("model.keras", data, mode="qat", output="bundles/p50", prune=PruneSpec(0.5))
    distill("model.keras", data, student="tiny", output="bundles/tiny")
"""

from __future__ import annotations

from .distill import DistillResult, distill
from .pipeline import MODES, ConvertResult, convert, load_model, reference_stats
from .prune import PruneSpec

__all__ = ["MODES", "ConvertResult", "convert", "load_model", "reference_stats", "PruneSpec", "distill", "DistillResult"]
