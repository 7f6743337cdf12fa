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
