"""``edgekit-agent check`` and ``bench``, and systemd's watchdog fed by the loop."""

from __future__ import annotations

import json
import socket
import threading
import subprocess
import sys

from device_agent.agent import Agent
from device_agent.bench import choose_runtime
from device_agent.config import load_config
from device_agent.sources import ArraySource

from conftest import BUNDLE, ROOT

DIGITS = BUNDLE.parent / "digits-300.npz"


def agent_cli(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "device_agent", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_check_passes_and_then_names_what_is_wrong(broker, tmp_path):
    common = ["--bundle", str(BUNDLE), "--source", str(DIGITS), "--outbox", str(tmp_path / "o.sqlite")]
    ok = agent_cli("check", *common, "--broker", broker.url)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert [line.split()[1] for line in ok.stdout.splitlines()] == [
        "config:", "bundle:", "signature:", "runtime:", "source:", "outbox:", "broker:"]
    assert "ok   signature: no [update].trusted_keys: this board runs any bundle" in ok.stdout

    broker.stop()
    bad = agent_cli("check", *common, "--broker", broker.url, "--timeout", "1")
    assert bad.returncode == 1
    assert f"FAIL broker: cannot reach the broker {broker.url}" in bad.stdout
    missing = agent_cli("check", "--bundle", str(tmp_path / "nope"), "--broker", "")
    assert missing.returncode == 1
    assert f"FAIL bundle: bundle {tmp_path / 'nope'} does not exist" in missing.stdout


def test_bench_stores_the_fastest_and_auto_uses_it(tmp_path):
    outbox = tmp_path / "state" / "o.sqlite"
    proc = agent_cli("bench", "--bundle", str(BUNDLE), "--runs", "5", "--outbox", str(outbox))
    assert proc.returncode == 0, proc.stderr
    choice = json.loads((tmp_path / "state" / "bench.json").read_text())
    assert "fastest: runtime=" + choice["runtime"] in proc.stdout
    assert len(choice["timings"]) >= 1 and choice["timings"][0]["runtime"] == choice["runtime"]
    config = load_config(None, bundle=str(BUNDLE), outbox=str(outbox), runtime="auto", broker="")
    assert choose_runtime(config) == (choice["runtime"], choice["threads"])
    assert config.runtime.name == "auto"


def test_the_loop_feeds_the_systemd_watchdog(tmp_path, monkeypatch, make_config, digits):
    x, _ = digits
    path = str(tmp_path / "notify.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "2000")  # a 2 ms watchdog: fed at least every millisecond
    got: list = []
    done = threading.Event()

    def read():  # as systemd does, while the agent runs (a full socket queue drops notifications)
        server.settimeout(0.1)
        while not (done.is_set() and got and got[-1] == "STOPPING=1"):
            try:
                got.append(server.recv(64).decode())
            except socket.timeout:
                if done.is_set():
                    return

    reader = threading.Thread(target=read)
    reader.start()
    with Agent(make_config(""), source=ArraySource(x[:50])) as agent:
        agent.run()
    done.set()
    reader.join(10)
    server.close()
    assert got[0] == "READY=1"
    assert got.count("WATCHDOG=1") >= 2
    assert got[-1] == "STOPPING=1"
