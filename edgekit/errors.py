"""Exceptions raised by edgekit.

One root; the CLI catches it, prints ``Type: message`` and exits 1::

    EdgekitError
     +-- DataError          a data set is missing, unreadable or does not fit the model
     +-- ModelError         a model file is missing, corrupt or not a classifier
     +-- ConversionError    quantization or TFLite conversion failed
     +-- StoreError         the sample store cannot be opened or queried
     |    +-- LabelConflictError  someone else changed a label while it was open
 +-- BrokerError        the MQTT broker cannot be reached or refused the collector
     +-- OutputExistsError  the output path exists (pass --force to replace it)

device_agent's ``AgentError`` (bundle, runtime, input, protocol errors) is
caught by the CLI the same way.
"""

from __future__ import annotations

__all__ = ["EdgekitError", "DataError", "ModelError", "ConversionError", "StoreError", "LabelConflictError", "BrokerError", "OutputExistsError"]


class EdgekitError(Exception):
    """Root of every error edgekit raises on purpose."""


class DataError(EdgekitError):
    """The data cannot be read or does not fit the model."""


class ModelError(EdgekitError):
    """The model file cannot be loaded or used."""


class ConversionError(EdgekitError):
    """Quantization or conversion to TFLite failed."""


class StoreError(EdgekitError):
    """The sample store cannot be opened or queried."""


class LabelConflictError(StoreError):
    """A label was changed by someone else since it was read; nothing was overwritten.

    ``current`` holds the sample's label as it is now (label, label_version, labeled_by, labeled_at).
    """

    def __init__(self, message: str, current: "dict | None" = None) -> None:
        super().__init__(message)
        self.current = dict(current or {})


class BrokerError(EdgekitError):
    """The MQTT broker cannot be reached or refused the connection or a subscription."""


class OutputExistsError(EdgekitError):
    """The output path exists already."""
