"""edgekit: the workstation side. Convert a Keras model to a proven int8 TFLite
bundle, collect what the boards flag, relabel, retrain, ship the next version.

Importing ``edgekit`` is cheap: TensorFlow is imported only by the stages that
need it (convert, evaluate, retrain), through :mod:`edgekit._keras`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import EdgekitError, DataError, ModelError, ConversionError, StoreError, OutputExistsError

__all__ = [
    "__version__",
    "EdgekitError",
    "DataError",
    "ModelError",
    "ConversionError",
    "StoreError",
    "OutputExistsError",
]
