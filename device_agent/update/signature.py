"""Signed bundles: a board runs only what a key its owner trusts signed, and never an older release.

The format, ``edgekit-signature/1`` (docs/bundle.md, "Signature"), is small enough to check in any language:

* ``signature.json`` sits beside ``manifest.json``, in the bundle directory and in its archive::

      {"format": "edgekit-signature/1", "algorithm": "ed25519",
       "key_id": "<hex sha256 of the signer's 32-byte raw Ed25519 public key>",
       "signature": "<standard base64, padded, of the 64-byte signature>"}

* the signature is pure Ed25519 (RFC 8032: no pre-hash, no context) over the **exact bytes of
  manifest.json** as they are stored; nothing is parsed or canonicalised before verifying;
* the manifest's ``release`` (a JSON integer, 1 .. 2**53 - 1) is the release counter, so one signature
  covers it together with the model's sha256, the name and the version.

:class:`Verifier` is the board's side (``[update] trusted_keys``). A bundle passes when its ``key_id``
names a trusted key, the signature verifies, the model's sha256 is the signed one, and its release is
above the highest release the board accepted before (equal: only for the very same manifest). Reading
an archive takes only the headers, ``manifest.json``, ``signature.json`` and the model's hash; nothing is
written to disk before all of it passed. The highest accepted release is kept per key in
``<state dir>/releases-<device>.json`` (written atomically; ``--reset-bundle`` leaves it alone). Only
keys still in ``trusted_keys`` count, so removing a leaked key also drops any counter it inflated.

``cryptography`` is imported only when a board has trusted keys.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import logging
import os
import re
import tarfile
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ..delivery.schemas import SIGNATURE_REFUSALS
from ..errors import ConfigError, SignatureError
from .manifest import FORMAT, MANIFEST_NAME, Bundle, load_bundle

__all__ = [
    "SIGNATURE_NAME",
    "SIGNATURE_FORMAT",
    "ALGORITHM",
    "MAX_RELEASE",
    "REASONS",
    "TrustedKey",
    "Signed",
    "Verifier",
    "key_id",
    "load_public_key",
    "parse_signature",
    "signed_fields",
    "verify_signature",
    "read_archive",
    "signature_document",
]

log = logging.getLogger(__name__)

SIGNATURE_NAME = "signature.json"
SIGNATURE_FORMAT = "edgekit-signature/1"
ALGORITHM = "ed25519"
MAX_RELEASE = 2**53 - 1  # the largest integer every JSON reader holds exactly
MAX_SIGNATURE_BYTES = 4096
MAX_MANIFEST_BYTES = 1 << 20
MAX_MEMBERS = 64
MAX_KEY_FILE_BYTES = 16384
RECORD_FORMAT = "edgekit-releases/1"

#: Why a bundle was refused; telemetry ``signature.refused`` counts each.
REASONS = SIGNATURE_REFUSALS

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as exc:  # pragma: no cover - the device extras install it
        raise ConfigError("config [update].trusted_keys needs the `cryptography` package; "
                          "pip install cryptography (the device extras have it)") from exc
    return ed25519, serialization, InvalidSignature


def key_id(raw_public_key: bytes) -> str:
    """A key's id: the hex sha256 of its 32 raw public-key bytes (RFC 8032 encoding)."""
    return hashlib.sha256(bytes(raw_public_key)).hexdigest()


@dataclass(frozen=True)
class TrustedKey:
    """One Ed25519 public key a board trusts."""

    key_id: str
    path: str
    public: Any  # cryptography's Ed25519PublicKey

    def verifies(self, signature: bytes, data: bytes) -> bool:
        _, _, invalid = _crypto()
        try:
            self.public.verify(signature, data)
            return True
        except invalid:
            return False


def load_public_key(path: Union[str, os.PathLike], what: str = "config [update].trusted_keys") -> TrustedKey:
    """An Ed25519 public key from a PEM file (``-----BEGIN PUBLIC KEY-----``, as ``edgekit keys init`` and
    ``openssl pkey -pubout`` write it). :class:`ConfigError` naming the file and the fix otherwise."""
    ed25519, serialization, _ = _crypto()
    from cryptography.exceptions import UnsupportedAlgorithm

    p = Path(path)
    try:
        with open(p, "rb") as fh:
            data = fh.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{what}: {p} cannot be read ({exc.strerror or exc}); copy the signing.pub of "
                          "`edgekit keys init` there") from exc
    if b"PRIVATE KEY" in data:
        raise ConfigError(f"{what}: {p} holds a private key; a board needs only the public one "
                          "(signing.pub): copy that and keep signing.key off the board")
    try:
        if len(data) > MAX_KEY_FILE_BYTES:
            raise ValueError("too big for a key")
        public = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{what}: {p} is not a PEM public key ({exc}); use the signing.pub "
                          "`edgekit keys init` wrote") from exc
    if not isinstance(public, ed25519.Ed25519PublicKey):
        raise ConfigError(f"{what}: {p} is a {type(public).__name__.lstrip('_')}, not an Ed25519 key; "
                          "make one with `edgekit keys init`")
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return TrustedKey(key_id=key_id(raw), path=str(p), public=public)


def signature_document(key: str, signature: bytes) -> bytes:
    """The bytes of a ``signature.json`` (what ``edgekit sign`` writes)."""
    doc = {"format": SIGNATURE_FORMAT, "algorithm": ALGORITHM, "key_id": key,
           "signature": base64.b64encode(bytes(signature)).decode("ascii")}
    return (json.dumps(doc, indent=2) + "\n").encode("utf-8")


def _object(data: bytes, what: str) -> Dict[str, Any]:
    def no_duplicates(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise ValueError(f"key {k!r} appears twice")
            out[k] = v
        return out

    try:
        obj = json.loads(data.decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SignatureError("malformed", f"{what} is not UTF-8 JSON ({exc.__class__.__name__}: {exc})"[:300]) from None
    if not isinstance(obj, dict):
        raise SignatureError("malformed", f"{what} must hold a JSON object")
    return obj


def parse_signature(data: bytes, what: str = SIGNATURE_NAME) -> Tuple[str, bytes]:
    """``signature.json`` bytes to (key id, 64 signature bytes); :class:`SignatureError` ``malformed`` if not."""
    if len(data) > MAX_SIGNATURE_BYTES:
        raise SignatureError("malformed", f"{what} is {len(data)} bytes, over {MAX_SIGNATURE_BYTES}; sign the bundle again")
    obj = _object(data, what)
    if obj.get("format") != SIGNATURE_FORMAT or obj.get("algorithm") != ALGORITHM:
        raise SignatureError("malformed", f"{what} has format={obj.get('format')!r} algorithm={obj.get('algorithm')!r}; "
                                          f"this agent reads {SIGNATURE_FORMAT!r} with {ALGORITHM!r}")
    kid, sig = obj.get("key_id"), obj.get("signature")
    if not isinstance(kid, str) or not _HEX64.match(kid):
        raise SignatureError("malformed", f"{what} key_id={str(kid)[:70]!r} is not a hex sha256")
    try:
        raw = base64.b64decode(sig, validate=True) if isinstance(sig, str) else b""
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 64:
        raise SignatureError("malformed", f"{what} signature is not base64 of 64 bytes; sign the bundle again")
    return kid, raw


@dataclass(frozen=True)
class Signed:
    """What a verified signature vouches for."""

    key_id: str
    release: int
    manifest_sha256: str  # of the exact manifest.json bytes that were signed
    name: str
    version: str
    model_sha256: str
    model_file: str


def signed_fields(manifest: bytes, key: str, what: str) -> Signed:
    """The fields of a manifest whose signature verified (raises ``malformed`` when one is unusable)."""
    data = _object(manifest, f"{what}: the signed manifest.json")
    release, model = data.get("release"), data.get("model")
    if data.get("format") != FORMAT:
        raise SignatureError("malformed", f"{what}: the signed manifest's format={data.get('format')!r} is not {FORMAT!r}")
    if type(release) is not int or not 1 <= release <= MAX_RELEASE:
        raise SignatureError("malformed", f"{what}: the signed manifest's release={release!r} is not an integer in "
                                          f"[1, {MAX_RELEASE}]; sign it with `edgekit sign`")
    if not isinstance(model, dict) or not isinstance(model.get("sha256"), str) or not _HEX64.match(model["sha256"]):
        raise SignatureError("malformed", f"{what}: the signed manifest has no hex model.sha256")
    model_file = model.get("file", "model.tflite")
    if not isinstance(model_file, str) or model_file in ("", ".", "..") or "/" in model_file or "\\" in model_file:
        raise SignatureError("malformed", f"{what}: the signed manifest's model.file={str(model_file)[:80]!r} "
                                          "is not a plain file name")
    return Signed(key_id=key, release=release, manifest_sha256=hashlib.sha256(manifest).hexdigest(),
                  name=str(data.get("name", "")), version=str(data.get("version", "")),
                  model_sha256=model["sha256"], model_file=model_file)


_Archive = Tuple[PurePosixPath, bytes, Dict[PurePosixPath, bytes], Dict[PurePosixPath, str]]


def read_archive(archive: bytes, max_total: int, what: str = "bundle archive") -> _Archive:
    """A bundle ``.tar.gz`` read in memory: the manifest's path and bytes, every ``signature.json`` by folder,
    and the sha256 of every file by path. Nothing is written; ``max_total`` bounds the bytes read."""
    manifest: Optional[Tuple[PurePosixPath, bytes]] = None
    signatures: Dict[PurePosixPath, bytes] = {}
    hashes: Dict[PurePosixPath, str] = {}
    total = members = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            for member in tar:
                members += 1
                total += max(int(member.size), 0)
                if members > MAX_MEMBERS or total > max_total:
                    raise SignatureError("malformed", f"{what} holds more than {MAX_MEMBERS} entries or "
                                                      f"{max_total} bytes; pack it with `edgekit fleet push`")
                if not member.isfile():
                    continue
                path = PurePosixPath(member.name)
                if path in hashes:
                    raise SignatureError("malformed", f"{what} holds {str(path)!r} twice")
                fh = tar.extractfile(member)
                if path.name in (MANIFEST_NAME, SIGNATURE_NAME):
                    limit = MAX_MANIFEST_BYTES if path.name == MANIFEST_NAME else MAX_SIGNATURE_BYTES
                    if member.size > limit:
                        raise SignatureError("malformed", f"{what}: {path.name} is {member.size} bytes, over {limit}")
                    data = fh.read()
                    hashes[path] = hashlib.sha256(data).hexdigest()
                    if path.name == SIGNATURE_NAME:
                        signatures[path.parent] = data
                    elif manifest is not None:
                        raise SignatureError("malformed", f"{what} holds more than one {MANIFEST_NAME}")
                    else:
                        manifest = (path, data)
                else:
                    digest = hashlib.sha256()
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        digest.update(block)
                    hashes[path] = digest.hexdigest()
    except SignatureError:
        raise
    except (tarfile.TarError, EOFError, zlib.error, OSError, ValueError) as exc:
        raise SignatureError("malformed", f"{what} is corrupt ({exc.__class__.__name__}: {exc}); push it again") from exc
    if manifest is None:
        raise SignatureError("malformed", f"{what} holds no {MANIFEST_NAME}; pack it with `edgekit fleet push`")
    return manifest[0], manifest[1], signatures, hashes


def verify_signature(manifest: bytes, signature: bytes, keys: Mapping[str, TrustedKey], what: str = "bundle") -> Signed:
    """Check ``signature.json`` bytes against ``manifest.json`` bytes with the ``keys`` (by key id) trusted."""
    kid, sig = parse_signature(signature, f"{what}: {SIGNATURE_NAME}")
    key = keys.get(kid)
    if key is None:
        raise SignatureError("unknown_key", f"{what} is signed by key {kid[:16]}..., which this board does not "
                                            "trust ([update].trusted_keys); sign it with a trusted key")
    if not key.verifies(sig, manifest):
        raise SignatureError("bad_signature", f"{what}: the signature of key {kid[:16]}... does not match "
                                              "manifest.json; it was changed after signing: sign it again")
    return signed_fields(manifest, kid, what)


def _read_small(path: Path, limit: int, reason: str, what: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except FileNotFoundError:
        raise SignatureError(reason, f"{what} has no {path.name}; pass the directory `edgekit convert -o` wrote") from None
    except OSError as exc:
        raise SignatureError("malformed", f"{path} cannot be read ({exc})") from exc
    if len(data) > limit:
        raise SignatureError("malformed", f"{path} is over {limit} bytes")
    return data


class Verifier:
    """The board's trusted keys and its release record; see the module docstring.

    :meth:`check_archive` (a pushed archive, before it is unpacked) counts every refusal by reason in
    :attr:`refused`; :meth:`load` and :meth:`screen` are the start-up checks.
    """

    def __init__(self, keys: Sequence[TrustedKey], record_path: Union[str, os.PathLike]):
        if not keys:
            raise ConfigError("a Verifier needs at least one trusted key")
        self.keys: Dict[str, TrustedKey] = {k.key_id: k for k in keys}
        self.record_path = Path(record_path)
        self.refused: Dict[str, int] = {}
        self._by_model: Dict[str, int] = {}  # model sha256 -> release of the last bundle verified with it
        self._lock = threading.Lock()
        self._record = self._load_record()

    @classmethod
    def from_config(cls, config: Any) -> Optional["Verifier"]:
        """The verifier ``config`` asks for, or None (with one warning) when it trusts no key."""
        paths = tuple(config.update.trusted_keys)
        if not paths:
            log.warning("no [update].trusted_keys: this board runs any bundle it is given or pushed, signed or not; "
                        "list the owner's public keys there (docs/agent.md, 'Signed bundles')")
            return None
        keys = [load_public_key(p) for p in paths]
        return cls(keys, config.state_dir / f"releases-{config.device.id}.json")

    # -- checks ---------------------------------------------------------------
    def verify_archive(self, archive: bytes, *, max_total: int, what: str = "bundle archive") -> Signed:
        """Signature, signed fields and model sha256 of a ``.tar.gz`` (no release rule, no counting)."""
        path, manifest, signatures, hashes = read_archive(archive, max_total, what)
        signature = signatures.get(path.parent)
        if signature is None:
            raise SignatureError("unsigned", f"{what} is not signed (no {SIGNATURE_NAME} beside its manifest) and this "
                                             "board runs only signed bundles: sign it with `edgekit sign`")
        signed = verify_signature(manifest, signature, self.keys, what)
        model = hashes.get(path.parent / signed.model_file)
        if model is None:
            raise SignatureError("malformed", f"{what} has no {signed.model_file}; pack the whole bundle")
        if model != signed.model_sha256:
            raise SignatureError("model_mismatch", f"{what}: {signed.model_file} sha256={model[:12]}... is not the signed "
                                                   f"{signed.model_sha256[:12]}...; the model was replaced: push it again")
        return signed

    def verify_dir(self, path: Union[str, os.PathLike]) -> Signed:
        """Signature and signed fields of a bundle directory (the model's sha256 is :func:`load_bundle`'s job)."""
        p = Path(path)
        what = f"bundle {p}"
        manifest = _read_small(p / MANIFEST_NAME, MAX_MANIFEST_BYTES, "malformed", what)
        if not (p / SIGNATURE_NAME).exists():
            raise SignatureError("unsigned", f"{what} is not signed (no {SIGNATURE_NAME}) and this board runs only "
                                             "signed bundles ([update].trusted_keys): sign it with `edgekit sign`")
        signature = _read_small(p / SIGNATURE_NAME, MAX_SIGNATURE_BYTES, "malformed", what)
        return verify_signature(manifest, signature, self.keys, what)

    @staticmethod
    def matches(path: Union[str, os.PathLike], signed: Signed) -> bool:
        """Whether ``path``/manifest.json is the manifest ``signed`` vouches for."""
        try:
            data = _read_small(Path(path) / MANIFEST_NAME, MAX_MANIFEST_BYTES, "malformed", str(path))
        except SignatureError:
            return False
        return hashlib.sha256(data).hexdigest() == signed.manifest_sha256

    def check_archive(self, archive: bytes, *, max_total: int) -> Signed:
        """A pushed archive: verify it and apply the release rule before anything is unpacked; counts refusals."""
        try:
            signed = self.verify_archive(archive, max_total=max_total)
            self.admit(signed)
            return signed
        except SignatureError as exc:
            with self._lock:
                self.refused[exc.reason] = self.refused.get(exc.reason, 0) + 1
            raise

    def check_unpacked(self, path: Union[str, os.PathLike], signed: Signed) -> None:
        """After unpacking: the manifest on disk is the one that was verified (nothing slipped in between)."""
        if not self.matches(path, signed):
            with self._lock:
                self.refused["malformed"] = self.refused.get("malformed", 0) + 1
            raise SignatureError("malformed", f"bundle {path}: manifest.json unpacked is not the one that was "
                                              "verified; push it again")

    # -- the release rule -------------------------------------------------------
    def highest(self) -> Tuple[Optional[int], set]:
        """The highest release accepted from a still-trusted key, and the manifests accepted at it."""
        entries = [e for k, e in self._record.items() if k in self.keys]
        if not entries:
            return None, set()
        top = max(e["release"] for e in entries)
        return top, {e["manifest_sha256"] for e in entries if e["release"] == top}

    def admit(self, signed: Signed) -> None:
        """Refuse an older release (``rollback``) or a reused one (``release_reused``); else record it."""
        what = f"bundle {signed.name} v{signed.version} (release {signed.release})"
        with self._lock:
            top, at_top = self.highest()
            if top is not None and signed.release < top:
                raise SignatureError("rollback", f"{what} is older than release {top}, which this board already "
                                                 "accepted; roll back with `edgekit fleet rollback` (it signs the old "
                                                 "bundle as a new release)")
            if top is not None and signed.release == top and signed.manifest_sha256 not in at_top:
                raise SignatureError("release_reused", f"{what}: release {top} was accepted with another manifest; "
                                                       "every signed bundle needs a new release: sign it again")
            self._remember(signed)

    def note(self, signed: Signed, what: str) -> None:
        """Start-up: record the running bundle's release (a local bundle below the record runs, with a warning)."""
        with self._lock:
            top, _ = self.highest()
            if top is not None and signed.release < top:
                log.warning("%s is release %d, below release %d this board accepted before (a refused update or "
                            "--reset-bundle); it runs, and pushed bundles below %d stay refused",
                            what, signed.release, top, top)
            self._remember(signed)

    def _remember(self, signed: Signed) -> None:
        self._by_model[signed.model_sha256] = signed.release
        entry = self._record.get(signed.key_id)
        if entry is not None and entry["release"] >= signed.release:
            return
        record = dict(self._record)
        record[signed.key_id] = {"release": signed.release, "manifest_sha256": signed.manifest_sha256,
                                 "name": signed.name, "version": signed.version, "ts": round(time.time(), 3)}
        self._write_record(record)
        self._record = record

    def _load_record(self) -> Dict[str, Dict[str, Any]]:
        p = self.record_path
        if not p.exists():
            return {}
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT or not isinstance(data.get("keys"), dict):
                raise ValueError(f"format is not {RECORD_FORMAT!r}")
            record = {}
            for kid, e in data["keys"].items():
                if not (_HEX64.match(str(kid)) and type(e.get("release")) is int and isinstance(e.get("manifest_sha256"), str)):
                    raise ValueError(f"entry {str(kid)[:16]!r} is malformed")
                record[kid] = dict(e)
            return record
        except (OSError, ValueError, AttributeError) as exc:
            aside = p.with_name(p.name + ".corrupt")
            log.warning("release record %s cannot be read (%s); kept as %s, and the running bundle's release starts "
                        "a new one", p, exc, aside)
            try:
                os.replace(p, aside)
            except OSError:
                pass
            return {}

    def _write_record(self, record: Mapping[str, Any]) -> None:
        p = self.record_path
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump({"format": RECORD_FORMAT, "keys": record}, fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)

    # -- start-up -----------------------------------------------------------------
    def load(self, path: Union[str, os.PathLike], *, max_total: int) -> Bundle:
        """The configured bundle (directory or ``.tar.gz``), verified before it is unpacked or opened."""
        p = Path(path)
        if not p.exists():
            return load_bundle(p)  # raises its one line: does not exist, pass the directory ...
        if p.is_file():
            signed = self.verify_archive(p.read_bytes(), max_total=max_total, what=f"bundle {p}")
            bundle = load_bundle(p)
            if not self.matches(bundle.path, signed):
                raise SignatureError("malformed", f"bundle {p}: the manifest unpacked is not the one verified")
        else:
            signed = self.verify_dir(p)
            bundle = load_bundle(p)  # the model's sha256 against the signed manifest
        self.note(signed, f"bundle {p}")
        return bundle

    def screen(self, bundle: Optional[Bundle]) -> Optional[Bundle]:
        """The bundle an update installed, if its signature still verifies (else None, with a warning)."""
        if bundle is None:
            return None
        try:
            signed = self.verify_dir(bundle.path)
        except SignatureError as exc:
            log.warning("installed bundle %s is refused (%s); starting on the configured bundle", bundle.path, exc)
            return None
        self.note(signed, f"installed bundle {bundle.path}")
        return bundle

    # -- reporting --------------------------------------------------------------------
    def snapshot(self, running_sha256: str) -> Dict[str, Any]:
        """Telemetry ``signature``: trusted key ids, the running and the highest accepted release, refusals."""
        with self._lock:
            top, _ = self.highest()
            return {"keys": sorted(self.keys), "release": self._by_model.get(running_sha256), "highest": top,
                    "refused": dict(self.refused)}
