"""``kill -9`` in the middle of a run, then a restart: every flagged sample still arrives."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np

from conftest import BUNDLE, ROOT, validate, wait_for


def write_config(path: Path, tmp: Path, broker_url: str, runtime: str) -> Path:
    path.write_text(f"""
[device]
id = "killme"
fleet = "test"
[bundle]
path = "{BUNDLE}"
[runtime]
name = "{runtime}"
[source]
kind = "folder"
path = "{tmp / 'inbox'}"
watch = true
poll_interval_s = 0.2
[policy]
random_fraction = 1.0
dedupe = true
[mqtt]
broker = "{broker_url}"
reconnect_min_s = 0.2
reconnect_max_s = 1.0
[outbox]
path = "{tmp / 'outbox.sqlite'}"
[telemetry]
period_s = 1.0
[results]
path = "{tmp / 'results.jsonl'}"
""")
    return path


def start_agent(config: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "device_agent", "run", "--config", str(config)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(log, "ab"),
    )


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_sigkill_mid_run_then_restart_loses_nothing(broker, sub_factory, tmp_path, digits, expected_runtime):
    x, _ = digits
    _, first = np.unique(x.reshape(len(x), -1), axis=0, return_index=True)
    keep = sorted(first)[:200]  # distinct inputs: dedupe must not hide any of them
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for i in keep:
        np.save(inbox / f"digit-{i:03d}.npy", x[i])
    names = {f"digit-{i:03d}.npy" for i in keep}

    sub = sub_factory(broker.port)
    broker.stop()  # samples pile up in the outbox: the kill hits unacknowledged ones for sure
    config = write_config(tmp_path / "agent.toml", tmp_path, broker.url, expected_runtime)
    log = tmp_path / "agent.log"
    results = tmp_path / "results.jsonl"

    agent = start_agent(config, log)
    assert wait_for(lambda: lines(results) >= 60, 60), log.read_text()
    agent.send_signal(signal.SIGKILL)
    agent.wait(10)
    with sqlite3.connect(tmp_path / "outbox.sqlite") as db:
        waiting = db.execute("SELECT COUNT(*) FROM samples").fetchone()[0]
    assert waiting >= 60 - 1, "the kill must leave samples in the outbox"  # one line may be unflushed

    broker.start()
    agent = start_agent(config, log)
    try:
        assert wait_for(lambda: {Path(m["source"]["uri"]).name for m in sub.samples()} >= names, 60), (
            sorted(names - {Path(m["source"]["uri"]).name for m in sub.samples()})[:10],
            log.read_text()[-2000:],
        )
    finally:
        agent.send_signal(signal.SIGTERM)
        rc = agent.wait(30)
    assert rc == 0, log.read_text()[-2000:]
    for m in sub.samples()[:20]:
        validate(m)
    text = log.read_text()
    assert f"on {expected_runtime}" in text
    assert "Traceback" not in text
    assert wait_for(lambda: sub.messages("status")[-1]["state"] == "offline", 10)


def test_last_will_says_offline_when_the_agent_dies(broker, sub_factory, tmp_path, digits, expected_runtime):
    x, _ = digits
    (tmp_path / "inbox").mkdir()
    np.save(tmp_path / "inbox" / "one.npy", x[0])
    sub = sub_factory(broker.port, topic="edgekit/v1/test/killme/status")
    config = write_config(tmp_path / "agent.toml", tmp_path, broker.url, expected_runtime)
    agent = start_agent(config, tmp_path / "agent.log")
    try:
        assert sub.wait(lambda s: [m["state"] for m in s.messages("status")][-1:] == ["online"], 30)
    finally:
        agent.send_signal(signal.SIGKILL)
        agent.wait(10)
    assert sub.wait(lambda s: s.messages("status")[-1]["state"] == "offline", 10)  # the broker sent the will
    validate(sub.messages("status")[-1])


def test_cli_run_over_a_batch_exits_when_classified_and_drained(broker, sub_factory, tmp_path, expected_runtime):
    sub = sub_factory(broker.port)
    batch = tmp_path / "batch.npy"
    with np.load(ROOT / "tests/device_agent/data/digits-300.npz") as d:
        np.save(batch, d["x"])
    results = tmp_path / "results.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "device_agent", "run", "--config", str(ROOT / "firmware_configs/generic-linux-x86_64.toml"),
         "--bundle", str(BUNDLE), "--source", str(batch), "--broker", broker.url, "--results", str(results),
         "--outbox", str(tmp_path / "o.sqlite"), "--device-id", "batch", "--fleet", "test"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert [line["source"]["index"] for line in lines] == list(range(300))
    flagged = {line["sample_id"] for line in lines if line["flagged"]}
    assert flagged, "the bundle's own thresholds flag a few of these digits"
    assert f"done: 300 inferences, {len(flagged)} flagged, {len(flagged)} published, 0 dropped, 0 pending" in proc.stderr
    assert sub.wait(lambda s: {m["sample_id"] for m in s.samples()} >= flagged, 10)
