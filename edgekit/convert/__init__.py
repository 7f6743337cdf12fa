"""Convert: a Keras model and data become a proven int8 bundle.

``load`` reads Keras files, ``quantize`` does QAT / PTQ, ``evaluate`` and ``report``
prove what changed, ``bundle`` writes it atomically, ``pipeline`` ties them together::

    from edgekit.convert import convert
    convert("model.keras", load_dataset("digits"), mode="qat", output="bundles/v1")
"""

from __future__ import annotations

from .pipeline import MODES, ConvertResult, convert, load_model, reference_stats

__all__ = ["MODES", "ConvertResult", "convert", "load_model", "reference_stats"]
