"""End-to-end acknowledgement on the board: a sample leaves the outbox only when a collector names it.

Against a real Mosquitto; the collector's side is the :class:`~conftest.Acker` (pause it and it is a
collector that has stored nothing yet, or an older one that never acknowledges). The host tests
(tests/edgekit/test_delivery.py) run the real collector.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
import uuid

import paho.mqtt.client as paho
import pytest
from hypothesis import given, settings, strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from device_agent.agent import Agent
from device_agent.delivery import protocol
from device_agent.errors import ProtocolError
from device_agent.sources import ArraySource

from conftest import Acker, wait_for
from test_agent_mqtt import FLAG_ALL
from test_update import Running, endless

ACK_TOPIC = protocol.topic("test", "dev1", "ack")


def publish(port: int, topic: str, payloads) -> None:
    """QoS 1 publishes from an independent client, each acknowledged by the broker."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"acks-{time.monotonic_ns()}")
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        for payload in payloads:
            info = client.publish(topic, payload, qos=1)
            info.wait_for_publish(10)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


def flagged_ids(path) -> list:
    lines = path.read_text().split("\n")[:-1]  # whole lines only: the agent may be appending
    return [json.loads(line)["sample_id"] for line in lines if '"sample_id":"' in line]


class ThenIdle(ArraySource):
    """The rows, then nothing new until stopped: a watched folder after its last file."""

    def items(self, stop):
        yield from super().items(stop)
        while not stop.is_set():
            yield None
            stop.wait(0.01)


def test_a_puback_only_marks_a_sample_sent_and_what_no_ack_names_goes_again(broker, make_config, digits, tmp_path):
    x, _ = digits
    n = 30
    broker.acker.paused = True  # the collector has stored nothing yet
    config = make_config(broker.url, policy=FLAG_ALL, mqtt={"ack_timeout_s": 0.3})
    run = Running(config, ArraySource(x[:n]))
    agent, publisher = run.agent, run.agent.publisher
    try:
        # every input flagged first: on a slow board (qemu) resends of the first samples count in `sent`
        # while the last inputs are still being classified
        assert wait_for(lambda: agent.stats.flagged == n and publisher.sent >= n, 30), "the broker did not acknowledge the samples"
        assert agent.outbox.depth == n and publisher.published == 0  # PUBACKed, still in the outbox
        assert wait_for(lambda: publisher.resent >= n, 30), "nothing was sent again after the ack timeout"
        assert agent.outbox.depth == n
        broker.acker.paused = False  # the collector catches up: the next resends are acknowledged
        assert wait_for(lambda: agent.outbox.depth == 0, 60), agent.outbox.depth
    finally:
        stats = run.finish()
    assert (stats.flagged, stats.published, stats.pending, stats.dropped) == (n, n, 0, 0)
    assert stats.resent >= n and stats.sent >= 2 * n
    assert set(flagged_ids(tmp_path / "results.jsonl")) <= set(broker.acker.acked)


def test_a_restart_sends_again_what_was_not_acknowledged_and_the_byte_cap_still_holds(broker, make_config, digits):
    x, _ = digits
    n, cap = 60, 20_000  # a digit sample is ~650 bytes: about half of them fit
    broker.acker.paused = True
    config = make_config(broker.url, policy=FLAG_ALL, outbox={"max_bytes": cap, "drain_timeout_s": 1.0})
    with Agent(config, source=ArraySource(x[:n])) as agent:
        first = agent.run()
        kept = agent.outbox.bytes
    assert first.flagged == n and first.published == 0 and first.sent > 0
    assert 0 < first.pending < n and kept <= cap
    assert first.dropped == n - first.pending  # sent and unacknowledged rows are dropped like any other

    broker.acker.paused = False
    with Agent(config.with_overrides(outbox={"drain_timeout_s": 30.0}), source=ArraySource(x[:0])) as agent:
        second = agent.run()
    assert (second.published, second.pending) == (first.pending, 0)
    assert second.resent == 0  # a new process has sent nothing before: its replay is a first send
    acked = broker.acker.acked
    assert len(set(acked)) == first.pending


def test_bad_acks_are_counted_and_ignored_and_the_loop_goes_on(broker, make_config, digits, tmp_path, caplog):
    x, _ = digits
    broker.acker.paused = True  # only this test's messages acknowledge anything
    caplog.set_level(logging.WARNING)
    run = Running(make_config(broker.url, policy=FLAG_ALL, mqtt={"ack_timeout_s": 600.0},
                              outbox={"drain_timeout_s": 0.5}), endless(x))
    agent, publisher = run.agent, run.agent.publisher
    try:
        assert wait_for(lambda: publisher.sent >= 20 and len(flagged_ids(tmp_path / "results.jsonl")) >= 3, 30)
        ids = flagged_ids(tmp_path / "results.jsonl")[:3]
        bad = [
            b"{not json",
            b"\xff\xfe\x00garbage",
            b"[1, 2, 3]",
            json.dumps({"schema": "edgekit.cmd/1", "stored": ids}).encode(),
            json.dumps({"schema": "edgekit.ack/1", "ts": 1.0, "stored": "all"}).encode(),
            json.dumps({"schema": "edgekit.ack/1", "ts": 1.0, "stored": ["../../etc/passwd"]}).encode(),
            json.dumps({"schema": "edgekit.ack/1", "ts": 1.0, "stored": [ids[0].upper()]}).encode(),
            json.dumps({"schema": "edgekit.ack/1", "ts": 1.0,
                        "stored": [str(uuid.uuid4()) for _ in range(protocol.MAX_ACK_IDS + 1)]}).encode(),
            b'{"schema": "edgekit.ack/1", "stored": [' + b'"x",' * 40_000 + b'"x"]}',  # over MAX_ACK_BYTES
        ]
        unknown = json.dumps(protocol.ack_payload([str(uuid.uuid4()) for _ in range(5)])).encode()
        publish(broker.port, ACK_TOPIC, bad + [unknown])
        assert wait_for(lambda: agent.stats.errors["ack"] == len(bad), 20), dict(agent.stats.errors)
        assert wait_for(lambda: publisher.unknown_acks == 5, 20)
        assert publisher.published == 0  # nothing was deleted by any of them
        before = agent.stats.inferences
        publish(broker.port, ACK_TOPIC, [json.dumps(protocol.ack_payload(ids[:2], ids[2:])).encode()])
        assert wait_for(lambda: publisher.published == 3, 20)
        assert wait_for(lambda: agent.stats.inferences > before + 10, 20), "the loop stopped"
    finally:
        stats = run.finish()
    assert (publisher.acked, publisher.refused) == (2, 1)
    assert stats.errors["ack"] == len(bad) and stats.errors["refused"] == 1
    with sqlite3.connect(tmp_path / "outbox.sqlite") as db:  # the three are gone, everything else still waits
        left = {r[0] for r in db.execute("SELECT sample_id FROM samples")}
    assert not left & set(ids) and len(left) == stats.flagged - 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("ack ignored" in w and "MAX_ACK_BYTES" in w for w in warnings)
    assert any("refused 1 sample" in w for w in warnings)
    assert all("\n" not in w for w in warnings)


def test_with_a_collector_that_never_acknowledges(broker, make_config, digits, caplog):
    """An older collector (no end-to-end acks): with ack = "collector" the board keeps its samples, says so
    once and backs off; ack = "broker" is the setting for it (a sample leaves on its PUBACK)."""
    x, _ = digits
    n = 20
    broker.acker.paused = True
    caplog.set_level(logging.WARNING)
    run = Running(make_config(broker.url, policy=FLAG_ALL, mqtt={"ack_timeout_s": 0.2}, outbox={"drain_timeout_s": 0.5}),
                  ThenIdle(x[:n]))
    publisher = run.agent.publisher
    try:
        assert wait_for(lambda: publisher.ack_timeout_now_s >= 0.8, 30), "the resend timeout did not grow"
        assert run.agent.outbox.depth == n
    finally:
        run.finish()
    silence = [r for r in caplog.records if "no collector acknowledged" in r.getMessage()]
    assert len(silence) == 1 and 'ack = "broker"' in silence[0].getMessage()

    config = make_config(broker.url, policy=FLAG_ALL, mqtt={"ack": "broker"})
    with Agent(config, source=ArraySource(x[:0])) as agent:
        stats = agent.run()
    assert (stats.published, stats.pending) == (n, 0)


@settings(max_examples=200, deadline=None)
@given(st.one_of(
    st.binary(max_size=300),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
                 lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
                 max_leaves=20).map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"schema": st.just("edgekit.ack/1"), "ts": st.floats(allow_nan=False),
                           "stored": st.lists(st.one_of(st.uuids().map(str), st.text(max_size=40)), max_size=5)},
                          optional={"quarantined": st.lists(st.uuids().map(str), max_size=5)})
    .map(lambda v: json.dumps(v).encode()),
))
def test_parse_ack_accepts_only_valid_acks_and_raises_nothing_else(payload):
    try:
        stored, quarantined = protocol.parse_ack(payload)
    except ProtocolError as exc:
        assert "\n" not in str(exc)
        return
    obj = json.loads(payload)
    assert obj["schema"] == "edgekit.ack/1" and stored == obj["stored"]
    for sid in stored + quarantined:
        assert str(uuid.UUID(sid)) == sid


def test_a_board_moves_to_the_next_broker_node_when_its_node_dies(broker, make_config, digits, tmp_path):
    """``[mqtt].broker`` lists two nodes; the first dies mid-run: the board carries on through the second
    and what the first took but no collector acknowledged goes again (here two brokers, each with a
    collector's acker; tests/edgekit/test_delivery.py does it on a NATS cluster)."""
    from broker import Mosquitto

    x, _ = digits
    n = 80
    broker.acker.paused = True  # the first node's collector stores nothing before the node dies
    second = Mosquitto(tmp_path / "second").start()
    acker2 = Acker(second.port).start()
    try:
        assert acker2.subscribed.wait(10)
        config = make_config(f"{broker.url},{second.url}", policy=FLAG_ALL, mqtt={"ack_timeout_s": 1.0})
        run = Running(config, ThenIdle(x[:n]))
        try:
            assert wait_for(lambda: run.agent.publisher.sent >= n // 4, 30)
            broker.stop()  # the first node dies
            assert wait_for(lambda: run.agent.link.where == second.url and
                            run.agent.link.connected.is_set(), 30), "the board did not move to the second node"
            assert wait_for(lambda: run.agent.outbox.depth == 0 and run.agent.stats.flagged == n, 60), \
                run.agent.outbox.depth
        finally:
            stats = run.finish()
    finally:
        acker2.stop()
        second.stop()
    assert (stats.flagged, stats.published, stats.pending, stats.dropped) == (n, n, 0, 0)
    assert stats.resent >= n // 4  # what the dead node took went again
    assert set(flagged_ids(tmp_path / "results.jsonl")) <= set(acker2.acked)
