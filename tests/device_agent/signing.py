"""Signing bundles in device tests, written from docs/bundle.md ("Signature") with `cryptography` alone.

Device tests import neither edgekit nor its signer, so this is a second signer built from the spec:
set ``release`` in manifest.json, sign the file's exact bytes with Ed25519, write signature.json.
It also builds what an attacker could send: ``edgekit.bundle/1`` messages around any archive.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable, Optional

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.delivery import protocol


class Key:
    """A private key and its public PEM file."""

    def __init__(self, directory: Path, name: str = "signing"):
        self.private = Ed25519PrivateKey.generate()
        raw = self.private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.key_id = hashlib.sha256(raw).hexdigest()
        directory.mkdir(parents=True, exist_ok=True)
        self.pub = directory / f"{name}.pub"
        self.pub.write_bytes(self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def sign(bundle: Path, key: Key, release: int, edit: Optional[Callable[[dict], None]] = None) -> Path:
    """Sign ``bundle`` in place as ``release`` (after ``edit`` changed the manifest, if given)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    if edit is not None:
        edit(manifest)
    manifest["release"] = release
    text = (json.dumps(manifest, indent=2) + "\n").encode()
    (bundle / "manifest.json").write_bytes(text)
    doc = {"format": "edgekit-signature/1", "algorithm": "ed25519", "key_id": key.key_id,
           "signature": base64.b64encode(key.private.sign(text)).decode()}
    (bundle / "signature.json").write_text(json.dumps(doc))
    return bundle


def signed_copy(src: Path, dst: Path, key: Key, release: int, edit: Optional[Callable[[dict], None]] = None) -> Path:
    shutil.copytree(src, dst)
    (dst / "signature.json").unlink(missing_ok=True)
    return sign(dst, key, release, edit)


def message(archive: bytes, name: str = "digits", version: str = "9", sha256: str = "0" * 64) -> bytes:
    """An ``edgekit.bundle/1`` message around ``archive`` without any check (what anyone on the broker can send)."""
    return json.dumps({
        "schema": "edgekit.bundle/1", "name": name, "version": version, "sha256": sha256,
        "archive_sha256": hashlib.sha256(archive).hexdigest(), "size": len(archive), "encoding": "base64",
        "archive": base64.b64encode(archive).decode(), "ts": 0,
    }).encode()


def push_message(bundle: Path) -> bytes:
    """What `edgekit fleet push` sends for a bundle directory."""
    return json.dumps(protocol.bundle_payload(bundle)).encode()
