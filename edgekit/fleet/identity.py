"""Fleet identity: one CA per fleet's broker, one client certificate per board and per host tool.

``edgekit fleet ca init DIR`` makes the CA; ``edgekit fleet enroll NAME --ca DIR -o OUT`` issues
a key and a certificate; ``edgekit fleet revoke NAME --ca DIR`` takes one back. The broker
(``edgekit broker-config``) trusts the CA, demands a certificate from every client and uses the
certificate's common name (CN) as the MQTT username its ACL is written for (docs/identity.md).

A CA directory holds::

    ca.key          the CA's private key (0600): keep it on the workstation, never on the broker or a board
    ca.crt          the CA certificate: the broker and every client trust it
    crl.pem         the revocation list: the broker refuses the certificates listed in it
    enrolled.json   every certificate issued: name, role, fleet, serial, validity, revocation

An enrolment directory (``-o OUT``) holds ``client.key`` (0600), ``client.crt``, ``ca.crt`` and
``identity.json``: what ``tools/install_agent.py --identity OUT`` installs on a board.

Names: a board's CN is its device id (``[device].id``), so the ACL's ``%u`` is the device level of
its topics. A host identity's CN is ``<role>:<name>`` (``collector:main``); the colon can never be
in a device id, so no host identity can pass for a board and no board for a host tool.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple

from device_agent.delivery.protocol import check_name
from device_agent.errors import ProtocolError

from ..errors import IdentityError, OutputExistsError

__all__ = [
    "ROLES",
    "HOST_ROLES",
    "Identity",
    "Enrolment",
    "CertificateAuthority",
    "init_ca",
    "open_ca",
    "read_allow_list",
]

ROLES = ("device", "collector", "pusher", "admin")
HOST_ROLES = ROLES[1:]
CA_DAYS = 3650
LEAF_DAYS = 1825
_ENROLLED = "enrolled.json"


@dataclass(frozen=True)
class Identity:
    """One certificate the CA issued (a line of ``enrolled.json``)."""

    name: str
    role: str
    fleet: Optional[str]  # a board's fleet; None for a host tool that serves every fleet of the broker
    serial: str  # hex
    not_before: float
    not_after: float
    sha256: str  # fingerprint of the certificate (DER)
    hosts: Tuple[str, ...] = ()  # the broker's server certificate: its DNS names and addresses
    revoked_at: Optional[float] = None

    @property
    def cn(self) -> str:
        """The certificate's common name = the broker's MQTT username for this identity."""
        return common_name(self.name, self.role)

    def active(self, now: Optional[float] = None) -> bool:
        now = _now() if now is None else now
        return self.revoked_at is None and self.not_before <= now < self.not_after

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["hosts"] = list(self.hosts)
        d["cn"] = self.cn
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Identity":
        return cls(name=str(d["name"]), role=str(d["role"]), fleet=d.get("fleet"), serial=str(d["serial"]),
                   not_before=float(d["not_before"]), not_after=float(d["not_after"]), sha256=str(d["sha256"]),
                   hosts=tuple(d.get("hosts") or ()), revoked_at=d.get("revoked_at"))


@dataclass(frozen=True)
class Enrolment:
    """What ``enroll`` wrote: the directory and its files."""

    dir: Path
    cert: Path
    key: Path
    ca: Path
    identity: Identity


def common_name(name: str, role: str) -> str:
    return name if role == "device" else f"{role}:{name}"


def _now() -> float:
    return dt.datetime.now(dt.timezone.utc).timestamp()


def _check_name(name: str, what: str) -> str:
    try:
        return check_name(name, what)
    except ProtocolError as exc:
        raise IdentityError(str(exc)) from None


def _write_private(path: Path, data: bytes) -> None:
    """A new file that is 0600 from its first byte."""
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _x509():
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError as exc:  # pragma: no cover - the host extra installs it
        raise IdentityError("the `cryptography` package is missing; pip install 'edgekit[host]'") from exc
    return x509, hashes, serialization, ec, ExtendedKeyUsageOID, NameOID


def _new_key():
    _, _, _, ec, _, _ = _x509()
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key) -> bytes:
    _, _, serialization, _, _, _ = _x509()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class CertificateAuthority:
    """An existing CA directory (see :func:`init_ca`): issue, revoke, list."""

    def __init__(self, path: os.PathLike | str):
        self.path = Path(path)
        for name in ("ca.key", "ca.crt", _ENROLLED):
            if not (self.path / name).is_file():
                raise IdentityError(f"{self.path} is not a CA directory (no {name}); create one with "
                                    f"`edgekit fleet ca init {self.path}`")
        x509, _, serialization, _, _, _ = _x509()
        try:
            self.cert = x509.load_pem_x509_certificate((self.path / "ca.crt").read_bytes())
            self._key = serialization.load_pem_private_key((self.path / "ca.key").read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise IdentityError(f"{self.path}: ca.crt or ca.key cannot be read ({exc}); restore them from backup") from exc
        if self.cert.public_key().public_numbers() != self._key.public_key().public_numbers():
            raise IdentityError(f"{self.path}: ca.key does not belong to ca.crt; restore the pair from backup")

    @property
    def ca_file(self) -> Path:
        return self.path / "ca.crt"

    @property
    def crl_file(self) -> Path:
        return self.path / "crl.pem"

    # -- the enrolment list -----------------------------------------------
    def identities(self) -> List[Identity]:
        return _read_enrolled(self.path / _ENROLLED)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[List[Identity]]:
        """The enrolment list, locked against a second ``enroll`` running at the same time."""
        with open(self.path / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield self.identities()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _save(self, items: Sequence[Identity]) -> None:
        text = json.dumps({"format": "edgekit-enrolled/1", "identities": [i.to_dict() for i in items]}, indent=2)
        _write_public(self.path / _ENROLLED, (text + "\n").encode())

    def active(self, role: Optional[str] = None, now: Optional[float] = None) -> List[Identity]:
        return [i for i in self.identities() if i.active(now) and (role is None or i.role == role)]

    # -- issuing -----------------------------------------------------------
    def _issue(self, cn: str, key, *, days: int, server_hosts: Sequence[str] = ()):
        x509, hashes, _, _, EKU, NameOID = _x509()
        now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
        not_after = min(now + dt.timedelta(days=int(days)), self.cert.not_valid_after_utc)
        ca_ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))  # a board's clock may lag a little
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([EKU.SERVER_AUTH if server_hosts else EKU.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        )
        if server_hosts:
            names = []
            for h in server_hosts:
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(h)))
                except ValueError:
                    names.append(x509.DNSName(h))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(self._key, hashes.SHA256())

    def _record(self, name: str, role: str, fleet: Optional[str], cert, hosts: Sequence[str] = ()) -> Identity:
        from cryptography.hazmat.primitives import hashes

        return Identity(name=name, role=role, fleet=fleet, serial=format(cert.serial_number, "x"),
                        not_before=cert.not_valid_before_utc.timestamp(), not_after=cert.not_valid_after_utc.timestamp(),
                        sha256=cert.fingerprint(hashes.SHA256()).hex(), hosts=tuple(hosts))

    def enroll(self, name: str, out: os.PathLike | str, *, role: str = "device", fleet: Optional[str] = "default",
               days: int = LEAF_DAYS, renew: bool = False, force: bool = False) -> Enrolment:
        """Issue a key and a certificate for ``name`` into the new directory ``out``.

        A board (``role="device"``) belongs to ``fleet``; a host tool (collector, pusher, admin)
        serves ``fleet`` or, with ``fleet=None``, every fleet of the broker. A name with a valid
        certificate is refused unless ``renew`` (a second certificate; the first stays valid until
        it expires or is revoked).
        """
        _, _, serialization, _, _, _ = _x509()
        if role not in ROLES:
            raise IdentityError(f"role={role!r} is unknown; use one of {', '.join(ROLES)}")
        _check_name(name, "device" if role == "device" else "name")
        if role == "device" and fleet is None:
            raise IdentityError(f"board {name!r} needs a fleet; pass --fleet (its [device].fleet)")
        if fleet is not None:
            _check_name(fleet, "fleet")
        if int(days) < 1:
            raise IdentityError(f"days={days} must be >= 1")
        out = Path(out)
        if out.exists() and not force:
            raise OutputExistsError(f"{out} exists; choose a new directory or pass --force to replace it")
        cn = common_name(name, role)
        with self._locked() as items:
            live = [i for i in items if i.cn == cn and i.active()]
            if live and not renew:
                raise IdentityError(f"{cn!r} is enrolled already (serial {live[0].serial}, valid until "
                                    f"{_date(live[0].not_after)}); pass --renew for a second certificate, "
                                    f"or `edgekit fleet revoke {name}` first")
            other = [i for i in live if i.role == role and i.fleet != fleet]
            if other:
                raise IdentityError(f"{cn!r} is enrolled for fleet {other[0].fleet!r}, not {fleet!r}; "
                                    f"revoke it first to move it")
            key = _new_key()
            cert = self._issue(cn, key, days=days)
            identity = self._record(name, role, fleet, cert)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
            try:
                os.chmod(tmp, 0o700)
                _write_private(tmp / "client.key", _key_pem(key))
                _write_public(tmp / "client.crt", cert.public_bytes(serialization.Encoding.PEM))
                shutil.copyfile(self.ca_file, tmp / "ca.crt")
                os.chmod(tmp / "ca.crt", 0o644)
                _write_public(tmp / "identity.json", (json.dumps(
                    {"format": "edgekit-identity/1", **identity.to_dict()}, indent=2) + "\n").encode())
                if out.exists():
                    shutil.rmtree(out)
                os.replace(tmp, out)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            self._save([*items, identity])
        return Enrolment(out, out / "client.crt", out / "client.key", out / "ca.crt", identity)

    def server_certificate(self, hosts: Sequence[str], out: Path, *, days: int = LEAF_DAYS) -> Tuple[Path, Path]:
        """A broker certificate for ``hosts`` (DNS names or IP addresses): ``out/server.crt`` and ``server.key``."""
        _, _, serialization, _, _, _ = _x509()
        if not hosts:
            raise IdentityError("the broker certificate needs at least one host name or address (--host)")
        for h in hosts:
            if not h or any(c.isspace() for c in h) or "/" in h:
                raise IdentityError(f"host {h!r} is not a DNS name or an IP address")
        key = _new_key()
        cert = self._issue(f"broker:{hosts[0]}", key, days=days, server_hosts=hosts)
        crt, kfile = out / "server.crt", out / "server.key"
        if kfile.exists():
            kfile.unlink()
        _write_private(kfile, _key_pem(key))
        _write_public(crt, cert.public_bytes(serialization.Encoding.PEM))
        with self._locked() as items:
            self._save([*items, self._record(hosts[0], "broker", None, cert, hosts)])
        return crt, kfile

    def revoke(self, name: str, role: Optional[str] = None) -> List[Identity]:
        """Revoke every valid certificate of ``name`` (of ``role`` when given); rewrites crl.pem."""
        now = _now()
        with self._locked() as items:
            hit = [i for i in items if i.name == name and i.revoked_at is None and (role is None or i.role == role)]
            if not hit:
                known = sorted({i.name for i in items if i.revoked_at is None})
                raise IdentityError(f"{name!r} has no certificate to revoke; enrolled: {', '.join(known) or 'none'}")
            roles = {i.role for i in hit}
            if len(roles) > 1:
                raise IdentityError(f"{name!r} is enrolled as {' and '.join(sorted(roles))}; pass --role")
            revoked = {i.serial for i in hit}
            items = [Identity(**{**asdict(i), "revoked_at": now}) if i.serial in revoked else i for i in items]
            self._save(items)
            self.write_crl(items)
        return [i for i in items if i.serial in revoked]

    def write_crl(self, items: Optional[Sequence[Identity]] = None) -> Path:
        """crl.pem listing every revoked certificate; valid until the CA itself expires (an expired CRL
        would make the broker refuse every client)."""
        x509, hashes, serialization, _, _, _ = _x509()
        items = self.identities() if items is None else items
        now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject)
                   .last_update(now - dt.timedelta(minutes=5)).next_update(self.cert.not_valid_after_utc))
        for i in items:
            if i.revoked_at is not None:
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder().serial_number(int(i.serial, 16))
                    .revocation_date(dt.datetime.fromtimestamp(i.revoked_at, dt.timezone.utc)).build())
        crl = builder.sign(self._key, hashes.SHA256())
        _write_public(self.crl_file, crl.public_bytes(serialization.Encoding.PEM))
        return self.crl_file

    def allowed_devices(self, now: Optional[float] = None) -> Set[Tuple[str, str]]:
        """``(fleet, device)`` of every board with a valid certificate: the collector's allow-list."""
        return {(i.fleet, i.name) for i in self.active("device", now) if i.fleet}


def init_ca(path: os.PathLike | str, *, name: str = "edgekit fleet CA", days: int = CA_DAYS,
            force: bool = False) -> CertificateAuthority:
    """Create a CA directory (key, certificate, empty enrolment list and CRL)."""
    x509, hashes, serialization, _, _, NameOID = _x509()
    path = Path(path)
    if (path / "ca.key").exists() and not force:
        raise OutputExistsError(f"{path} holds a CA already; every certificate it issued depends on it. "
                                "Choose another directory (or --force to start over and re-enroll everything)")
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{path} exists and is not a directory; choose another path")
    if int(days) < 1:
        raise IdentityError(f"days={days} must be >= 1")
    key = _new_key()
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=int(days)))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        os.chmod(tmp, 0o700)
        _write_private(tmp / "ca.key", _key_pem(key))
        _write_public(tmp / "ca.crt", cert.public_bytes(serialization.Encoding.PEM))
        _write_public(tmp / _ENROLLED, b'{"format": "edgekit-enrolled/1", "identities": []}\n')
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    ca = CertificateAuthority(path)
    ca.write_crl([])
    return ca


def open_ca(path: os.PathLike | str) -> CertificateAuthority:
    return CertificateAuthority(path)


def _read_enrolled(path: Path) -> List[Identity]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return [Identity.from_dict(d) for d in data["identities"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise IdentityError(f"{path} cannot be read ({exc.__class__.__name__}: {exc}); restore it from backup") from exc


def _date(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d")


def read_allow_list(path: os.PathLike | str, now: Optional[float] = None) -> Set[Tuple[Optional[str], str]]:
    """The devices a collector takes messages from.

    ``path`` is a CA directory or a copy of its ``enrolled.json`` (every board with a valid
    certificate, in its fleet), or a text file with one ``fleet/device`` or ``device`` (any fleet)
    per line, ``#`` comments.
    """
    p = Path(path)
    if p.is_dir():
        return set(_read_enrolled_devices(p / _ENROLLED, now))
    if p.suffix == ".json":  # a copy of a CA's enrolled.json (the collector's host need not hold the CA)
        return set(_read_enrolled_devices(p, now))
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise IdentityError(f"allow-list {p} cannot be read ({exc.__class__.__name__}); pass a file with one "
                            "fleet/device per line, or a CA directory") from exc
    out: Set[Tuple[Optional[str], str]] = set()
    for n, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fleet, _, device = line.rpartition("/")
        try:
            check_name(device, "device")
            if fleet:
                check_name(fleet, "fleet")
        except ProtocolError as exc:
            raise IdentityError(f"allow-list {p} line {n}: {exc}") from None
        out.add((fleet or None, device))
    return out


def _read_enrolled_devices(path: Path, now: Optional[float]) -> List[Tuple[Optional[str], str]]:
    if not path.is_file():
        raise IdentityError(f"{path.parent} is not a CA directory (no {path.name}); pass a CA directory or a "
                            "file with one fleet/device per line")
    return [(i.fleet, i.name) for i in _read_enrolled(path) if i.role == "device" and i.active(now) and i.fleet]
