"""Signing keys and signed bundles on the workstation (``edgekit keys``, ``edgekit sign``).

::

    pair = init_keys("keys")                       # keys/signing.key (0600) + keys/signing.pub
    sign_bundle("bundles/digits-v2", pair.private)  # release = the key's last release + 1

The format is defined once, on the board's side (:mod:`device_agent.update.signature`, docs/bundle.md
"Signature"): Ed25519 over the exact bytes of ``manifest.json``, whose ``release`` field is the release
counter; ``signature.json`` beside it names the key by id. Signing never opens the model in an
interpreter: it checks the model's sha256 against the manifest and signs the manifest.

Each key keeps the last release it signed in ``<key>.release`` beside it (``signing.key`` ->
``signing.release``), so the next signature gets the next number. Sign from one place per key, or give
``release`` explicitly (e.g. a CI build number).
"""

from __future__ import annotations

import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from device_agent.update.manifest import FORMAT, MANIFEST_NAME, load_bundle
from device_agent.update.signature import (
    MAX_RELEASE,
    SIGNATURE_NAME,
    Signed,
    TrustedKey,
    key_id,
    parse_signature,
    read_archive,
    signature_document,
    verify_signature,
)

from ..errors import OutputExistsError, SigningError

__all__ = [
    "PRIVATE_NAME",
    "PUBLIC_NAME",
    "KeyPair",
    "SigningKey",
    "SignResult",
    "BundleSignature",
    "init_keys",
    "load_signing_key",
    "last_release",
    "sign_bundle",
    "bundle_signature",
    "verify_bundle",
]

log = logging.getLogger(__name__)

PRIVATE_NAME = "signing.key"
PUBLIC_NAME = "signing.pub"
PathLike = Union[str, "os.PathLike[str]"]


def _crypto():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return ed25519, serialization


@dataclass(frozen=True)
class KeyPair:
    """What ``edgekit keys init`` wrote."""

    private: Path
    public: Path
    key_id: str


@dataclass(frozen=True)
class SigningKey:
    """A private Ed25519 key read from its PEM file."""

    path: Path
    private: Any  # cryptography's Ed25519PrivateKey
    key_id: str

    def sign(self, data: bytes) -> bytes:
        return self.private.sign(bytes(data))

    @property
    def trusted(self) -> TrustedKey:
        """Its public half, as a board holds it."""
        return TrustedKey(key_id=self.key_id, path=str(self.path), public=self.private.public_key())


@dataclass(frozen=True)
class SignResult:
    """A bundle ``sign_bundle`` signed."""

    path: Path
    name: str
    version: str
    release: int
    key_id: str
    manifest_sha256: str


@dataclass(frozen=True)
class BundleSignature:
    """What a bundle's ``signature.json`` claims (not verified): its key and the manifest's release."""

    key_id: str
    release: Optional[int]


def _raw_public(public: Any) -> bytes:
    _, serialization = _crypto()
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` from the start (never readable by others, even for a moment); never replace."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(path, mode)  # whatever the umask said


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def counter_path(key_path: PathLike) -> Path:
    """Where a key keeps its last signed release: ``signing.key`` -> ``signing.release``."""
    return Path(key_path).with_suffix(".release")


def last_release(key_path: PathLike) -> int:
    """The last release signed with the key at ``key_path`` (0 when none)."""
    p = counter_path(key_path)
    try:
        text = p.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return 0
    except OSError as exc:
        raise SigningError(f"{p} cannot be read ({exc.strerror or exc}); it holds the key's last release") from exc
    if not text.isdigit() or not 0 <= int(text) <= MAX_RELEASE:
        raise SigningError(f"{p} holds {text[:40]!r}, not a release number; write the last release signed with "
                           "this key into it (or pass --release N)")
    return int(text)


def init_keys(directory: PathLike, *, continue_from: Optional[PathLike] = None) -> KeyPair:
    """Write a new Ed25519 key pair: ``signing.key`` (PKCS#8 PEM, mode 0600) and ``signing.pub`` (PEM).

    Refuses to overwrite either file. ``continue_from`` (an older ``signing.key``) starts the new key's
    release counter where that key's stopped, so boards that trust both accept the next release.
    """
    ed25519, serialization = _crypto()
    d = Path(directory)
    private, public = d / PRIVATE_NAME, d / PUBLIC_NAME
    for p in (private, public):
        if p.exists():
            raise OutputExistsError(f"{p} exists; a signing key is never overwritten: choose another directory "
                                    "(and keep the old key until no board needs it)")
    if continue_from is not None and not Path(continue_from).is_file():
        raise SigningError(f"--continue-from {continue_from} does not exist; pass the old signing.key")
    start = last_release(continue_from) if continue_from is not None else 0
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    _write_new(private, pem, 0o600)
    try:
        _write_new(public, pub, 0o644)
        if start:
            _atomic_write(counter_path(private), f"{start}\n".encode())
    except BaseException:
        private.unlink(missing_ok=True)
        public.unlink(missing_ok=True)
        raise
    return KeyPair(private=private, public=public, key_id=key_id(_raw_public(key.public_key())))


def load_signing_key(path: PathLike) -> SigningKey:
    """The private key in ``path`` (what ``edgekit keys init`` wrote, or ``openssl genpkey -algorithm ed25519``)."""
    from cryptography.exceptions import UnsupportedAlgorithm

    ed25519, serialization = _crypto()
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise SigningError(f"signing key {p} does not exist; create one with `edgekit keys init DIR`") from None
    except OSError as exc:
        raise SigningError(f"signing key {p} cannot be read ({exc.strerror or exc})") from exc
    if b"PUBLIC KEY" in data and b"PRIVATE KEY" not in data:
        raise SigningError(f"{p} is a public key; signing needs the private one (signing.key beside it)")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:
        raise SigningError(f"signing key {p} is encrypted; edgekit reads unencrypted PKCS#8 PEM keys (keep the file "
                           "on an encrypted disk instead)") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise SigningError(f"{p} is not a PEM private key ({exc.__class__.__name__}); use the signing.key "
                           "`edgekit keys init` wrote") from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SigningError(f"{p} is a {type(key).__name__.lstrip('_')}, not an Ed25519 key; make one with "
                           "`edgekit keys init`")
    try:
        mode = p.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("signing key %s can be read by others (mode %o); chmod 600 it", p, stat.S_IMODE(mode))
    except OSError:
        pass
    return SigningKey(path=p, private=key, key_id=key_id(_raw_public(key.public_key())))


def public_key_id(path: PathLike) -> str:
    """The key id of a public (``signing.pub``) or private (``signing.key``) PEM key file."""
    from device_agent.errors import ConfigError
    from device_agent.update.signature import load_public_key

    p = Path(path)
    try:
        head = p.read_bytes()[:4096]
    except OSError as exc:
        raise SigningError(f"{p} cannot be read ({exc.strerror or exc})") from exc
    if b"PRIVATE KEY" in head:
        return load_signing_key(p).key_id
    try:
        return load_public_key(p, what="key").key_id
    except ConfigError as exc:
        raise SigningError(str(exc)) from exc


def _ordered(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise SigningError(f"manifest.json has the key {k!r} twice; re-create the bundle with `edgekit convert`")
        out[k] = v
    return out


def _with_release(manifest: Dict[str, Any], release: int) -> Dict[str, Any]:
    """The manifest with ``release`` set: in place if it has one, else right after ``version``."""
    if "release" in manifest:
        return {**manifest, "release": release}
    out: Dict[str, Any] = {}
    for k, v in manifest.items():
        out[k] = v
        if k == "version":
            out["release"] = release
    out.setdefault("release", release)
    return out


def _check_release(release: Any) -> int:
    if isinstance(release, bool) or not isinstance(release, int) or not 1 <= release <= MAX_RELEASE:
        raise SigningError(f"release={release!r} must be an integer in [1, {MAX_RELEASE}]")
    return release


def sign_bundle(directory: PathLike, key: Union[SigningKey, PathLike], release: Optional[int] = None) -> SignResult:
    """Sign the bundle in ``directory`` in place: set ``release`` in manifest.json and write signature.json.

    ``release`` defaults to one above both the key's last release and the bundle's current one. The model
    is checked against the manifest's sha256 (read, never opened in an interpreter). Each file is replaced
    atomically; the counter beside the key is updated last.
    """
    d = Path(directory)
    if not d.is_dir():
        raise SigningError(f"{d} is not a bundle directory; sign the directory `edgekit convert -o` wrote "
                           "(unpack a .tar.gz first)")
    key = key if isinstance(key, SigningKey) else load_signing_key(key)
    load_bundle(d)  # the manifest reads and the model matches its sha256 (BundleError otherwise)
    try:
        manifest = json.loads((d / MANIFEST_NAME).read_bytes().decode("utf-8"), object_pairs_hook=_ordered)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SigningError(f"{d / MANIFEST_NAME} cannot be read as JSON ({exc})") from exc
    if manifest.get("format") != FORMAT:
        raise SigningError(f"{d / MANIFEST_NAME} format={manifest.get('format')!r} is not {FORMAT!r}")
    last = last_release(key.path)
    current = manifest.get("release")
    current = current if isinstance(current, int) and not isinstance(current, bool) else 0
    if release is None:
        release = max(last, current) + 1
    release = _check_release(release)
    if release <= last:
        log.warning("release %d is not above release %d, the last signed with %s: boards that accepted a later "
                    "release refuse it", release, last, key.path)
    try:
        text = (json.dumps(_with_release(manifest, release), indent=2, allow_nan=False) + "\n").encode("utf-8")
    except ValueError as exc:
        raise SigningError(f"{d / MANIFEST_NAME} holds a value JSON cannot carry ({exc}); re-create the bundle") from exc
    doc = signature_document(key.key_id, key.sign(text))
    signed = verify_signature(text, doc, {key.key_id: key.trusted}, f"bundle {d}")  # what a board will do
    _atomic_write(d / MANIFEST_NAME, text)
    _atomic_write(d / SIGNATURE_NAME, doc)
    if release > last:
        _atomic_write(counter_path(key.path), f"{release}\n".encode())
    log.info("signed %s v%s as release %d with key %s...", signed.name, signed.version, release, key.key_id[:16])
    return SignResult(path=d, name=signed.name, version=signed.version, release=release, key_id=key.key_id,
                      manifest_sha256=signed.manifest_sha256)


def _parts(bundle: Path) -> Tuple[bytes, Optional[bytes]]:
    """manifest.json and signature.json (None when absent) of a bundle directory or ``.tar.gz``."""
    if bundle.is_dir():
        sig = bundle / SIGNATURE_NAME
        return (bundle / MANIFEST_NAME).read_bytes(), (sig.read_bytes() if sig.is_file() else None)
    path, manifest, signatures, _ = read_archive(bundle.read_bytes(), max_total=1 << 31, what=f"bundle {bundle}")
    return manifest, signatures.get(path.parent)


def bundle_signature(bundle: PathLike) -> Optional[BundleSignature]:
    """What ``signature.json`` of a bundle (directory or ``.tar.gz``) claims; None when it has none.

    Raises :class:`SigningError` when the file is there but malformed. Nothing is verified here.
    """
    from device_agent.errors import SignatureError

    p = Path(bundle)
    try:
        manifest, signature = _parts(p)
        if signature is None:
            return None
        kid, _ = parse_signature(signature, f"{p}: {SIGNATURE_NAME}")
    except SignatureError as exc:
        raise SigningError(f"{exc}; sign it again with `edgekit sign`") from exc
    except OSError as exc:
        raise SigningError(f"bundle {p} cannot be read ({exc.strerror or exc})") from exc
    try:
        release = json.loads(manifest.decode("utf-8")).get("release")
    except (UnicodeDecodeError, ValueError, AttributeError):
        release = None
    return BundleSignature(key_id=kid, release=release if isinstance(release, int) else None)


def verify_bundle(bundle: PathLike, keys: List[Union[SigningKey, TrustedKey]]) -> Signed:
    """Verify a bundle's signature as a board trusting ``keys`` would (the release rule aside)."""
    from device_agent.errors import SignatureError

    p = Path(bundle)
    trusted = {k.key_id: (k.trusted if isinstance(k, SigningKey) else k) for k in keys}
    try:
        manifest, signature = _parts(p)
        if signature is None:
            raise SigningError(f"bundle {p} is not signed; sign it with `edgekit sign {p} --key KEY`")
        return verify_signature(manifest, signature, trusted, f"bundle {p}")
    except SignatureError as exc:
        raise SigningError(str(exc)) from exc
    except OSError as exc:
        raise SigningError(f"bundle {p} cannot be read ({exc.strerror or exc})") from exc
