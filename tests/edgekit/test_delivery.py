"""Nothing is lost between the board and the store: end-to-end acks through real brokers.

Every test here runs on two brokers: Mosquitto (MQTT 5) and NATS with JetStream (MQTT 3.1.1, which
also runs as a three-node cluster at the end). The boards are real agents on the test digits
bundle flagging every input; the collector is the real one, writing into SQLite.

The delivery ledger (flagged on the boards, sent and resent by them, acknowledged by the
collector, stored, dropped for room) is printed by the flood and cluster tests.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import jsonschema
import numpy as np
import paho.mqtt.client as mqtt
import pytest

from broker import Mosquitto
from collecting import sample
from device_agent.agent import Agent
from device_agent.config import load_config
from device_agent.delivery import protocol
from edgekit.loop.collect import Collector
from edgekit.loop.store import open_store
from nats_broker import NatsCluster, NatsServer

DATA = Path(__file__).resolve().parents[1] / "device_agent" / "data"
ACK_SCHEMA = jsonschema.Draft202012Validator(protocol.SCHEMAS["edgekit.ack/1"])


@pytest.fixture(params=["mosquitto", "nats"])
def delivery_broker(request, tmp_path):
    """Mosquitto with its default queue limits (max_queued_messages 1000), or one NATS server."""
    if request.param == "mosquitto":
        b = Mosquitto(tmp_path / "mosquitto", max_queued=None, extra_conf="log_type notice\n").start()
        b.protocol = "5"
    else:
        b = NatsServer(tmp_path / "nats").start()
        b.protocol = "3.1.1"
    b.kind = request.param
    yield b
    b.stop()


def test_test_brokers_start_on_another_port_when_their_free_port_was_taken_first(tmp_path, monkeypatch):
    """On a busy machine the port tests/broker.py ``free_port()`` hands out may be taken before the broker
    binds it: Mosquitto and NATS then start on other ports, and neither takes the other listener for itself."""
    import socket

    import broker as mosquitto_module
    import nats_broker as nats_module

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()  # answers TCP connections, speaks no MQTT
    port = taken.getsockname()[1]
    first = {"mosquitto": True, "nats": True}

    def free_port():
        if first["mosquitto"]:
            first["mosquitto"] = False
            return port
        return real_free_port()

    def free_ports(n):
        if first["nats"]:
            first["nats"] = False
            return [port] + real_free_ports(n - 1)
        return real_free_ports(n)

    real_free_port, real_free_ports = mosquitto_module.free_port, nats_module.free_ports
    monkeypatch.setattr(mosquitto_module, "free_port", free_port)
    monkeypatch.setattr(nats_module, "free_ports", free_ports)
    try:
        for b in (Mosquitto(tmp_path / "mosquitto"), NatsServer(tmp_path / "nats")):
            b.start()
            try:
                assert port not in (b.port, getattr(b, "mqtt_port", None))
                assert "already in use" in b.log.lower()
                client = Client(b.url)  # a broker that works, on its new port
                client.publish("edgekit/v1/lab/pi-1/telemetry", b"{}")
                client.close()
            finally:
                b.stop()
    finally:
        taken.close()
    assert not first["mosquitto"] and not first["nats"]


class Client:
    """A plain paho client (MQTT 3.1.1, understood by both brokers) that publishes and records."""

    def __init__(self, url: str, subscribe: str = ""):
        host, port = url.split("//")[1].split(":")
        self.messages: List[tuple] = []
        self.subscribed = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"t-{time.monotonic_ns()}",
                             protocol=mqtt.MQTTv311)
        self.c.on_message = lambda c, u, m: self.on_message(m.topic, bytes(m.payload))
        self.refused: list = []
        self.c.on_subscribe = lambda c, u, mid, codes, p: (self.refused.extend(r for r in codes if r.is_failure),
                                                           self.subscribed.set())
        self.c.connect(host, int(port))
        self.c.loop_start()
        if subscribe:
            self.c.subscribe(subscribe, qos=1)
            assert self.subscribed.wait(60) and not self.refused, self.refused

    def on_message(self, topic: str, payload: bytes) -> None:
        self.messages.append((topic, payload))

    def publish(self, topic: str, payload) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        info = self.c.publish(topic, data, qos=1)
        info.wait_for_publish(20)
        assert info.is_published()

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_the_collector_acknowledges_after_its_commit_stored_duplicate_and_quarantined(delivery_broker, tmp_path):
    db = tmp_path / "samples.db"
    committed_first: List[bool] = []

    class Watcher(Client):
        """Reads the store the moment an ack arrives: every id it names must be committed already."""

        def on_message(self, topic, payload):
            super().on_message(topic, payload)
            ids = json.loads(payload)["stored"]
            with sqlite3.connect(db) as con:
                marks = ",".join("?" * len(ids))
                found = con.execute(f"SELECT COUNT(*) FROM samples WHERE sample_id IN ({marks})", ids).fetchone()[0]
            committed_first.append(found == len(set(ids)))

    good, bad_input = sample(1, device="pi-1"), sample(2, device="pi-1")
    bad_input["input"]["shape"] = [9, 8, 1]  # its base64 holds 64 bytes, the shape says 72
    oversized = sample(3, device="pi-2", raw=np.full((80, 80, 1), 7, np.uint8))  # ~8.7 KB > 4 KiB limit
    with open_store(f"sqlite:///{db}") as store, \
            Collector(delivery_broker.url, store, fleet="lab", client_id=f"ack-{time.monotonic_ns()}",
                      protocol=delivery_broker.protocol, max_payload_bytes=4096) as collector:
        watcher = Watcher(delivery_broker.url, subscribe="edgekit/v1/lab/+/ack")
        board = Client(delivery_broker.url)
        board.publish(protocol.topic("lab", "pi-1", "samples"), good)
        board.publish(protocol.topic("lab", "pi-1", "samples"), good)  # a resend: a duplicate
        board.publish(protocol.topic("lab", "pi-1", "samples"), bad_input)
        board.publish(protocol.topic("lab", "pi-2", "samples"), oversized)
        board.publish(protocol.topic("lab", "pi-2", "samples"), b"\x00not json, no id to acknowledge")
        board.publish(protocol.topic("lab", "pi-2", "telemetry"), {"schema": "edgekit.telemetry/1"})
        assert collector.wait_handled(6, timeout=120), collector.stats
        named = lambda: sum(len(a["stored"]) + len(a.get("quarantined", []))  # noqa: E731
                            for a in (json.loads(p) for _, p in list(watcher.messages)))
        assert wait_for(lambda: collector.stats.acked == 4 and named() == 4, 60), collector.stats
        board.close()
        watcher.close()
    stats = collector.stats
    assert (stats.stored, stats.duplicates, stats.malformed) == (1, 1, {"bad_input": 1, "oversized": 1,
                                                                       "not_json": 1, "schema": 1})
    by_device: Dict[str, Dict[str, list]] = {}
    for topic, payload in watcher.messages:
        ack = json.loads(payload)
        ACK_SCHEMA.validate(ack)
        mine = by_device.setdefault(protocol.parse_topic(topic)["device"], {"stored": [], "quarantined": []})
        mine["stored"] += ack["stored"]
        mine["quarantined"] += ack.get("quarantined", [])
    assert by_device == {
        "pi-1": {"stored": [good["sample_id"]] * 2, "quarantined": [bad_input["sample_id"]]},
        "pi-2": {"stored": [], "quarantined": [oversized["sample_id"]]},
    }
    assert committed_first and all(committed_first), "an ack named a sample before its commit"


class StoreLock:
    """Another connection holding the SQLite store's write lock (a report, a backup, `samples label`): the
    collector's commits wait for it. Held from the start, then on and off (``hold_s`` of every ``period_s``)."""

    def __init__(self, path: Path, hold_s: float = 0.1, period_s: float = 0.15):
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("BEGIN IMMEDIATE")
        self.hold_s, self.period_s = hold_s, period_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._on_and_off, daemon=True)

    def release_first_hold(self) -> None:
        self.db.execute("COMMIT")
        self.thread.start()

    def _on_and_off(self) -> None:
        while not self.stop.wait(self.period_s - self.hold_s):
            self.db.execute("BEGIN IMMEDIATE")
            self.stop.wait(self.hold_s)
            self.db.execute("COMMIT")

    def close(self) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(5)
        self.db.close()


def board_config(tmp_path: Path, name: str, broker_url: str, protocol_version: str, n: int,
                 outbox_keys: Optional[dict] = None, **mqtt_keys):
    digits = np.load(DATA / "digits-300.npz")["x"]
    inputs = tmp_path / f"{name}.npz"
    np.savez(inputs, x=np.concatenate([digits] * (n // 300 + 1))[:n])
    return load_config(
        None, bundle=str(DATA / "digits-bundle"), source=str(inputs), broker=broker_url, device_id=name,
        fleet="flood", results=str(tmp_path / f"{name}.jsonl"), runtime="ai_edge_litert",
        outbox={"path": str(tmp_path / f"{name}-outbox.sqlite"), "drain_timeout_s": 240.0, **(outbox_keys or {})},
        policy={"random_fraction": 1.0, "dedupe": False}, telemetry={"period_s": 5.0},
        mqtt={"protocol": protocol_version, "ack_timeout_s": 2.0, **mqtt_keys},
    )


def flagged_ids(tmp_path: Path, names) -> set:
    ids = set()
    for name in names:
        for line in (tmp_path / f"{name}.jsonl").read_text().splitlines():
            row = json.loads(line)
            if row["flagged"]:
                ids.add(row["sample_id"])
    return ids


def ledger(kind: str, flagged: int, runs, stored: int) -> str:
    sent, resent = sum(r.sent for r in runs), sum(r.resent for r in runs)
    acked, dropped = sum(r.published for r in runs), sum(r.dropped for r in runs)
    return (f"delivery ledger ({kind}): flagged={flagged} sent={sent} resent={resent} acked={acked} "
            f"stored={stored} dropped={dropped} lost={flagged - stored - dropped}")


@pytest.mark.slow
def test_a_flood_through_default_queue_limits_into_a_slow_collector_loses_nothing(delivery_broker, tmp_path, capsys):
    """Two boards each flag every input of a batch and may have 2000 samples out unacknowledged; the
    collector cannot commit at all until every board has sent everything once (then only now and then),
    so Mosquitto's 1000-message queue overflows and drops samples. Resends bring every one home."""
    n = 1500
    names = ["pi-0", "pi-1"]
    db = tmp_path / "samples.db"
    runs: Dict[str, object] = {}
    with open_store(f"sqlite:///{db}") as store:
        lock = StoreLock(db)
        collector = Collector(delivery_broker.url, store, fleet="flood", client_id="flood-collector",
                              protocol=delivery_broker.protocol).start()
        try:
            agents = [Agent(board_config(tmp_path, name, delivery_broker.url, delivery_broker.protocol, n,
                                         max_unacked=2000)) for name in names]
            threads = [threading.Thread(target=lambda a=a: runs.setdefault(a.device, a.run())) for a in agents]
            for t in threads:
                t.start()
            assert wait_for(lambda: all(a.publisher.sent >= n for a in agents), 180), \
                [a.publisher.sent for a in agents]
            lock.release_first_hold()
            for t in threads:
                t.join(300)
            for a in agents:
                a.close()
        finally:
            lock.close()
            collector.stop()
        stored_ids = {r.sample_id for r in store.list_samples()}
    flagged = flagged_ids(tmp_path, names)
    line = ledger(delivery_broker.kind, len(flagged), runs.values(), len(stored_ids))
    with capsys.disabled():
        print(f"\n{line}")
    assert len(flagged) == 2 * n
    assert all(r.pending == 0 and r.dropped == 0 for r in runs.values()), runs
    assert stored_ids == flagged, line
    if delivery_broker.kind == "mosquitto":  # the flood really overflowed the broker, and resends fixed it
        log = (delivery_broker.workdir / "mosquitto.log").read_text()
        assert "Outgoing messages are being dropped for client flood-collector" in log
        assert sum(r.resent for r in runs.values()) > 0, line


@pytest.mark.slow
def test_a_three_node_nats_cluster_loses_a_node_mid_run_and_no_sample(tmp_path, capsys):
    """Board on node 1, collector on node 2 (each knows all three, in its own order); node 2 is killed
    mid-run. The collector moves to another node and finds its persistent session there (NATS keeps MQTT
    sessions and QoS 1 messages in JetStream streams, replicated on three nodes with ``stream_replicas: 3``);
    what the cluster lost in the turmoil, the board resends for want of an ack. While the cluster elects
    new leaders, a node may close a client's connection (a JetStream request timed out) or refuse a
    subscription (its consumer could not be created in time): board and collector reconnect and subscribe
    again by themselves. On a loaded machine that can take minutes, so the test waits for the outcome
    (every flagged sample stored, the board's outbox empty) with a generous deadline, not for a timer."""
    cluster = NatsCluster(tmp_path / "nats", extra_mqtt="stream_replicas: 3").start()
    n1, n2, n3 = cluster.nodes
    n = 600
    db = tmp_path / "samples.db"
    run = {}
    try:
        with open_store(f"sqlite:///{db}") as store:
            collector = Collector(",".join(node.url for node in (n2, n3, n1)), store, fleet="flood",
                                  client_id="ha-collector", protocol="3.1.1").start()
            try:
                board = Agent(board_config(tmp_path, "pi-ha", ",".join(node.url for node in (n1, n2, n3)),
                                           "3.1.1", n, outbox_keys={"drain_timeout_s": 900.0}))
                thread = threading.Thread(target=lambda: run.setdefault("stats", board.run()))
                thread.start()
                try:
                    assert wait_for(lambda: store.count_samples() >= n // 4, 300), store.count_samples()
                    n2.kill()
                    stored_at_kill = store.count_samples()
                    assert wait_for(lambda: not thread.is_alive(), 900), (
                        f"the board still holds {board.outbox.depth} samples after 15 minutes; "
                        f"{store.count_samples()} stored; sent={board.publisher.sent} "
                        f"resent={board.publisher.resent} acked={board.publisher.acked} "
                        f"link={board.link.where} connected={board.link.connected.is_set()}")
                finally:
                    thread.join(60)
                    board.close()
                # the collector lives on: on another node than the dead one, with the session it had
                assert wait_for(lambda: collector.connected and collector.broker.port != n2.mqtt_port, 120), \
                    f"the collector is not connected to a live node: {collector.broker.redacted()}"
                assert collector.session_present, "its session did not survive the node"
            finally:
                collector.stop()
            stored_ids = {r.sample_id for r in store.list_samples()}
    finally:
        cluster.stop()
    flagged = flagged_ids(tmp_path, ["pi-ha"])
    stats = run["stats"]
    line = ledger("nats cluster, node 2 killed", len(flagged), [stats], len(stored_ids))
    with capsys.disabled():
        print(f"\n{line} (stored before the kill: {stored_at_kill})")
    assert stored_at_kill < n, "the node died after everything was stored: the test tested nothing"
    assert (stats.flagged, stats.pending, stats.dropped) == (n, 0, 0), line
    assert stored_ids == flagged, line


def test_a_sample_over_the_rate_limit_is_not_acknowledged_so_its_board_sends_it_again(tmp_path):
    """The per-device rate limit (edgekit collect --device-rate) quarantines what is over it but does not
    acknowledge it: the board keeps it and it comes again; a device not on the allow-list is acknowledged as
    quarantined (it would be refused however often it came)."""
    from edgekit.loop.gate import DeviceGate

    allow = tmp_path / "allow.txt"
    allow.write_text("lab/pi-1\n")
    s1, s2, stranger = sample(1, device="pi-1"), sample(2, device="pi-1"), sample(3, device="pi-9")
    with Mosquitto(tmp_path / "mosquitto") as broker, open_store(f"sqlite:///{tmp_path}/s.db") as store, \
            Collector(broker.url, store, fleet="lab", client_id="gate-acks",
                      gate=DeviceGate(allow=allow, rate_per_minute=0.001, burst=1)) as collector:
        watcher = Client(broker.url, subscribe="edgekit/v1/lab/+/ack")
        board = Client(broker.url)
        for topic, payload in ((protocol.topic("lab", "pi-1", "samples"), s1),
                               (protocol.topic("lab", "pi-1", "samples"), s2),
                               (protocol.topic("lab", "pi-9", "samples"), stranger)):
            board.publish(topic, payload)
        assert collector.wait_handled(3, timeout=120)
        assert wait_for(lambda: collector.stats.acked == 2 and len(watcher.messages) == 2, 60), collector.stats
        board.close()
        watcher.close()
    assert collector.stats.malformed == {"rate_limited": 1, "not_allowed": 1}
    named = {}
    for topic, payload in watcher.messages:
        ack = json.loads(payload)
        named.setdefault(protocol.parse_topic(topic)["device"], []).extend(
            [("stored", i) for i in ack["stored"]] + [("quarantined", i) for i in ack.get("quarantined", [])])
    assert named == {"pi-1": [("stored", s1["sample_id"])], "pi-9": [("quarantined", stranger["sample_id"])]}


def nats_collector_auth(may_read_samples: bool) -> str:
    """The collector logs in as ``collector`` (allowed to read the fleet's samples or not); clients without
    credentials (the boards here) are the unrestricted ``board``. The collector keeps publish permissions
    either way: nats-server 2.9 crashes on a reload when a user who stored a retained message has none."""
    subscribe = '{allow: [">"]}' if may_read_samples else '{deny: ["edgekit.v1.lab.*.samples"]}'
    user = '{user: collector, password: c-pw, permissions: {publish: {allow: [">"]}, subscribe: %s}}' % subscribe
    return f"no_auth_user: board\nauthorization {{ users = [ {user}, {{user: board}} ] }}\n"


def test_a_subscription_the_broker_refuses_after_start_up_is_tried_again_until_it_takes_it(tmp_path, caplog):
    """A broker may answer a SUBSCRIBE with a failure code and keep the connection (NATS does when it
    cannot create the subscription's JetStream consumer in time, as a cluster that lost a node elects new
    leaders; here a fresh node whose permissions refuse it at first). After start-up the collector must not
    run on without its samples subscription: it subscribes again, with backoff, until the broker takes it."""
    import logging
    import shutil

    node = NatsServer(tmp_path / "nats", extra_conf=nats_collector_auth(True)).start()
    try:
        with open_store(f"sqlite:///{tmp_path}/s.db") as store, \
                Collector(f"mqtt://collector:c-pw@127.0.0.1:{node.mqtt_port}", store, fleet="lab",
                          client_id="resubscriber", protocol="3.1.1") as collector:
            board = Client(node.url)
            board.publish(protocol.topic("lab", "pi-1", "samples"), sample(1, device="pi-1"))
            assert wait_for(lambda: store.count_samples() == 1, 60)
            board.close()
            with caplog.at_level(logging.INFO, logger="edgekit.loop.collect"):
                # The node is replaced by a fresh one (no JetStream state: the session is gone), which
                # refuses the collector's samples subscription at first.
                node.stop()
                shutil.rmtree(node.workdir / "js")
                node.reconfigure(nats_collector_auth(False), running=False)
                node.start()
                assert wait_for(lambda: any("refused the subscription to edgekit/v1/lab/+/samples" in r.getMessage()
                                            for r in caplog.records), 60), [r.getMessage() for r in caplog.records]
                assert collector.connected and not collector.session_present
                node.reconfigure(nats_collector_auth(True))  # the operator fixes it; connections stay
                assert wait_for(lambda: collector.resubscribed == 1, 90), "the collector did not subscribe again"
            board = Client(node.url)
            board.publish(protocol.topic("lab", "pi-1", "samples"), sample(2, device="pi-1"))
            assert wait_for(lambda: store.count_samples() == 2, 60), "a sample after the fix was not stored"
            board.close()
    finally:
        node.stop()
    assert "Subscription Violation" in node.log
