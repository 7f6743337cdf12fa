"""Exceptions raised by device_agent.

One root, so a caller (the CLI, the agent loop) can catch everything the
package raises on purpose and print ``Type: message`` in one line::

    AgentError
     +-- ConfigError        a config file or flag is wrong (names the key)
     +-- BundleError        a bundle is missing, malformed or fails its sha256
     |    +-- SignatureError  unsigned, signed by a key the board does not trust, tampered, or an older release
     +-- RuntimeMissing     no TFLite interpreter package is installed
     +-- InputError         one input cannot be read or does not fit the model
     +-- ProtocolError      an MQTT payload does not follow docs/protocol.md

Every message says what is wrong and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "AgentError",
    "ConfigError",
    "BundleError",
    "SignatureError",
    "RuntimeMissing",
    "InputError",
    "ProtocolError",
]


class AgentError(Exception):
    """Root of every error device_agent raises on purpose."""


class ConfigError(AgentError):
    """A configuration value is missing or invalid."""


class BundleError(AgentError):
    """A bundle directory or archive cannot be used."""


class SignatureError(BundleError):
    """A bundle's signature or release counter is refused; ``reason`` is one of
    :data:`device_agent.update.signature.REASONS` (counted in telemetry)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class RuntimeMissing(AgentError):
    """No TFLite interpreter is installed (or the requested one is not)."""


class InputError(AgentError):
    """One input cannot be decoded or does not fit the model's input."""


class ProtocolError(AgentError):
    """A message does not follow the MQTT payload contract."""
