"""Exceptions raised by edgekit.

One root; the CLI catches it, prints ``Type: message`` and exits 1::

    EdgekitError
     +-- DataError          a data set is missing, unreadable or does not fit the model
     +-- ModelError         a model file is missing, corrupt or not a classifier
     +-- ConversionError    quantization or TFLite conversion failed
     +-- StoreError         the sample store cannot be opened or queried
     |    +-- LabelConflictError  someone else changed a label while it was open
 +-- BrokerError        the MQTT broker cannot be reached or refused the collector
     +-- IdentityError      a CA, certificate or enrolment is missing, unreadable or conflicts
     +-- SigningError       a signing key is missing or unusable, or a bundle is unsigned where it must be signed
     +-- OutputExistsError  the output path exists (pass --force to replace it)

device_agent's ``AgentError`` (bundle, runtime, input, protocol errors) is
caught by the CLI the same way.
"""

from __future__ import annotations

__all__ = ["EdgekitError", "DataError", "ModelError", "ConversionError", "StoreError", "LabelConflictError", "BrokerError",
           "IdentityError", "SigningError", "OutputExistsError"]


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


class IdentityError(EdgekitError):
    """A CA, certificate or enrolment is missing, unreadable or conflicts (``edgekit fleet ca|enroll|revoke``)."""


class SigningError(EdgekitError):
    """A signing key is missing or unusable, or a bundle is not signed where it has to be."""


class OutputExistsError(EdgekitError):
    """The output path exists already."""
