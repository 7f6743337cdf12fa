"""The SQLite outbox alone: order, persistence, the byte cap and its exact drop count."""

from __future__ import annotations

from device_agent.delivery.outbox import Outbox


def test_rows_survive_reopening_in_order(tmp_path):
    with Outbox(tmp_path / "o.sqlite") as box:
        for i in range(5):
            box.put("t", f"payload-{i}".encode(), f"id{i}", digest=f"d{i}", seq=box.next_seq())
        first = box.pending(limit=2)
        assert box.ack([first[0].id, 999]) == 1
    with Outbox(tmp_path / "o.sqlite") as box:
        rows = box.pending()
        assert [r.sample_id for r in rows] == ["id1", "id2", "id3", "id4"]
        assert box.depth == 4 and box.bytes == sum(len(r.payload) for r in rows)
        assert box.next_seq() == 5  # the sequence number only grows
        assert box.seen("d0") and not box.seen("nope")
        assert [r.sample_id for r in box.pending(after_id=rows[1].id)] == ["id3", "id4"]


def test_cap_drops_the_oldest_and_counts_exactly(tmp_path):
    size, cap = 1000, 4500
    with Outbox(tmp_path / "o.sqlite", max_bytes=cap) as box:
        dropped = [len(box.put("t", bytes(size), f"id{i}")) for i in range(10)]
        assert dropped == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
        assert box.dropped == 6 and box.depth == 4 and box.bytes == 4000 <= cap
        assert [r.sample_id for r in box.pending()] == ["id6", "id7", "id8", "id9"]
        box.put("t", bytes(cap + 1), "huge")  # can never fit: dropped at once, counted
        assert box.dropped == 7 and box.depth == 4
    with Outbox(tmp_path / "o.sqlite", max_bytes=cap) as box:
        assert box.dropped == 7  # persisted for telemetry after a restart
