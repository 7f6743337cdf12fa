"""TLS with a CA and a client certificate, username/password, MQTT 3.1.1: against a Mosquitto that demands all three."""

from __future__ import annotations

import getpass
import subprocess
import sys
import time

import pytest

from device_agent.agent import Agent
from device_agent.sources import ArraySource

from broker import free_port, port_open  # tests/broker.py, on the path through tests/conftest.py
from conftest import BUNDLE, ROOT


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def tls_broker(tmp_path):
    d = tmp_path / "pki"
    d.mkdir()
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
            "-subj", "/CN=edgekit-test-ca", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name, cn in (("server", "127.0.0.1"), ("client", "dev1")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={cn}", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.crt", "-days", "2", *(["-extfile", "san.ext"] if name == "server" else []), cwd=d)
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(d / "passwd"), "board", "s3cret"], check=True)
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text("\n".join([
        f"user {getpass.getuser()}",
        f"listener {port} 127.0.0.1",
        "allow_anonymous false",
        f"password_file {d / 'passwd'}",
        f"cafile {d / 'ca.crt'}",
        f"certfile {d / 'server.crt'}",
        f"keyfile {d / 'server.key'}",
        "require_certificate true",
        "log_type error",
    ]) + "\n")
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not port_open(port) and time.monotonic() < deadline:
        time.sleep(0.05)
    yield port, d
    proc.terminate()
    proc.wait(10)


def test_tls_client_certificate_and_password_over_mqtt_311(tls_broker, make_config, digits, tmp_path):
    port, pki = tls_broker
    x, _ = digits
    # No collector on this broker: ack = "broker" lets a sample go on its PUBACK (what an older collector needs).
    mqtt = {"protocol": "3.1.1", "username": "board", "password": "s3cret", "ca_file": str(pki / "ca.crt"),
            "cert_file": str(pki / "client.crt"), "key_file": str(pki / "client.key"), "ack": "broker"}
    config = make_config(f"mqtts://127.0.0.1:{port}", mqtt=mqtt, policy={"random_fraction": 1.0, "dedupe": False})
    with Agent(config, source=ArraySource(x[:10])) as agent:
        stats = agent.run()
    assert (stats.flagged, stats.published, stats.pending) == (10, 10, 0)

    # The same broker refuses a wrong password, and `check` says so.
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[mqtt]\n" + "".join(f'{k} = "{v}"\n' for k, v in {**mqtt, "password": "wrong"}.items()))
    proc = subprocess.run([sys.executable, "-m", "device_agent", "check", "--config", str(cfg), "--bundle", str(BUNDLE),
                           "--broker", f"mqtts://127.0.0.1:{port}", "--outbox", str(tmp_path / "o2.sqlite"),
                           "--timeout", "3"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("FAIL broker")][0]
    assert "refused" in line and "authorized" in line.lower(), line
