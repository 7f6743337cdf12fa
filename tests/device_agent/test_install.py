"""tools/install_agent.py into a temporary root: unit, config and bundle in place; dry-run touches nothing."""

from __future__ import annotations

import configparser
import subprocess
import sys

from device_agent.config import load_config
from device_agent.update.manifest import load_bundle

from conftest import BUNDLE, ROOT

INSTALLER = ROOT / "tools" / "install_agent.py"


def install(*args):
    return subprocess.run([sys.executable, str(INSTALLER), *args], capture_output=True, text=True, timeout=60)


def test_install_into_a_root(tmp_path):
    root = tmp_path / "root"
    proc = install("--board", "rpi-zero-2w", "--root", str(root), "--no-venv", "--broker", "mqtts://hub.lan:8883",
                   "--device-id", "pi-zero-7", "--fleet", "orchard", "--bundle", str(BUNDLE))
    assert proc.returncode == 0, proc.stderr

    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str
    unit.read(root / "etc/systemd/system/edgekit-agent.service")
    service = unit["Service"]
    assert service["ExecStart"] == "/opt/edgekit/venv/bin/edgekit-agent run --config /etc/edgekit/agent.toml"
    assert service["Restart"] == "on-failure"
    assert service["Type"] == "notify" and int(service["WatchdogSec"]) > 0
    assert service["MemoryMax"] == "200M"  # the Zero 2 W has 512 MB
    assert unit["Install"]["WantedBy"] == "multi-user.target"

    config = load_config(root / "etc/edgekit/agent.toml")
    assert (config.device.id, config.device.fleet) == ("pi-zero-7", "orchard")
    assert config.mqtt.broker == "mqtts://hub.lan:8883" and config.mqtt.tls
    assert config.bundle.path == "/opt/edgekit/bundle"
    assert config.outbox.path == "/var/lib/edgekit/outbox.sqlite"
    assert config.runtime.threads == 2
    assert load_bundle(root / "opt/edgekit/bundle").manifest.name == "digits"
    assert (root / "var/lib/edgekit/inbox").is_dir()

    # A second run keeps the board's edited config unless --force.
    edited = (root / "etc/edgekit/agent.toml").read_text() + "\n# edited on the board\n"
    (root / "etc/edgekit/agent.toml").write_text(edited)
    assert install("--board", "rpi-zero-2w", "--root", str(root), "--no-venv").returncode == 0
    assert (root / "etc/edgekit/agent.toml").read_text() == edited


def test_dry_run_prints_every_step_and_changes_nothing(tmp_path):
    root = tmp_path / "root"
    proc = install("--board", "rpi-4", "--root", str(root), "--dry-run", "--bundle", str(BUNDLE))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "would run " in out and " -m venv " in out and "[device]" in out
    assert "would write " + str(root / "etc/systemd/system/edgekit-agent.service") in out
    assert "would write " + str(root / "etc/edgekit/agent.toml") in out
    assert not root.exists()


def test_trusted_keys_are_installed_and_an_unsigned_bundle_is_refused_before_anything_is_written(tmp_path):
    from device_agent.update.signature import Verifier, load_public_key

    from signing import Key, signed_copy

    owner = Key(tmp_path / "keys")
    root = tmp_path / "root"
    dry = install("--board", "rpi-4", "--root", str(root), "--no-venv", "--dry-run", "--trusted-key", str(owner.pub))
    assert dry.returncode == 0, dry.stderr
    board_key = f"/etc/edgekit/trusted_keys/{owner.key_id[:16]}.pub"
    assert f"would trust key {owner.key_id[:16]}... ({owner.pub})" in dry.stdout
    assert f"would copy {owner.pub} -> {root}{board_key} (mode 0644)" in dry.stdout
    assert not root.exists()

    refused = install("--board", "rpi-4", "--root", str(root), "--no-venv", "--bundle", str(BUNDLE),
                      "--trusted-key", str(owner.pub))
    assert refused.returncode == 1 and "is not signed by a --trusted-key" in refused.stderr
    assert not root.exists()  # nothing half-installed

    signed = signed_copy(BUNDLE, tmp_path / "signed", owner, 1)
    proc = install("--board", "rpi-4", "--root", str(root), "--no-venv", "--bundle", str(signed),
                   "--trusted-key", str(owner.pub))
    assert proc.returncode == 0, proc.stderr
    config = load_config(root / "etc/edgekit/agent.toml")
    assert config.update.trusted_keys == (board_key,)
    key = load_public_key(root / board_key.lstrip("/"))
    assert key.key_id == owner.key_id
    assert Verifier([key], tmp_path / "r.json").verify_dir(root / "opt/edgekit/bundle").release == 1

    private = tmp_path / "keys" / "signing.key"
    private.write_text("-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n")
    wrong = install("--board", "rpi-4", "--root", str(tmp_path / "r2"), "--no-venv", "--trusted-key", str(private))
    assert wrong.returncode == 1 and "is a private key" in wrong.stderr
