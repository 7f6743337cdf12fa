"""Fleet identity without a broker: the CA, enrolment, revocation, the broker's ACL, installing a board's certificate."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from device_agent.config import load_config
from edgekit.cli import main
from edgekit.errors import IdentityError
from edgekit.fleet.broker_config import acl_text, write_broker_config
from edgekit.fleet.identity import init_ca, open_ca, read_allow_list

ROOT = Path(__file__).resolve().parents[2]
INSTALLER = ROOT / "tools" / "install_agent.py"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA with two boards in `lab`, one in `yard`, a collector and a pusher (made by the CLI)."""
    d = tmp_path_factory.mktemp("pki")
    assert main(["fleet", "ca", "init", str(d / "ca")]) == 0
    for args in (["pi-1", "--fleet", "lab"], ["pi-2", "--fleet", "lab"], ["gate-7", "--fleet", "yard"],
                 ["main", "--role", "collector"], ["ops", "--role", "pusher", "--fleet", "lab"]):
        assert main(["fleet", "enroll", *args, "--ca", str(d / "ca"), "-o", str(d / "ids" / args[0])]) == 0
    return d


def test_the_ca_and_a_board_certificate_are_what_mosquitto_and_paho_expect(pki):
    ca_dir, out = pki / "ca", pki / "ids" / "pi-1"
    assert mode(ca_dir / "ca.key") == 0o600 and mode(ca_dir) == 0o700
    assert mode(out / "client.key") == 0o600 and mode(out / "client.crt") == 0o644
    ca, board = cert(ca_dir / "ca.crt"), cert(out / "client.crt")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    board.verify_directly_issued_by(ca)  # signed by the fleet's CA
    assert board.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "pi-1"  # CN = device id
    assert list(board.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not board.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert (out / "ca.crt").read_bytes() == (ca_dir / "ca.crt").read_bytes()
    ident = json.loads((out / "identity.json").read_text())
    assert (ident["name"], ident["role"], ident["fleet"], ident["cn"]) == ("pi-1", "device", "lab", "pi-1")
    # a host identity's CN can never be a device id (':' is not allowed in one)
    host = cert(pki / "ids" / "main" / "client.crt")
    assert host.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "collector:main"
    # the enrolment list is the collector's allow-list
    assert read_allow_list(ca_dir) == {("lab", "pi-1"), ("lab", "pi-2"), ("yard", "gate-7")}
    assert read_allow_list(ca_dir / "enrolled.json") == read_allow_list(ca_dir)


def test_enrolling_twice_is_refused_in_one_line_and_writes_nothing(pki, tmp_path, capsys):
    out = tmp_path / "again"
    assert main(["fleet", "enroll", "pi-1", "--fleet", "lab", "--ca", str(pki / "ca"), "-o", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("IdentityError: 'pi-1' is enrolled already") and "--renew" in err and "\n" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []
    # a name that is not one topic level, or has a trailing newline (a look-alike of a real board)
    for bad in ("pi 1", "pi-1\n", "a/b", "+", "x" * 65):
        with pytest.raises(IdentityError, match="not a valid name"):
            open_ca(pki / "ca").enroll(bad, tmp_path / "bad", fleet="lab")
    assert not (tmp_path / "bad").exists()
    assert main(["fleet", "enroll", "pi-1", "--ca", str(tmp_path / "nope"), "-o", str(out)]) == 1
    assert "is not a CA directory" in capsys.readouterr().err


def test_revoke_lists_the_serial_in_the_crl_and_leaves_the_allow_list(tmp_path, capsys):
    ca = init_ca(tmp_path / "ca")
    first = ca.enroll("pi-5", tmp_path / "a", fleet="lab").identity
    second = ca.enroll("pi-5", tmp_path / "b", fleet="lab", renew=True).identity  # e.g. a new SD card
    assert first.serial != second.serial and ("lab", "pi-5") in ca.allowed_devices()
    assert main(["fleet", "revoke", "pi-5", "--ca", str(tmp_path / "ca")]) == 0
    crl = x509.load_pem_x509_crl((tmp_path / "ca" / "crl.pem").read_bytes())
    assert crl.is_signature_valid(ca.cert.public_key())
    assert {format(r.serial_number, "x") for r in crl} == {first.serial, second.serial}
    assert ca.allowed_devices() == set()
    assert main(["fleet", "revoke", "pi-5", "--ca", str(tmp_path / "ca")]) == 1
    assert "has no certificate to revoke" in capsys.readouterr().err
    # enrolled again after revocation: a fresh certificate, allowed again
    ca.enroll("pi-5", tmp_path / "c", fleet="lab")
    assert ca.allowed_devices() == {("lab", "pi-5")}


def test_the_acl_confines_boards_to_their_own_topics_and_gives_hosts_their_role(pki, tmp_path):
    ca = open_ca(pki / "ca")
    cfg = write_broker_config(ca, tmp_path / "broker", hosts=["broker.lan", "10.0.0.5"], port=8883)
    assert cfg.fleets == ("lab", "yard")  # every fleet with an enrolled board
    acl = cfg.acl.read_text()
    rules = [ln for ln in acl.splitlines() if ln and not ln.startswith("#")]
    board = [f"pattern {a} edgekit/v1/{f}/%u/{k}" for f in ("lab", "yard") for a, k in (
        ("write", "samples"), ("write", "telemetry"), ("write", "status"), ("write", "predictions"),
        ("read", "cmd"), ("read", "bundle"), ("read", "ack"))]
    collector = ["user collector:main"] + [f"topic {a} edgekit/v1/{f}/+/{k}" for f in ("lab", "yard") for a, k in (
        ("read", "samples"), ("read", "telemetry"), ("read", "status"), ("write", "ack"))]
    pusher = ["user pusher:ops", "topic write edgekit/v1/lab/+/bundle", "topic write edgekit/v1/lab/+/cmd",
              "topic read edgekit/v1/lab/+/status"]  # enrolled for lab only
    assert rules == board + collector + pusher
    conf = cfg.conf.read_text()
    for line in ("require_certificate true", "use_identity_as_username true", "use_username_as_clientid true",
                 "allow_anonymous false",
                 "listener 8883", f"acl_file {cfg.dir.resolve()}/acl.conf", f"crlfile {cfg.dir.resolve()}/crl.pem"):
        assert line in conf.splitlines()
    server = cert(cfg.dir / "server.crt")
    server.verify_directly_issued_by(ca.cert)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.lan"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert mode(cfg.dir / "server.key") == 0o600

    # --any-fleet: '+' for the fleet level; the device level stays the certificate's CN
    assert "pattern write edgekit/v1/+/%u/samples" in acl_text(["+"], [])
    with pytest.raises(IdentityError, match="no fleet to serve"):
        write_broker_config(init_ca(tmp_path / "empty"), tmp_path / "b2", hosts=["h"])
    assert not (tmp_path / "b2").exists()


def install(*args):
    return subprocess.run([sys.executable, str(INSTALLER), *args], capture_output=True, text=True, timeout=60)


def test_install_agent_puts_the_certificate_in_place_with_safe_modes(pki, tmp_path):
    ids = pki / "ids" / "pi-2"
    root = tmp_path / "root"
    dry = install("--board", "rpi-4", "--root", str(root), "--no-venv", "--broker", "mqtts://hub.lan:8883",
                  "--identity", str(ids), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"would copy {ids / 'client.key'} -> {root / 'etc/edgekit/tls/client.key'} (mode 0600)" in dry.stdout
    assert not root.exists()

    proc = install("--board", "rpi-4", "--root", str(root), "--no-venv", "--broker", "mqtts://hub.lan:8883",
                   "--identity", str(ids))
    assert proc.returncode == 0, proc.stderr
    tls = root / "etc/edgekit/tls"
    assert mode(tls) == 0o750 and mode(tls / "client.key") == 0o600 and mode(tls / "client.crt") == 0o644
    assert (tls / "client.key").read_bytes() == (ids / "client.key").read_bytes()
    config = load_config(root / "etc/edgekit/agent.toml")
    assert (config.device.id, config.device.fleet) == ("pi-2", "lab")  # from the certificate's enrolment
    m = config.mqtt
    assert (m.ca_file, m.cert_file, m.key_file) == ("/etc/edgekit/tls/ca.crt", "/etc/edgekit/tls/client.crt",
                                                    "/etc/edgekit/tls/client.key")
    assert m.broker == "mqtts://hub.lan:8883" and m.tls

    # wrong combinations: one line each, nothing written
    for args, says in (
        (["--identity", str(ids), "--broker", "mqtt://hub.lan:1883"], "pass --broker mqtts://"),
        (["--identity", str(ids), "--broker", "mqtts://h:8883", "--device-id", "pi-1"], "the broker would refuse"),
        (["--identity", str(pki / "ids" / "main"), "--broker", "mqtts://h:8883"], "is a collector identity"),
        (["--cert", str(ids / "client.crt"), "--key", str(pki / "ids/pi-1/client.key"), "--ca", str(ids / "ca.crt"),
          "--broker", "mqtts://h:8883"], "the key must belong to the certificate"),
        (["--cert", str(ids / "client.crt"), "--broker", "mqtts://h:8883"], "go together"),
    ):
        bad = install("--board", "rpi-4", "--root", str(tmp_path / "r2"), "--no-venv", *args)
        assert bad.returncode == 1 and says in bad.stderr and bad.stderr.count("\n") == 1, bad.stderr
        assert not (tmp_path / "r2").exists()


def test_the_acl_shown_in_the_docs_is_the_one_generated():
    from edgekit.fleet.identity import Identity

    doc = (ROOT / "docs" / "identity.md").read_text(encoding="utf-8")
    block = doc.split("The generated `acl.conf`", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    hosts = [Identity("main", "collector", None, "1", 0, 1, ""), Identity("ops", "pusher", None, "2", 0, 1, "")]
    generated = [ln for ln in acl_text(["lab"], hosts).splitlines() if ln and not ln.startswith("#")]
    assert [ln for ln in block.splitlines() if ln] == generated
