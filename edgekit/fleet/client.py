"""The short-lived MQTT client of the fleet commands (push, rollout status): made, authenticated, connected and
looping in one call, or one BrokerError line that says why not."""

from __future__ import annotations

import time
from typing import Any, Optional, Tuple

from ..errors import BrokerError


def start_client(broker_url: str, name: str, *, protocol_version: str = "5", ca_file: Optional[str] = None,
                 cert_file: Optional[str] = None, key_file: Optional[str] = None, **callbacks: Any) -> Tuple[Any, Any]:
    """(paho client, parsed broker URL): client id ``edgekit-<name>-<n>``, the URL's credentials, TLS when the URL
    or ``ca_file`` asks, ``callbacks`` (``on_connect=...``) set, connected and its network loop started."""
    import paho.mqtt.client as mqtt

    from ..mqtt_url import parse_broker_url

    if protocol_version not in ("5", "3.1.1"):
        raise BrokerError(f"protocol_version={protocol_version!r} must be \"5\" or \"3.1.1\"")
    broker = parse_broker_url(broker_url)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"edgekit-{name}-{time.time_ns() % 10**12}",
                         protocol=mqtt.MQTTv5 if protocol_version == "5" else mqtt.MQTTv311)
    if broker.username:
        client.username_pw_set(broker.username, broker.password)
    if broker.tls or ca_file:
        client.tls_set(ca_certs=ca_file, certfile=cert_file, keyfile=key_file)
    for key, fn in callbacks.items():
        setattr(client, key, fn)
    try:
        client.connect(broker.host, broker.port, keepalive=60)
    except (OSError, ValueError) as exc:
        raise BrokerError(f"cannot connect to {broker.redacted()}: {exc}; is the broker running?") from exc
    client.loop_start()
    return client, broker
