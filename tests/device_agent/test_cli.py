"""``edgekit-agent check`` and ``bench``, and systemd's watchdog fed by the loop."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading

from device_agent.agent import Agent
from device_agent.bench import choose_runtime
from device_agent.config import load_config
from device_agent.sources import ArraySource

from conftest import BUNDLE, ROOT, wait_for

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


def _notify_socket(tmp_path, monkeypatch, usec: str) -> socket.socket:
    path = str(tmp_path / "notify.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", usec)
    return server


def test_the_loop_feeds_the_systemd_watchdog(tmp_path, monkeypatch, make_config, digits):
    x, _ = digits
    server = _notify_socket(tmp_path, monkeypatch, "10000")  # a 10 ms watchdog: fed every 5 ms
    got = []

    def read():  # like systemd: read as messages come
        try:
            while True:
                data = server.recv(64)
                if not data:  # shut down below
                    return
                got.append(data.decode())
        except OSError:
            pass

    class UntilFed(ArraySource):
        """Digits until the agent has fed the watchdog three times (a fast loop can classify 300 of them within
        one 5 ms half-period): the run lasts as long as the test needs, whatever the machine's speed."""

        def items(self, stop):
            i = 0
            while agent.watchdog.sent < 4 and i < 10_000_000:  # READY=1 + three WATCHDOG=1
                yield {"uri": self.uri, "index": i}, self.x[i % len(self.x)]
                i += 1

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    with Agent(make_config(""), source=UntilFed(x)) as agent:
        agent.run()
        watchdog = agent.watchdog
        # All that was sent has arrived, so the queue has room for STOPPING=1 (a reader starved of CPU, as
        # under qemu, may have let some WATCHDOG=1 be dropped meanwhile: counted, never waited for).
        assert wait_for(lambda: len(got) == watchdog.sent, 30), (len(got), watchdog.sent)
    assert wait_for(lambda: got and got[-1] == "STOPPING=1", 30), got
    server.shutdown(socket.SHUT_RDWR)
    server.close()
    reader.join(10)
    assert got[0] == "READY=1"  # into an empty queue
    assert got.count("WATCHDOG=1") >= 2
    assert len(got) == watchdog.sent


def test_a_watchdog_socket_nobody_reads_never_blocks_the_loop(tmp_path, monkeypatch, make_config, digits):
    """systemd busy: the socket's queue is full before the agent starts, so every send would wait forever."""
    x, _ = digits
    server = _notify_socket(tmp_path, monkeypatch, "2000")
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    queued = 0
    try:
        while queued < 100_000:
            filler.sendto(b"filler", socket.MSG_DONTWAIT, str(tmp_path / "notify.sock"))
            queued += 1
    except BlockingIOError:
        pass
    filler.close()
    assert 0 < queued < 100_000  # the queue is full (net.unix.max_dgram_qlen)
    agent = Agent(make_config(""), source=ArraySource(x[:50]))
    out = {}
    runner = threading.Thread(target=lambda: out.setdefault("stats", agent.run()), daemon=True)
    runner.start()
    finished = wait_for(lambda: not runner.is_alive(), 120)
    if not finished:
        server.close()  # wakes a loop stuck in sendto(), so the test fails instead of hanging
        runner.join(30)
        agent.close()
    assert finished, "the loop blocked on the watchdog socket"
    assert out["stats"].inferences == 50
    before = agent.watchdog.dropped
    agent.close()
    server.close()
    assert agent.watchdog.dropped == before + 1  # STOPPING=1 into the full queue: dropped, not waited for
    assert before >= 1  # READY=1 at least; every WATCHDOG=1 too


def test_no_watch_runs_a_batch_on_a_profile_that_watches_a_folder(tmp_path):
    """firmware_configs/rpi-4.toml watches a folder; --no-watch lets the same profile classify an .npz and stop."""
    common = ["--config", str(ROOT / "firmware_configs" / "rpi-4.toml"), "--bundle", str(BUNDLE), "--source",
              str(DIGITS), "--broker", "", "--outbox", str(tmp_path / "o.sqlite")]
    refused = agent_cli("run", *common)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1] == (
        f"ConfigError: config [source].watch=true needs kind='folder', not 'npz'; "
        f"pass --no-watch (or set watch = false) to classify {DIGITS} once")
    checked = agent_cli("check", *common, "--no-watch")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"ok   source: npz {DIGITS}" in checked.stdout
    ran = agent_cli("run", *common, "--no-watch", "--results", str(tmp_path / "results.jsonl"))
    assert ran.returncode == 0, ran.stderr
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [line["source"]["index"] for line in lines] == list(range(300))
