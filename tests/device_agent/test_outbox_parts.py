"""Samples stored as their parts (the raw input bytes, not their base64) and published from memory.

What stays true: the bytes published are those of ``protocol.sample_message`` whether the row was just
committed (read from memory) or read back from SQLite (after a restart, or pushed out of memory); an
outbox written by an agent from before this storage keeps its pending samples, its counters, its
sequence number and its dedupe digests, and they go out byte for byte as they were stored.

``data/outbox-v1.sqlite`` was written by the agent of commit 7fcdb4a (before this storage), with
``Outbox(path, max_bytes=1600)`` and ``put`` of five ``sample_message`` samples of the first five digits
(device ``dev1``, fleet ``test``, sample ids ``00000000-0000-4000-8000-00000000000<i>``, digests
``digest-<i>``): the first two were dropped for room, three wait.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import uuid

import numpy as np

from conftest import DATA, wait_for
from device_agent.agent import Agent
from device_agent.delivery import protocol
from device_agent.delivery.outbox import Outbox
from device_agent.sources import ArraySource

OLD = DATA / "outbox-v1.sqlite"
TOPIC = protocol.topic("test", "dev1", "samples")
FIELDS = {"device": "dev1", "fleet": "test", "model": {"name": "m", "version": "1", "sha256": "0" * 64},
          "prediction": {"label": "a", "confidence": 0.25}, "reasons": ["random"], "source": {"uri": "x"}}


def _sample(i: int, raw: np.ndarray):
    sid = str(uuid.UUID(int=i, version=4))
    fields = dict(FIELDS, seq=i, raw=raw, sample_id=sid, ts=1700000000.0 + i)
    return sid, protocol.sample_parts(**fields), protocol.sample_message(**fields)


def _stored(path) -> list:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT id, sample_id, topic, payload FROM samples ORDER BY id").fetchall()


def test_parts_make_the_same_message_and_store_fewer_bytes():
    raw = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    _, parts, message = _sample(1, raw)
    assert parts.message() == message
    assert parts.data == raw.tobytes() and parts.size < 0.8 * len(message)


def test_parts_are_the_json_of_sample_payload_for_any_input():
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    rng = np.random.default_rng(4)
    big = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    fields = dict(FIELDS, seq=np.int64(9), sample_id="s", ts=2.25, prediction={"label": "\u00e9\n", "k": [1, 2.5]})
    for raw in (big[::2, ::3], big.astype(np.int64), big > 9, rng.normal(size=(3, 2)).astype(np.float16),
                [[1.5, 2.0]], np.float32(3.0), np.ones((2, 2), np.int8).T):
        want = dumps(protocol.sample_payload(raw=raw, **fields)).encode()
        parts = protocol.sample_parts(raw=raw, **fields)
        assert parts.message() == want == protocol.sample_message(raw=raw, **fields)


def test_an_outbox_from_before_parts_keeps_its_pending_samples(tmp_path, digits):
    path = tmp_path / "outbox.sqlite"
    shutil.copy(OLD, path)
    before = _stored(path)
    assert [r[1][-1] for r in before] == ["2", "3", "4"]
    with Outbox(path) as box:
        assert (box.depth, box.dropped, box.bytes) == (3, 2, sum(len(r[3]) for r in before))
        assert box.seen("digest-0") and box.seen("digest-4") and not box.seen("digest-5")
        assert box.next_seq() == 5
        rows = box.pending()
        assert [(r.id, r.sample_id, r.topic, r.payload) for r in rows] == before  # the stored bytes, as they were
        sid, parts, message = _sample(5, digits[0][5])
        box.put(TOPIC, parts, sid, digest="digest-5", seq=5)
        rows = box.pending()
        assert [r.payload for r in rows] == [r[3] for r in before] + [message]
        assert box.bytes == sum(len(r[3]) for r in before) + parts.size
        assert box.ack([rows[0].id, rows[-1].id]) == 2
    with Outbox(path) as box:  # opened again: migrated once, the new row's form read back from SQLite
        assert [r.sample_id for r in box.pending()] == [before[1][1], before[2][1]]
        assert box.next_seq() == 6 and box.dropped == 2 and box.seen("digest-5")


def test_an_agent_on_an_old_outbox_delivers_its_samples_byte_for_byte(broker, sub_factory, make_config, digits,
                                                                     tmp_path):
    shutil.copy(OLD, tmp_path / "outbox.sqlite")  # make_config's outbox path
    before = _stored(tmp_path / "outbox.sqlite")
    sub = sub_factory(broker.port)
    assert sub.synced()
    config = make_config(broker.url, policy={"random_fraction": 1.0, "dedupe": False})
    x, _ = digits
    with Agent(config, source=ArraySource(x[:20])) as agent:
        stats = agent.run()
    assert stats.pending == 0 and stats.flagged == 20 and stats.published == 23
    assert wait_for(lambda: len(sub.samples()) >= 23, 20)
    with sub._lock:
        got = {p: t for t, p in sub.lines if t.endswith("/samples")}  # payload text -> topic
    for _, sample_id, topic, payload in before:
        assert got.get(payload.decode()) == topic, sample_id
    seqs = sorted(m["seq"] for m in sub.samples() if m["sample_id"] not in {r[1] for r in before})
    assert seqs == list(range(5, 25))  # the sequence goes on from the old outbox's


def test_what_is_published_from_memory_is_what_sqlite_holds(tmp_path):
    raw = np.random.default_rng(1).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    samples = [_sample(i, raw[i]) for i in range(20)]
    with Outbox(tmp_path / "o.sqlite", batch=8) as box:
        for sid, parts, _ in samples:
            box.add(TOPIC, parts, sid, seq=box.next_seq())
        box.commit()
        assert len(box._recent) == 20  # all of them in memory: pending() asks SQLite nothing
        from_memory = box.pending(limit=100)
        assert [r.payload for r in from_memory] == [m for _, _, m in samples]
        assert box.get(from_memory[3].id).payload == samples[3][2]
    with Outbox(tmp_path / "o.sqlite") as box:
        assert len(box._recent) == 0
        from_sqlite = box.pending(limit=100)
        assert from_sqlite == from_memory
        assert box.get(from_sqlite[3].id) == from_memory[3]


def test_memory_holds_the_newest_and_sqlite_answers_for_the_rest(tmp_path):
    raw = np.random.default_rng(2).integers(0, 256, (30, 32, 32, 3), dtype=np.uint8)
    samples = [_sample(i, raw[i]) for i in range(30)]
    size = [parts.size for _, parts, _ in samples]
    with Outbox(tmp_path / "o.sqlite", max_bytes=sum(size[5:])) as box:
        box._recent.max_bytes = sum(size[20:])  # only the newest ten stay in memory
        for sid, parts, _ in samples:
            box.put(TOPIC, parts, sid, seq=box.next_seq())
        assert box.dropped == 5 and box.depth == 25  # the byte cap dropped the oldest five
        assert len(box._recent) == 10
        want = [m for _, _, m in samples[5:]]
        assert [r.payload for r in box.pending(limit=100)] == want  # from SQLite: the cursor is below memory
        rows = box.pending(limit=100)
        assert [r.payload for r in box.pending(rows[14].id, 100)] == want[15:]  # from memory
        assert box.ack([r.id for r in rows[10:20]]) == 10  # delivered: gone from memory and SQLite alike
        assert [r.sample_id for r in box.pending(limit=100)] == [s[0] for s in samples[5:15] + samples[25:]]
        assert box.get(rows[12].id) is None and box.get(rows[2].id).payload == want[2]
        assert box.depth == 15 and box.bytes == sum(size[5:15]) + sum(size[25:])
        removed = box.remove_samples([samples[27][0], samples[6][0]])
        assert sorted(removed) == sorted([samples[27][0], samples[6][0]])
        assert [r.sample_id for r in box.pending(rows[14].id, 100)] == [s[0] for s in samples[25:27] + samples[28:]]


def test_a_delivered_sample_is_not_written_again_to_be_deleted(tmp_path):
    """secure_delete=FAST: deleting samples writes their b-tree pages, not each page they took (which the
    checkpoint estimate, DiskSpace._deleted, relies on)."""
    raw = np.random.default_rng(3).integers(0, 256, (9, 96, 96, 3), dtype=np.uint8)
    with Outbox(tmp_path / "o.sqlite") as box:
        box._checkpointer.request = lambda: None
        for i in range(9):
            sid, parts, _ = _sample(i, raw[i])
            box.add(TOPIC, parts, sid, seq=box.next_seq())
        box.commit()
        box._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        assert box.ack([r.id for r in box.pending()]) == 9
        frames = box._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]
        assert 0 < frames < 20  # 9 samples took ~70 pages
