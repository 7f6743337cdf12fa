"""A flood of bad payloads: the collector keeps running, counts every one exactly and quarantines it.

Poison too: a payload that breaks json.loads (a bracket bomb) or passes the JSON Schema with a number no column
holds (a ts of 400 digits, a seq beyond 2**63, NaN), and any exception the writer meets on one message, are
quarantined and acknowledged like any malformed payload; the writer thread never ends on one."""

from __future__ import annotations

import base64
import copy
import json
import logging
import random
import subprocess
import threading
import time

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collecting import Publisher, sample, store, store_url, telemetry  # noqa: F401  (fixtures)
from device_agent.delivery import protocol
from edgekit.loop.collect import Collector
from edgekit.loop.collect_write import _Msg
from edgekit.loop.store.sqlite import SQLiteStore
from edgekit.loop.validate import Malformed, check_message

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


# -- poison: payloads that pass the JSON Schema (or break json.loads) and used to end the writer thread ------------

def _text(payload: dict, path: tuple, literal: str) -> bytes:
    """``payload`` as JSON with the value at ``path`` written as ``literal`` (e.g. 1e400, NaN, 400 digits)."""
    p = copy.deepcopy(payload)
    node = p
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = "@@POISON@@"
    return json.dumps(p).replace('"@@POISON@@"', literal).encode()


def _status(ts=None) -> dict:
    return protocol.status_payload(device="pi-1", fleet="lab", state="online", ts=ts,
                                   model={"name": "digits", "version": "1.0.0", "sha256": "ab" * 32})


HUGE = "1" + "0" * 399  # a 400-digit integer: a JSON number, and no float holds it


def _poison() -> list:
    """(topic, payload bytes, reason, sample id the board is told is quarantined or None) of every poison kind."""
    samples = protocol.topic("lab", "pi-1", "samples")
    out = [(samples, b"[" * 100_000, "not_json", None)]  # under the 1 MiB limit; json.loads: RecursionError
    for i, (path, literal, reason) in enumerate([
        (("source",), '{"a": ' * 2000 + "1" + "}" * 2000, "not_json"),  # deeper than json.loads recurses
        (("source",), '{"a": ' * 40 + "1" + "}" * 40, "not_json"),  # parses, but deeper than any payload nests
        (("ts",), HUGE, "schema"),  # OverflowError in float(ts)
        (("ts",), "1e400", "schema"),  # parsed as inf
        (("ts",), "-Infinity", "schema"),
        (("seq",), str(2**63), "schema"),  # beyond SQLite INTEGER / PostgreSQL BIGINT
        (("seq",), HUGE, "schema"),
        (("prediction", "index"), str(2**64), "schema"),
        (("prediction", "confidence"), "NaN", "schema"),  # NaN passes "minimum": 0, "maximum": 1
        (("prediction", "entropy"), HUGE, "schema"),
    ]):
        p = sample(60_000 + i)
        out.append((samples, _text(p, path, literal), reason, p["sample_id"]))
    out.append((protocol.topic("lab", "pi-1", "telemetry"), _text(telemetry(), ("ts",), HUGE), "schema", None))
    out.append((protocol.topic("lab", "pi-1", "status"), _text(_status(), ("ts",), HUGE), "schema", None))
    return out


class _AckWatcher:
    """What the boards are told (edgekit.ack/1 on .../ack): sample ids stored and quarantined."""

    def __init__(self, port: int):
        self.stored, self.quarantined = [], []
        subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe("edgekit/v1/lab/+/ack", qos=1)
        assert subscribed.wait(10)

    def _on_message(self, client, userdata, msg) -> None:
        ack = json.loads(msg.payload)
        self.stored += ack["stored"]
        self.quarantined += ack.get("quarantined", [])

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_poison_payloads_are_quarantined_acked_and_the_writer_keeps_storing(broker, store):
    """A bracket bomb, a ts of 400 digits, a seq beyond 2**63, NaN, ... from a board: each is refused, counted
    and quarantined like any malformed payload, PUBACKed and (with a readable id) acked to its board as
    quarantined, so it is never delivered again; the good samples, telemetry and status around them are stored,
    and the writer thread lives on."""
    poison = _poison()
    good = [sample(i) for i in range(20)]
    expected = {"not_json": 3, "schema": len(poison) - 3}
    watcher = _AckWatcher(broker.port)
    try:
        with Collector(broker.url, store, fleet="lab", client_id="poison-writer") as c:
            pub = Publisher(broker.port)
            pub.publish(TOPIC, good[0])
            for i, (topic, data, _, _) in enumerate(poison):  # each between good ones, in their batches
                pub.publish(topic, data)
                pub.publish(TOPIC, good[1 + i])
            for p in good[1 + len(poison):]:
                pub.publish(TOPIC, p)
            pub.publish(protocol.topic("lab", "pi-1", "telemetry"), telemetry(inferences=77, ts=1_700_000_000.5))
            pub.publish(protocol.topic("lab", "pi-1", "status"), _status(ts=1_700_000_001.0))
            pub.flush()
            total = len(good) + len(poison) + 2
            assert c.wait_handled(total, timeout=30), c.stats
            assert c._writer.is_alive()
            stats = c.stats
            assert stats.malformed == expected and store.quarantine_counts() == expected
            assert (stats.stored, stats.duplicates, stats.telemetry, stats.status) == (20, 0, 1, 1)
            # Still storing.
            last = sample(999)
            pub.publish(TOPIC, last)
            pub.close()
            assert c.wait_handled(total + 1, timeout=10), c.stats
            told = {sid for _, _, _, sid in poison if sid}
            assert _wait(lambda: set(watcher.quarantined) == told, 10), (len(watcher.quarantined), len(told))
            assert _wait(lambda: set(watcher.stored) == {p["sample_id"] for p in good + [last]}, 10)
    finally:
        watcher.close()
    assert {r.sample_id for r in store.list_samples()} == {p["sample_id"] for p in good + [last]}
    (device,) = store.devices()
    assert (device.state, device.telemetry_ts, device.inferences) == ("online", 1_700_000_000.5, 77)
    assert sorted(q["reason"] for q in store.quarantined()) == sorted(reason for _, _, reason, _ in poison)
    # Every poison message was PUBACKed: the same session, started again, gets none of them back.
    with Collector(broker.url, store, fleet="lab", client_id="poison-writer") as again:
        assert again.wait_idle(1.5, timeout=20)
        assert again.stats.received == 0, again.stats


class _BuggyStore(SQLiteStore):
    """A real SQLite store whose writes fail with a bug (not a StoreError) on one sample and one board's
    telemetry: a stand-in for any exception the collector does not expect from one message."""

    def __init__(self, path, bad_sample: str, bad_device: str):
        super().__init__(path)
        self.bad_sample, self.bad_device = bad_sample, bad_device

    def put_samples(self, payloads):
        if any(p["sample_id"] == self.bad_sample for p in payloads):
            raise ZeroDivisionError("a bug in the store code")
        return super().put_samples(payloads)

    def put_telemetry(self, payload):
        if payload["device"] == self.bad_device:
            raise KeyError("a bug in the telemetry code")
        return super().put_telemetry(payload)


def test_a_message_the_collector_fails_on_is_quarantined_and_the_writer_goes_on(broker, tmp_path, caplog):
    """Whatever exception one message raises in the writer, that message is quarantined (collector_error),
    counted, PUBACKed and acked to its board as quarantined, with one error line naming its topic and the
    exception, not the payload; the rest of its batch is stored, and the writer goes on."""
    bad = sample(500)
    good = [sample(i) for i in range(30)]
    store = _BuggyStore(tmp_path / "s.db", bad["sample_id"], "pi-7")
    watcher = _AckWatcher(broker.port)
    caplog.set_level(logging.WARNING, logger="edgekit.loop.collect")
    try:
        with Collector(broker.url, store, fleet="lab", client_id="buggy") as c:
            pub = Publisher(broker.port)
            for p in good[:15]:
                pub.publish(TOPIC, p)
            pub.publish(TOPIC, bad)
            pub.publish(protocol.topic("lab", "pi-7", "telemetry"), telemetry(device="pi-7"))
            for p in good[15:]:
                pub.publish(TOPIC, p)
            pub.publish(protocol.topic("lab", "pi-1", "telemetry"), telemetry())
            pub.close()
            assert c.wait_handled(33, timeout=30), c.stats
            assert c._writer.is_alive()
            assert c.stats.malformed == {"collector_error": 2}
            assert (c.stats.stored, c.stats.telemetry) == (30, 1)
            assert _wait(lambda: watcher.quarantined == [bad["sample_id"]], 10), watcher.quarantined
            assert _wait(lambda: sorted(watcher.stored) == sorted(p["sample_id"] for p in good), 10)
        assert store.quarantine_counts() == {"collector_error": 2}
        details = sorted(q["detail"] for q in store.quarantined())
        assert details == ["KeyError: 'a bug in the telemetry code'", "ZeroDivisionError: a bug in the store code"]
        assert store.count_samples() == 30
        lines = [r.getMessage() for r in caplog.records if "collector_error" in r.getMessage()]
        assert len(lines) == 2, lines
        assert any(TOPIC in line and "ZeroDivisionError" in line for line in lines)
        assert all(bad["input"]["data"][:16] not in line and bad["sample_id"] not in line for line in lines)
        with Collector(broker.url, store, fleet="lab", client_id="buggy") as again:  # both were PUBACKed
            assert again.wait_idle(1.5, timeout=20)
            assert again.stats.received == 0, again.stats
    finally:
        watcher.close()
        store.close()


def _nested(levels: int):
    """``levels`` lists inside each other."""
    value: list = []
    for _ in range(levels - 1):
        value = [value]
    return value


@pytest.mark.parametrize("kind, path, literal, reason", [
    ("samples", ("seq",), str(2**63 - 1), None),  # the largest a 64-bit column keeps
    ("samples", ("seq",), str(2**63), "schema"),
    ("samples", ("seq",), "1e300", "schema"),  # an integer to JSON Schema (1e300 == int(1e300)), 997 bits to us
    ("samples", ("prediction", "index"), str(2**31 - 1), None),  # PostgreSQL INTEGER
    ("samples", ("prediction", "index"), str(2**31), "schema"),
    ("samples", ("ts",), "1e308", None),
    ("samples", ("ts",), "-12.5", None),  # a board's clock may be wrong: that is not for the collector to refuse
    ("samples", ("ts",), HUGE, "schema"),
    ("samples", ("ts",), "-" + HUGE, "schema"),
    ("samples", ("ts",), "1e400", "schema"),
    ("samples", ("ts",), "NaN", "schema"),
    ("samples", ("prediction", "margin"), "NaN", "schema"),
    ("samples", ("prediction", "entropy"), "Infinity", "schema"),
    ("samples", ("source",), json.dumps({"a": _nested(30)}), None),  # 32 levels: root, source, 30 lists
    ("samples", ("source",), json.dumps({"a": _nested(31)}), "not_json"),
    ("samples", ("source",), "[" * 5000 + "]" * 5000, "not_json"),
    ("telemetry", ("ts",), HUGE, "schema"),
    ("telemetry", ("ts",), "NaN", "schema"),
    ("telemetry", ("uptime_s",), HUGE, None),  # kept in the payload's JSON text, not in a column
    ("status", ("ts",), HUGE, "schema"),
    ("status", ("ts",), "-Infinity", "schema"),
    ("status", ("model",), '{"a": ' * 40 + "{}" + "}" * 40, "not_json"),
])
def test_check_message_refuses_what_the_store_cannot_keep_and_nothing_else(kind, path, literal, reason):
    """The numbers the store keeps in columns must be finite and fit their column, and no payload nests deeper
    than 32 levels; a payload that breaks either is Malformed (nothing else comes out), one within them passes."""
    payload = {"samples": sample(1), "telemetry": telemetry(), "status": _status()}[kind]
    topic, data = protocol.topic("lab", "pi-1", kind), _text(payload, path, literal)
    if reason is None:
        assert check_message(topic, data)[0] == kind
    else:
        with pytest.raises(Malformed) as bad:
            check_message(topic, data)
        assert bad.value.reason == reason
        assert len(str(bad.value)) < 300  # names the field, never repeats 400 digits


@pytest.mark.parametrize("payload", [
    b"[" * 1_000_000,
    b'{"a": ' * 150_000,
    b"[" * 999 + b"]" * 999,  # within what json.loads recurses: parsed, then refused
    # Unterminated strings full of escapes: a regex that skips strings to count brackets backtracks on these for
    # minutes (quadratic); json.loads refuses them at once.
    b'{"a": [' * 40 + b'"' + b'\\"' * 500_000,
    b"[" * 40 + b'"\\' * 500_000,
], ids=["open-brackets", "open-objects", "deep-but-parsable", "escaped-quotes", "backslashes"])
def test_a_bracket_bomb_is_refused_as_malformed_at_once(payload):
    start = time.monotonic()
    with pytest.raises(Malformed) as bad:
        check_message(TOPIC, payload, max_bytes=2 * 1024 * 1024)
    assert bad.value.reason == "not_json"
    assert time.monotonic() - start < 2.0


_LITERALS = (st.sampled_from([HUGE, "-" + HUGE, "1e400", "-1e400", "NaN", "Infinity", "-Infinity", str(2**63),
                              str(2**63 - 1), str(2**31), str(2**31 - 1), str(2**64), "1e308", "1e300", "-1", "0",
                              "0.5", "1.0"])
             | st.integers(-2**70, 2**70).map(str) | st.floats().map(json.dumps))
_FIELDS = {
    "samples": [("seq",), ("ts",), ("prediction", "index"), ("prediction", "confidence"), ("prediction", "margin"),
                ("prediction", "entropy"), ("prediction", "top_k", 0, "score"), ("prediction", "top_k", 0, "index")],
    "telemetry": [("ts",), ("uptime_s",), ("inferences",), ("memory_rss_bytes",), ("outbox", "depth"),
                  ("temperature_c",)],
    "status": [("ts",)],
}
_NEST_AT = {"samples": ("source",), "telemetry": ("latency_ms", "extra"), "status": ("model",)}


@st.composite
def _poison_message(draw):
    """A board's sample, telemetry or status with one number written as any literal, or nested any depth, or
    only a bracket bomb."""
    kind = draw(st.sampled_from(sorted(_FIELDS)))
    payload = {"samples": sample(draw(st.integers(0, 1000))), "telemetry": telemetry(), "status": _status()}[kind]
    how = draw(st.sampled_from(["number", "nest", "bomb"]))
    if how == "number":
        data = _text(payload, draw(st.sampled_from(_FIELDS[kind])), draw(_LITERALS))
    elif how == "nest":
        levels = draw(st.integers(1, 40) | st.sampled_from([999, 2000, 50_000]))
        data = _text(payload, _NEST_AT[kind], "[" * levels + "]" * levels)
    else:
        data = draw(st.sampled_from([b"[", b"{", b'{"a":', b"[{"])) * draw(st.integers(1, 200_000))
    return protocol.topic("lab", "pi-1", kind), data


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(poison=st.lists(_poison_message(), min_size=1, max_size=4), at=st.integers(0, 4))
def test_fuzz_whatever_a_batch_holds_each_message_is_stored_or_quarantined_as_malformed(store, poison, at):
    """The writer's batch, through the real collector code into the real store: whatever numbers and nesting
    the messages hold, each is stored (when it passes validation) or quarantined as malformed (when it does
    not), never failed in the store or the writer, and the good message in the same batch is stored."""
    good = sample(7)
    messages = list(poison)
    messages.insert(min(at, len(messages)), (TOPIC, json.dumps(good).encode()))
    valid = 0
    for topic, data in messages:
        try:
            check_message(topic, data)
            valid += 1
        except Malformed as bad:
            assert bad.reason in {"schema", "not_json"}, bad
    c = Collector("mqtt://127.0.0.1:1", store, fleet="lab", client_id="fuzz")  # not started: the writer's code only
    c._store_batch([_Msg(topic, data, i + 1, 1, 0) for i, (topic, data) in enumerate(messages)])
    stats = c.stats
    assert stats.handled == len(messages), stats
    assert set(stats.malformed) <= {"schema", "not_json"}, stats  # never store_error nor collector_error
    assert stats.stored + stats.duplicates + stats.telemetry + stats.status == valid, stats
    assert store.get_sample(good["sample_id"]).seq == 7
