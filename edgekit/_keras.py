"""The one module that decides which Keras edgekit uses.

QAT (tensorflow-model-optimization) needs Keras 2, which TensorFlow >= 2.16
ships as the separate ``tf_keras`` package and selects with
``TF_USE_LEGACY_KERAS=1``. That variable must be set before TensorFlow is
first imported, so every edgekit module gets TensorFlow, Keras and tfmot from
here and nowhere else.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402


def tfmot():
    """tensorflow_model_optimization, imported on first use (it is slow to import)."""
    import tensorflow_model_optimization as _tfmot

    return _tfmot


def tflite_flatbuffer():
    """TensorFlow's reader of ``.tflite`` flatbuffers (``flatbuffer_utils``), to inspect a converted model's weights."""
    from tensorflow.lite.tools import flatbuffer_utils

    return flatbuffer_utils


__all__ = ["tf", "keras", "tfmot", "tflite_flatbuffer"]
