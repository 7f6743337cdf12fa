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
        outbox=str(tmp_path / "outbox.sqlite"), policy={"random_fraction": 1.0, "dedupe": False},
        telemetry={"period_s": 0.5},
    )
    first = _collector(broker.url, store_url, tmp_path / "collector.log")
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
        thread.join(60)
    stats = run["stats"]
    assert stats.pending == 0 and stats.published == stats.flagged == 3000
    assert 200 <= stored_before < 3000, f"stored {stored_before} before the kill; the test did not test a restart"

    second = _collector(broker.url, store_url, tmp_path / "collector.log", "--until-idle", "2")
    out, _ = second.communicate(timeout=60)
    assert second.returncode == 0, out
    sent = {json.loads(line)["sample_id"] for line in results.read_text().splitlines() if '"sample_id"' in line}
    assert len(sent) == 3000
    with open_store(store_url) as store:
        stored = {r.sample_id for r in store.list_samples()}
        assert stored == sent
        assert store.devices()[0].device == "pi-restart"


def test_sigterm_stops_the_collector_cleanly_with_its_counters(broker, tmp_path):
    proc = _collector(broker.url, f"sqlite:///{tmp_path}/s.db", tmp_path / "collector.log")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    assert out.strip().splitlines()[-1].startswith("received=0 stored=0")
    assert "collector stopped" in (tmp_path / "collector.log").read_text()
