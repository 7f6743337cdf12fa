"""The model version each board should run (``edgekit fleet push``).

A push publishes the bundle as a retained ``edgekit.bundle/1`` on each board's
``.../<device>/bundle`` topic (docs/protocol.md, "Model updates"): a board
that is offline gets it when it connects. Boards with ``[update] trusted_keys``
run only bundles signed by one of those keys, with a release above the last
they accepted: :func:`sign_for_push` signs (or refuses) before anything is sent,
and a rollback is the old bundle signed again as a new release.
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from device_agent.delivery import protocol

from ..errors import BrokerError

__all__ = ["PushResult", "bundle_message", "push_bundle", "sign_for_push"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PushResult:
    """One board's bundle message: acknowledged by the broker (``ok``) or why not."""

    fleet: str
    device: str
    topic: str
    ok: bool
    detail: str = ""


def bundle_message(bundle: Any, *, max_bytes: int = protocol.DEFAULT_MAX_BUNDLE_BYTES) -> Tuple[Dict[str, Any], bytes]:
    """Verify ``bundle`` (a directory or ``.tar.gz``) as a board would, pack it; the payload dict and its bytes.

    A bundle that does not load (missing, corrupt, sha256 mismatch) or is over
    ``max_bytes`` raises with one line; nothing is published.
    """
    from device_agent.update.manifest import load_bundle

    from ..convert.bundle import pack

    path = Path(bundle)
    load_bundle(path)  # what the board will check first: manifest, model sha256
    if path.is_dir():
        with tempfile.TemporaryDirectory(prefix="edgekit-push-") as tmp:
            archive = pack(path, Path(tmp) / f"{path.name}.tar.gz").read_bytes()
    else:
        archive = path.read_bytes()
    payload = protocol.bundle_payload(archive, max_bytes=max_bytes)
    return payload, json.dumps(payload, separators=(",", ":")).encode("utf-8")


def sign_for_push(bundle: Any, *, key: Any = None, allow_unsigned: bool = False, resign: bool = False,
                  release: Optional[int] = None, dry_run: bool = False) -> str:
    """Make sure ``bundle`` goes out signed, as boards with ``[update] trusted_keys`` need it; one line saying how.

    With ``key`` (a path or :class:`~edgekit.fleet.keys.SigningKey`) an unsigned bundle, or one signed by another
    key, is signed in place with the next release; one this key signed goes as it is. ``resign`` (a rollback)
    always signs it again as a new release. Without ``key`` an unsigned bundle is refused unless
    ``allow_unsigned``. ``dry_run`` signs nothing and says what it would do.
    """
    from device_agent.update.manifest import load_bundle

    from ..errors import SigningError
    from .keys import SigningKey, bundle_signature, last_release, load_signing_key, sign_bundle, verify_bundle

    path = Path(bundle)
    load_bundle(path)  # what the board checks first: manifest, model sha256
    current = bundle_signature(path)
    if key is None:
        if resign:
            raise SigningError("a rollback signs the old bundle as a new release: pass --sign-key KEY")
        if current is not None:
            return f"signed by key {current.key_id[:16]}..., release {current.release}"
        if not allow_unsigned:
            raise SigningError(f"bundle {path} is not signed, and boards with [update].trusted_keys refuse it: pass "
                               "--sign-key KEY (or sign it first with `edgekit sign`), or --allow-unsigned for boards "
                               "that trust no key")
        log.warning("pushing the unsigned bundle %s: only boards without [update].trusted_keys will run it", path)
        return "unsigned: only boards that trust no key run it"
    key = key if isinstance(key, SigningKey) else load_signing_key(key)
    valid = False
    if current is not None and current.key_id == key.key_id:
        try:
            verify_bundle(path, [key])
            valid = True
        except SigningError:
            pass
    if valid and not resign:
        last = last_release(key.path)
        if current.release is not None and current.release < last:
            log.warning("bundle %s is release %s, but release %d was signed since with this key: boards that took a "
                        "later release refuse it; roll back with `edgekit fleet rollback`", path, current.release, last)
        return f"signed by key {key.key_id[:16]}..., release {current.release}"
    if not path.is_dir():
        raise SigningError(f"bundle {path} is an archive; signing needs its directory (unpack it first)")
    if dry_run:
        nxt = release if release is not None else max(last_release(key.path), (current.release or 0) if current else 0) + 1
        return f"would be signed by key {key.key_id[:16]}... as release {nxt}"
    result = sign_bundle(path, key, release=release)
    return f"signed now by key {key.key_id[:16]}... as release {result.release}"


def push_bundle(
    payload: bytes,
    *,
    broker_url: str,
    fleet: str,
    devices: Sequence[str],
    timeout: float = 30.0,
    protocol_version: str = "5",
    ca_file: Optional[str] = None,
    cert_file: Optional[str] = None,
    key_file: Optional[str] = None,
) -> List[PushResult]:
    """Publish ``payload`` retained with QoS 1 on each device's bundle topic; wait for every PUBACK.

    ``protocol_version`` is ``"5"`` or ``"3.1.1"`` (for brokers without MQTT 5).
    """
    from paho.mqtt.client import error_string

    from .client import start_client

    topics = [(d, protocol.topic(fleet, d, "bundle")) for d in devices]  # names checked before connecting
    connected = threading.Event()
    acks: Dict[int, Any] = {}
    lock = threading.Condition()
    refused: List[str] = []

    def on_connect(client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            refused.append(str(reason_code))
        connected.set()

    def on_publish(client, userdata, mid, reason_code, properties):
        with lock:
            acks[mid] = reason_code
            lock.notify_all()

    client, broker = start_client(broker_url, "push", protocol_version=protocol_version, ca_file=ca_file,
                                  cert_file=cert_file, key_file=key_file, on_connect=on_connect, on_publish=on_publish)
    try:
        if not connected.wait(timeout) or refused:
            why = refused[0] if refused else f"no CONNACK within {timeout:g}s"
            raise BrokerError(f"broker {broker.redacted()} refused the push: {why}; check the URL and credentials")
        sent = [(d, t, client.publish(t, payload, qos=1, retain=True)) for d, t in topics]
        deadline = time.monotonic() + timeout
        with lock:
            while any(info.mid not in acks for _, _, info in sent) and time.monotonic() < deadline:
                lock.wait(0.1)
        results = []
        for device, topic, info in sent:
            code = acks.get(info.mid)
            if code is None:
                detail = f"no PUBACK within {timeout:g}s" if info.rc == 0 else error_string(info.rc)
                results.append(PushResult(fleet, device, topic, False, detail))
            elif getattr(code, "is_failure", False):
                results.append(PushResult(fleet, device, topic, False, f"the broker refused it: {code}"))
            else:
                results.append(PushResult(fleet, device, topic, True, "acknowledged"))
        return results
    finally:
        client.disconnect()
        client.loop_stop()
