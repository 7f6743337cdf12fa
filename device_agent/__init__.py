"""edgekit's board-side agent: runs int8 TFLite bundles on the CPU and sends
the inputs the model is unsure about back over MQTT, losing none.

Depends on numpy, paho-mqtt, psutil and one TFLite interpreter
(ai-edge-litert or tflite-runtime). Never imports tensorflow or edgekit.
This package also owns the contracts both sides share: the bundle manifest
(:mod:`device_agent.update.manifest`) and the MQTT topics and payloads
(:mod:`device_agent.delivery.protocol`).
"""

from __future__ import annotations

__version__ = "0.1.0"

from .inference.classify import Class, Prediction, classify, probabilities
from .errors import AgentError, BundleError, ConfigError, InputError, ProtocolError, RuntimeMissing
from .inference.interpreter import TFLiteModel, available_runtimes, dequantize, quantize
from .update.manifest import FORMAT, Bundle, Manifest, Preprocessing, TensorSpec, load_bundle, sha256_file
from .inference.preprocess import load_raw, preprocess
from .config import AgentConfig, load_config
from .sources import ArraySource
from .agent import Agent, RunStats

__all__ = [
    "__version__",
    "AgentError",
    "BundleError",
    "ConfigError",
    "InputError",
    "ProtocolError",
    "RuntimeMissing",
    "FORMAT",
    "Bundle",
    "Manifest",
    "Preprocessing",
    "TensorSpec",
    "load_bundle",
    "sha256_file",
    "TFLiteModel",
    "available_runtimes",
    "quantize",
    "dequantize",
    "Class",
    "Prediction",
    "classify",
    "probabilities",
    "load_raw",
    "preprocess",
    "AgentConfig",
    "load_config",
    "ArraySource",
    "Agent",
    "RunStats",
]
