"""A full disk: the agent runs its outbox and result lines on a 2 MiB filesystem made for the test.

A tmpfs of 2 MiB is mounted for the test (the tests run as root; CI too). The broker is down while the
disk fills, so every flagged sample stays in the outbox: the oldest are dropped to make room, counted
exactly, the agent keeps classifying, a restart on the full disk starts and runs, and when the broker
comes back the outbox drains and the disk has room again: nothing more is dropped.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from device_agent.sources import Source

from broker import Mosquitto
from conftest import Acker, wait_for
from test_update import Running

FLAG_ALL = {"random_fraction": 1.0, "dedupe": False}


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MiB filesystem (tmpfs), unmounted after the test."""
    where = tmp_path / "disk"
    where.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"cannot mount a 2 MiB tmpfs for the full-disk test ({proc.stderr.strip()}); run the tests as "
                    "root (CI does)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


class Forever(Source):
    """Real digits, over and over, as fast as the agent takes them (every one flagged: thousands of samples a
    second into the 2 MiB disk while the broker drains it; a throttled source hid that the result lines took
    every page the drained outbox gave back)."""

    finite = False

    def __init__(self, x):
        self.x = x

    def items(self, stop):
        for i in itertools.count():
            if stop.is_set():
                return
            yield {"uri": "forever", "index": i}, self.x[i % len(self.x)]


def free(path: Path) -> int:
    return shutil.disk_usage(path).free


@pytest.mark.slow
def test_a_full_disk_drops_the_oldest_samples_counted_and_recovers_by_itself(small_disk, make_config, digits,
                                                                           tmp_path):
    x, _ = digits
    broker = Mosquitto(tmp_path / "broker")  # not started yet: the broker is down while the disk fills
    config = make_config(broker.url, policy=FLAG_ALL,
                         outbox={"path": str(small_disk / "outbox.sqlite"), "drain_timeout_s": 0.5},
                         results={"path": str(small_disk / "results.jsonl")})

    run = Running(config, Forever(x))
    agent = run.agent
    try:
        assert wait_for(lambda: agent.outbox.dropped > 0, 120), "the disk never filled"
        assert agent.outbox.max_bytes > 8 * shutil.disk_usage(small_disk).total  # the disk, not the byte cap
        n = agent.stats.inferences
        assert wait_for(lambda: agent.stats.inferences >= n + 2000, 120), "classifying stopped on a full disk"
        assert run.thread.is_alive()
    finally:
        first = run.finish()
    assert first.published == 0 and first.flagged == first.inferences
    assert first.flagged == first.pending + first.dropped  # every flagged sample stored or counted as dropped
    assert first.dropped > 0
    assert set(first.errors) <= {"results"}  # result lines that found no room are counted, nothing else failed

    # A restart while the disk is still full: it starts, classifies and counts (the issue: died 17 s in).
    run = Running(config, Forever(x))
    agent = run.agent
    try:
        start_dropped = agent.outbox.dropped
        assert wait_for(lambda: agent.outbox.dropped > start_dropped + 100, 120)
        assert run.thread.is_alive()

        # The broker comes back, and a collector acknowledging what it stores: the outbox drains and the
        # disk has room again; nothing more is dropped.
        broker.start()
        acker = Acker(broker.port).start()
        assert wait_for(lambda: agent.publisher.published > 200, 60), "nothing was published"
        assert wait_for(lambda: agent.outbox.depth < 50, 60), f"the outbox did not drain ({agent.outbox.depth})"
        settled = agent.outbox.dropped
        n = agent.stats.flagged
        # 300 more samples: what the drained outbox's pages and the free space hold even when the acker falls
        # behind. (With 1000, on a busy machine, the result lines and a lagging acker filled the 2 MiB disk again,
        # and then dropping the oldest is the right thing to do, not a failure.)
        assert wait_for(lambda: agent.stats.flagged >= n + 300, 120)
        assert agent.outbox.dropped == settled, "samples were still dropped with room on the disk"
        assert wait_for(lambda: agent.outbox.reserve_path.exists(), 30), "the reserve was not taken back"
        lines = small_disk / "results.jsonl"
        size = lines.stat().st_size
        assert wait_for(lambda: lines.stat().st_size > size + 10_000, 30), "result lines were not written again"
    finally:
        second = run.finish()
        if "acker" in locals():
            acker.stop()
        broker.stop()
    # every sample is accounted for: the ones run 1 left, plus the new ones, were published, stayed or were dropped
    assert first.pending + second.flagged == second.published + second.pending + second.dropped
    assert set(second.errors) <= {"results"}


def test_a_drain_that_fails_on_the_outbox_ends_the_run_normally_and_keeps_the_samples(make_config, digits):
    """The stop's drain deletes what was acknowledged; on a full disk that DELETE fails ("database or disk is
    full", seen in the test above on a busy machine). The run must still end with its stats, the failure counted
    and the samples kept for the next start, not end in an exception out of Agent.run."""
    import socket
    import sqlite3

    from device_agent.agent import Agent
    from device_agent.sources import ArraySource

    with socket.socket() as s:  # a port nothing listens on: the publisher exists, the link never connects
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    x, _ = digits
    config = make_config(f"mqtt://127.0.0.1:{port}", policy=FLAG_ALL, outbox={"drain_timeout_s": 0.3})
    with Agent(config, source=ArraySource(x[:20])) as agent:
        pumped = agent.publisher.pump

        def pump(wait_s=0.0):
            if wait_s > 0:  # the drain's pumps
                raise sqlite3.OperationalError("database or disk is full")
            return pumped(wait_s)

        agent.publisher.pump = pump
        stats = agent.run()
    assert stats.inferences == stats.flagged == stats.pending == 20
    assert stats.errors.get("outbox", 0) >= 1


def _fill(disk: Path, leave: int) -> Path:
    """A file that takes the disk's room until about ``leave`` bytes are free."""
    filler = disk / "filler"
    with open(filler, "wb") as fh:
        fh.write(b"\0" * max(0, free(disk) - leave))
    return filler


def _whole_lines(path: Path) -> list:
    import json

    text = path.read_text()
    assert text == "" or text.endswith("\n"), "a line was cut short"
    return [json.loads(ln) for ln in text.splitlines()]


def test_result_lines_leave_the_last_bytes_of_the_disk_to_the_outbox_and_come_back(small_disk):
    """On a board the outbox shares the results' disk, and its samples need the room more than a log of
    predictions: result lines stop, counted, before they would leave less than keep_free bytes, and are written
    again as soon as there is room."""
    from device_agent.results import ResultsWriter

    lost = []
    path = small_disk / "results.jsonl"
    keep = 256 * 1024
    filler = _fill(small_disk, keep + 40_000)
    with ResultsWriter(str(path), flush_every_s=0.0, on_error=lambda: lost.append(1), keep_free=keep) as w:
        for i in range(200):  # ~100 KB of lines, 500 bytes each, flushed one by one
            w.write({"seq": i, "pad": "x" * 480})
            w.flush()
        written = _whole_lines(path)
        assert 40 <= len(written) <= 80, len(written)  # about the 40 KB above keep_free, not one line more
        assert free(small_disk) >= keep
        assert len(lost) == w.lost == 200 - len(written)
        assert [ln["seq"] for ln in written] == list(range(len(written)))
        filler.unlink()
        w.write({"seq": 1000})
        w.flush()
    assert _whole_lines(path)[-1] == {"seq": 1000}  # room again: written again, with nothing else to do


def test_a_block_the_full_disk_cuts_short_leaves_only_whole_lines(small_disk, monkeypatch):
    """A disk that fills in the middle of a block (another writer took the room): the lines it took are cut off
    again, so whoever reads the file never meets half a line; the block is counted lost, and once there is room
    lines are appended again."""
    import device_agent.results as results

    monkeypatch.setattr(results, "_RETRY_S", 0.0)
    path = small_disk / "results.jsonl"
    with results.ResultsWriter(str(path), flush_every_s=60.0, keep_free=0) as w:
        w.write({"seq": -1})
        w.flush()
        filler = _fill(small_disk, 6_000)
        for i in range(40):  # 40 KB in one block, on a disk with about 6 KB left
            w.write({"seq": i, "pad": "x" * 1000})
        w.flush()
        assert w.lost == 40
        assert _whole_lines(path) == [{"seq": -1}]
        filler.unlink()
        w.write({"seq": 99})
        w.flush()
    assert _whole_lines(path) == [{"seq": -1}, {"seq": 99}]
