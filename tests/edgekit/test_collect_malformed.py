"""A flood of bad payloads: the collector keeps running, counts every one exactly and quarantines it."""

from __future__ import annotations

import base64
import copy
import json
import random
import subprocess

import numpy as np

from collecting import Publisher, sample, store, store_url  # noqa: F401  (fixtures)
from device_agent.delivery import protocol
from edgekit.loop.collect import Collector

TOPIC = protocol.topic("lab", "pi-1", "samples")


def _wrong_schema(i: int) -> dict:
    p = sample(10_000 + i)
    breakers = [
        lambda p: p.pop("sample_id"),
        lambda p: p.__setitem__("seq", -1),
        lambda p: p["prediction"].__setitem__("confidence", 1.5),
        lambda p: p.__setitem__("reasons", []),
        lambda p: p.__setitem__("reasons", ["because"]),
        lambda p: p.__setitem__("sample_id", "not-a-uuid"),
        lambda p: p.__setitem__("schema", "edgekit.telemetry/1"),
        lambda p: p["model"].__setitem__("sha256", "xyz"),
        lambda p: p["input"].__setitem__("dtype", "complex128"),
        lambda p: p["input"].__setitem__("shape", [1, 1, 1, 1, 64]),
        lambda p: p.__setitem__("device", "bad name!"),
        lambda p: p.__setitem__("seq", "seven"),
        lambda p: p.pop("input"),
    ]
    breakers[i % len(breakers)](p)
    return p


def _bad_base64(i: int) -> dict:
    p = sample(20_000 + i)
    p["input"]["data"] = ["!!!!" + p["input"]["data"][4:], p["input"]["data"][:-3], "@@==", "abc"][i % 4]
    return p


def _wrong_shape(i: int) -> dict:
    p = sample(30_000 + i)
    p["input"]["shape"] = [[8, 8, 2], [9, 8, 1], [64, 2], [1]][i % 4]
    return p


def _oversized(i: int) -> dict:
    return sample(40_000 + i, raw=np.full((64, 64, 1), i % 256, dtype=np.uint8))  # ~5.6 KB > 4 KiB limit


def test_a_thousand_bad_payloads_are_counted_exactly_and_the_good_ones_stored(broker, store):
    rng = random.Random(5)
    expected = {"not_json": 300, "schema": 260, "bad_input": 300, "oversized": 150, "topic_mismatch": 20}
    messages = []  # (topic, bytes) published by paho
    messages += [(TOPIC, bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300)))) for _ in range(300)]
    messages += [(TOPIC, json.dumps(_bad_base64(i)).encode()) for i in range(150)]
    messages += [(TOPIC, json.dumps(_wrong_shape(i)).encode()) for i in range(150)]
    messages += [(TOPIC, json.dumps(_oversized(i)).encode()) for i in range(150)]
    messages += [(protocol.topic("lab", "pi-2", "samples"), json.dumps(sample(50_000 + i)).encode()) for i in range(20)]
    good = [sample(i) for i in range(100)]
    messages += [(TOPIC, json.dumps(p).encode()) for p in good]
    rng.shuffle(messages)
    # The wrong-schema ones come from mosquitto_pub, an independent client (one JSON line each).
    lines = "\n".join(json.dumps(_wrong_schema(i)) for i in range(260)) + "\n"

    with Collector(broker.url, store, fleet="lab", client_id="flood", max_payload_bytes=4096) as c:
        pub = Publisher(broker.port)
        for topic, data in messages:
            pub.publish(topic, data)
        subprocess.run(["mosquitto_pub", "-p", str(broker.port), "-q", "1", "-t", TOPIC, "-l"],
                       input=lines.encode(), check=True, timeout=30)
        pub.flush()
        total = len(messages) + 260
        assert c.wait_handled(total, timeout=60), c.stats
        assert sum(expected.values()) >= 1000
        assert c.stats.malformed == expected
        assert c.stats.stored == 100 and c.stats.received == total
        assert store.quarantine_counts() == expected
        assert {r.sample_id for r in store.list_samples()} == {p["sample_id"] for p in good}
        # Still alive and still storing after the flood.
        last = sample(999)
        pub.publish(TOPIC, last)
        pub.close()
        assert c.wait_handled(total + 1, timeout=10)
        assert store.get_sample(last["sample_id"]).seq == 999
    q = store.quarantined(limit=2000)
    assert all(x["size"] > 0 or x["reason"] == "not_json" for x in q)
    assert any(x["reason"] == "oversized" and x["size"] > 4096 for x in q)


def test_a_row_the_database_refuses_is_quarantined_and_the_rest_of_its_batch_stored(broker, tmp_path):
    """PostgreSQL text cannot hold NUL: such a sample passes the schema but not the INSERT."""
    import uuid

    from edgekit.loop.store import open_store

    url = f"postgresql://postgres@127.0.0.1:5432/test?schema=ek_test_{uuid.uuid4().hex[:12]}"
    with open_store(url) as store:
        try:
            poison = sample(1)
            poison["prediction"]["label"] = "a\u0000b"
            good = [sample(i) for i in range(2, 40)]
            with Collector(broker.url, store, fleet="lab", client_id="poison") as c:
                pub = Publisher(broker.port)
                for p in good[:19] + [poison] + good[19:]:
                    pub.publish(TOPIC, p)
                pub.close()
                assert c.wait_handled(39, timeout=20), c.stats
            assert c.stats.stored == 38 and c.stats.malformed == {"store_error": 1}
            assert store.quarantine_counts() == {"store_error": 1}
            assert store.count_samples() == 38
        finally:
            store.drop()


def test_postgresql_dropping_the_connection_loses_nothing(broker):
    """The server ends the collector's session mid-run: the batch is retried on a new connection."""
    import uuid

    import psycopg

    from edgekit.loop.store import open_store

    url = f"postgresql://postgres@127.0.0.1:5432/test?schema=ek_test_{uuid.uuid4().hex[:12]}"
    with open_store(url) as store:
        try:
            with Collector(broker.url, store, fleet="lab", client_id="pg-drop") as c:
                pub = Publisher(broker.port)
                first = [sample(i) for i in range(50)]
                for p in first:
                    pub.publish(TOPIC, p)
                pub.flush()
                assert c.wait_handled(50, timeout=10)
                with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True) as admin:
                    admin.execute("SELECT pg_terminate_backend(%s)", (store._conn.info.backend_pid,))
                second = [sample(i) for i in range(50, 100)]
                for p in second:
                    pub.publish(TOPIC, p)
                pub.close()
                assert c.wait_handled(100, timeout=20), c.stats
            assert c.stats.stored == 100 and c.stats.malformed_total == 0
            assert {r.sample_id for r in store.list_samples()} == {p["sample_id"] for p in first + second}
        finally:
            store.drop()


def test_the_topics_remembered_as_valid_stay_bounded_and_a_bad_one_is_never_remembered():
    """check_message remembers valid topics (a board repeats its own); a flood of new board names may cost the
    parse each time but never memory, and a refused topic is refused every time."""
    import pytest

    from edgekit.loop import validate

    payload = json.dumps(sample(1)).encode()
    for i in range(validate._MAX_TOPICS + 10):
        try:
            validate.check_message(protocol.topic("lab", f"pi-{i}", "samples"), payload)
        except validate.Malformed as bad:
            assert bad.reason == "topic_mismatch"  # the payload names pi-1: only the topic's parse is exercised
        assert len(validate._TOPICS) <= validate._MAX_TOPICS
    for _ in range(2):
        with pytest.raises(validate.Malformed) as bad:
            validate.check_message("edgekit/v1/lab/pi 1/samples", payload)
        assert bad.value.reason == "bad_topic"
    assert "edgekit/v1/lab/pi 1/samples" not in validate._TOPICS
