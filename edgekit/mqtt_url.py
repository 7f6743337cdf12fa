"""Broker addresses as URLs: ``mqtt://user:pass@host:1883`` or ``mqtts://host:8883``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional
from urllib.parse import unquote, urlsplit

from .errors import EdgekitError

__all__ = ["BrokerURL", "parse_broker_url"]

_SCHEMES = {"mqtt": (False, 1883), "tcp": (False, 1883), "mqtts": (True, 8883), "ssl": (True, 8883)}


@dataclass(frozen=True)
class BrokerURL:
    host: str
    port: int
    tls: bool = False
    username: Optional[str] = None
    password: Optional[str] = None

    def redacted(self) -> str:
        """The URL for logs: the password never appears."""
        user = f"{self.username}:***@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerURL:
    """``mqtt(s)://[user[:pass]@]host[:port]``; a bare ``host[:port]`` means ``mqtt://``."""
    if not isinstance(url, str) or not url.strip():
        raise EdgekitError("broker URL is empty; use mqtt://host:1883 or mqtts://host:8883")
    text = url.strip()
    if "://" not in text:
        text = "mqtt://" + text
    parts = urlsplit(text)
    if parts.scheme not in _SCHEMES:
        raise EdgekitError(f"broker URL scheme={parts.scheme!r} is not supported; use mqtt:// or mqtts://")
    tls, default_port = _SCHEMES[parts.scheme]
    try:
        port = parts.port or default_port
    except ValueError as exc:
        raise EdgekitError(f"broker URL {url!r} has a bad port ({exc}); use mqtt://host:1883") from exc
    if not parts.hostname:
        raise EdgekitError(f"broker URL {url!r} has no host; use mqtt://host:1883")
    if parts.path not in ("", "/"):
        raise EdgekitError(f"broker URL {url!r} has a path; MQTT URLs are mqtt://host:port only")
    return BrokerURL(
        host=parts.hostname,
        port=port,
        tls=tls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )
