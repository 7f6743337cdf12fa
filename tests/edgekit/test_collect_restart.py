"""The collector is killed (SIGKILL) while a real agent publishes, and started again: nothing is lost.

The publisher is the real device agent (``device_agent.agent.Agent``) on the
test digits bundle, flagging every input; the collector is the ``edgekit
collect`` command in its own process, so the kill is a real crash.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from device_agent.agent import Agent
from device_agent.config import load_config
from edgekit.loop.store import open_store

DATA = Path(__file__).resolve().parents[1] / "device_agent" / "data"
ROOT = Path(__file__).resolve().parents[2]


def _collector(broker_url: str, store_url: str, log: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "a") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgekit", "collect", "--broker", broker_url, "--store", store_url,
             "--fleet", "restart", "--client-id", "restart-collector", *extra],
            stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT, env=env,
        )
    line = proc.stdout.readline()
    if not line.startswith("collecting into"):
        proc.kill()
        raise AssertionError(f"collector did not start: {line!r}; {log.read_text()}")
    return proc


def test_a_collector_killed_mid_stream_loses_nothing_after_restart(broker, tmp_path):
    store_url = f"sqlite:///{tmp_path}/samples.db"
    digits = np.load(DATA / "digits-300.npz")["x"]
    np.savez(tmp_path / "inputs.npz", x=np.concatenate([digits] * 10))  # 3000 inputs, every one flagged
    results = tmp_path / "results.jsonl"
    config = load_config(
        None, bundle=str(DATA / "digits-bundle"), source=str(tmp_path / "inputs.npz"), broker=broker.url,
        device_id="pi-restart", fleet="restart", results=str(results), runtime="ai_edge_litert",
        outbox={"path": str(tmp_path / "outbox.sqlite"), "drain_timeout_s": 180.0},
        policy={"random_fraction": 1.0, "dedupe": False}, telemetry={"period_s": 0.5},
        # What the killed collector committed but had not acknowledged yet goes again after 2 s.
        mqtt={"ack_timeout_s": 2.0},
    )
    log = tmp_path / "collector.log"
    first = _collector(broker.url, store_url, log)
    run = {}
    with Agent(config) as agent:
        thread = threading.Thread(target=lambda: run.setdefault("stats", agent.run()))
        thread.start()
        with open_store(store_url) as store:
            deadline = time.monotonic() + 30
            while store.count_samples() < 200 and time.monotonic() < deadline:
                time.sleep(0.01)
            first.send_signal(signal.SIGKILL)
            first.wait(10)
            stored_before = store.count_samples()
        assert agent.outbox.depth > 0, "the board must still hold what no collector acknowledged"
        second = _collector(broker.url, store_url, log)  # the same client id: the broker kept its session
        thread.join(200)
        second.send_signal(signal.SIGTERM)
        out, _ = second.communicate(timeout=60)
    assert second.returncode == 0, out
    stats = run["stats"]
    assert (stats.flagged, stats.published, stats.pending, stats.dropped) == (3000, 3000, 0, 0)
    assert 200 <= stored_before < 3000, f"stored {stored_before} before the kill; the test did not test a restart"
    sent = {json.loads(line)["sample_id"] for line in results.read_text().splitlines() if '"sample_id"' in line}
    assert len(sent) == 3000
    with open_store(store_url) as store:
        stored = {r.sample_id for r in store.list_samples()}
        assert stored == sent
        assert store.devices()[0].device == "pi-restart"


def _start(cmd: list, tmp_path: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), **kw)


def _collect_cmd(broker_url: str, store: Path) -> list:
    return [sys.executable, "-m", "edgekit", "collect", "--broker", broker_url, "--store", f"sqlite:///{store}",
            "--client-id", f"sigterm-{time.monotonic_ns()}"]


def _assert_clean_exit(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, (proc.returncode, out, err)
    assert "Traceback" not in err and "interrupted" not in err, err
    assert out.strip().splitlines()[-1].startswith("received=0 stored=0"), out
    return err


def test_sigterm_stops_the_collector_cleanly_with_its_counters(broker, tmp_path):
    proc = _start(_collect_cmd(broker.url, tmp_path / "s.db"), tmp_path)
    assert proc.stdout.readline().startswith("collecting into")  # the marker: it is collecting
    proc.send_signal(signal.SIGTERM)
    assert "collector stopped" in _assert_clean_exit(proc)


def test_sigterm_while_connecting_stops_the_collector_cleanly(broker, tmp_path):
    """The broker is frozen (SIGSTOP): the TCP connection opens, no CONNACK comes, the collector waits."""
    broker.proc.send_signal(signal.SIGSTOP)
    try:
        proc = _start(_collect_cmd(broker.url, tmp_path / "s.db"), tmp_path)
        for line in proc.stderr:  # the marker: it is connecting
            if "connecting to" in line:
                break
        proc.send_signal(signal.SIGTERM)
        err = _assert_clean_exit(proc)
    finally:
        broker.proc.send_signal(signal.SIGCONT)
    assert "stop requested while connecting" in err


def test_sigterm_at_the_earliest_moment_stops_the_collector_cleanly(broker, tmp_path):
    """SIGTERM sent the moment the process exists, before Python has even started. Blocked in the child
    (the mask is inherited), it stays pending until ``edgekit``'s main() has installed its handler, so
    this is a signal that arrived before the handler, delivered at the first moment it can be seen."""
    store = tmp_path / "s.db"
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        proc = _start(_collect_cmd(broker.url, store), tmp_path)
        proc.send_signal(signal.SIGTERM)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    _assert_clean_exit(proc)
    assert not store.exists(), "it stopped before opening anything"
