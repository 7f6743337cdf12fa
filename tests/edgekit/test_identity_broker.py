"""Mosquitto with the configuration `edgekit broker-config` writes, the real agent and the real collector:
a board speaks only for itself, and only the host identities command and push."""

from __future__ import annotations

import getpass
import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from broker import free_port, port_open  # tests/broker.py, on the path through tests/conftest.py
from collecting import sample
from device_agent.agent import Agent
from device_agent.config import load_config
from device_agent.delivery import protocol
from device_agent.sources import ArraySource
from edgekit.fleet.broker_config import write_broker_config
from edgekit.fleet.identity import init_ca
from edgekit.fleet.push import bundle_message, push_bundle
from edgekit.fleet.status import fleet_status
from edgekit.loop.collect import Collector
from edgekit.loop.gate import DeviceGate
from edgekit.loop.store import open_store

DATA = Path(__file__).resolve().parents[1] / "device_agent" / "data"
NOT_AUTHORIZED = 135  # MQTT 5 reason code 0x87


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """A CA; boards pi-1, pi-2, pi-3 in `lab`; a collector and a pusher; Mosquitto running the generated config.

    pi-3 is revoked after the broker configuration was written: the broker (not reloaded) still lets it
    in, the collector's allow-list (the CA's enrolment list) no longer does."""
    d = tmp_path_factory.mktemp("fleet")
    ca = init_ca(d / "ca")
    ids = {n: ca.enroll(n, d / "ids" / n, fleet="lab") for n in ("pi-1", "pi-2", "pi-3")}
    ids["collector"] = ca.enroll("main", d / "ids" / "collector", role="collector", fleet=None)
    ids["pusher"] = ca.enroll("ops", d / "ids" / "pusher", role="pusher", fleet=None)
    foreign = init_ca(d / "foreign").enroll("pi-1", d / "ids" / "foreign-pi-1", fleet="lab")
    port = free_port()
    cfg = write_broker_config(ca, d / "broker", hosts=["127.0.0.1"], port=port, bind="127.0.0.1")
    ca.revoke("pi-3")
    run = d / "run.conf"  # the generated file verbatim, plus who to run as and where to log
    run.write_text(f"user {getpass.getuser()}\nlog_dest file {d / 'mosquitto.log'}\nlog_type error\n"
                   f"log_type warning\n" + cfg.conf.read_text())
    proc = subprocess.Popen(["mosquitto", "-c", str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: port_open(port) or proc.poll() is not None, 10) and proc.poll() is None, \
            (d / "mosquitto.log").read_text() if (d / "mosquitto.log").exists() else "mosquitto did not start"
        yield {"dir": d, "ca": ca, "ids": ids, "foreign": foreign, "port": port,
               "url": f"mqtts://127.0.0.1:{port}"}
    finally:
        proc.terminate()
        proc.wait(10)


class Client:
    """A paho client holding one enrolment's certificate: what a forger, a board or a tool can do."""

    def __init__(self, fleet, enrolment=None, *, protocol_version=mqtt.MQTTv5, client_id: str = "",
                 cert: bool = True):
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol_version)
        ca_file = str(fleet["ids"]["pi-1"].ca)
        if enrolment is not None and cert:
            self.client.tls_set(ca_certs=ca_file, certfile=str(enrolment.cert), keyfile=str(enrolment.key))
        else:
            self.client.tls_set(ca_certs=ca_file)
        self.messages: List[Tuple[str, bytes]] = []
        self.acks: Dict[int, int] = {}
        self.connected = threading.Event()
        self.gone = threading.Event()
        self._lock = threading.Condition()
        self.client.on_connect = lambda c, u, f, rc, p: (self.gone if rc.is_failure else self.connected).set()
        self.client.on_disconnect = lambda c, u, f, rc, p: self.gone.set()
        self.client.on_message = self._message
        self.client.on_publish = self._published
        self.port = fleet["port"]

    def _message(self, client, userdata, msg) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def _published(self, client, userdata, mid, reason_code, properties) -> None:
        with self._lock:
            self.acks[mid] = reason_code.value if hasattr(reason_code, "value") else int(reason_code)
            self._lock.notify_all()

    def connect(self) -> bool:
        """True when the broker let us in; False when it refused or dropped the connection."""
        try:
            self.client.connect("127.0.0.1", self.port)
        except OSError:
            return False
        self.client.loop_start()
        wait_for(lambda: self.connected.is_set() or self.gone.is_set(), 10)
        return self.connected.is_set() and not self.gone.is_set()

    def subscribe(self, *topics: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda c, u, mid, rcs, p: done.set()
        self.client.subscribe([(t, 1) for t in topics])
        assert done.wait(10)

    def publish(self, topic: str, payload, retain: bool = False) -> int:
        """Publish with QoS 1 and return the PUBACK's reason code (0 = accepted)."""
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        info = self.client.publish(topic, data, qos=1, retain=retain)
        with self._lock:
            assert self._lock.wait_for(lambda: info.mid in self.acks, 10), f"no PUBACK for {topic}"
            return self.acks[info.mid]

    def received(self, topic: str) -> List[bytes]:
        with self._lock:
            return [p for t, p in self.messages if t == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def agent_config(fleet, tmp_path, enrolment, device: str, **tables):
    return load_config(
        None, bundle=str(DATA / "digits-bundle"), broker=fleet["url"], device_id=device, fleet="lab",
        mqtt={"ca_file": str(enrolment.ca), "cert_file": str(enrolment.cert), "key_file": str(enrolment.key),
              "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
        outbox={"path": str(tmp_path / f"outbox-{device}-{enrolment.identity.serial[:6]}.sqlite"),
                "drain_timeout_s": tables.pop("drain", 20.0)},
        results={"path": str(tmp_path / f"results-{device}.jsonl")}, telemetry={"period_s": 1.0},
        policy={"random_fraction": 1.0, "dedupe": False}, **tables,
    )


def test_a_board_delivers_and_nobody_else_reaches_the_store_in_its_name(fleet, tmp_path):
    ids = fleet["ids"]
    with np.load(DATA / "digits-300.npz") as d:
        x = d["x"]
    with open_store(f"sqlite:///{tmp_path}/samples.db") as store:
        collector = Collector(fleet["url"], store, fleet="lab", client_id="collector:main",
                              ca_file=str(ids["collector"].ca), cert_file=str(ids["collector"].cert),
                              key_file=str(ids["collector"].key), gate=DeviceGate(allow=fleet["dir"] / "ca"))
        with collector:
            # 1. pi-1 with its own certificate: every sample reaches the store.
            with Agent(agent_config(fleet, tmp_path, ids["pi-1"], "pi-1"), source=ArraySource(x[:20])) as agent:
                stats = agent.run()
            assert (stats.flagged, stats.published, stats.rejected, stats.pending) == (20, 20, 0, 0)
            sent = {json.loads(line)["sample_id"] for line in (tmp_path / "results-pi-1.jsonl").read_text().splitlines()}

            # 2. pi-2 forges for pi-1: a sample, a retained status claiming model 999, 50 invented boards.
            forger = Client(fleet, ids["pi-2"])
            assert forger.connect()
            model = {"name": "digits", "version": "999", "sha256": "ab" * 32}
            assert forger.publish(protocol.topic("lab", "pi-1", "samples"), sample(1, device="pi-1")) == NOT_AUTHORIZED
            forged_status = protocol.status_payload(device="pi-1", fleet="lab", state="online", model=model)
            assert forger.publish(protocol.topic("lab", "pi-1", "status"), forged_status, retain=True) == NOT_AUTHORIZED
            codes = {forger.publish(protocol.topic("lab", f"ghost-{i}", "samples"), sample(i, device=f"ghost-{i}"))
                     for i in range(50)}
            assert codes == {NOT_AUTHORIZED}
            assert forger.publish(protocol.topic("other", "pi-2", "samples"), sample(7, device="pi-2",
                                                                                      fleet="other")) == NOT_AUTHORIZED
            # on its own topic the broker lets it through, and the collector refuses the claim
            assert forger.publish(protocol.topic("lab", "pi-2", "samples"), sample(2, device="pi-1")) == 0
            forger.close()
            # MQTT 3.1.1 has no refusal code: Mosquitto acks and drops
            old = Client(fleet, ids["pi-2"], protocol_version=mqtt.MQTTv311)
            assert old.connect()
            assert old.publish(protocol.topic("lab", "pi-1", "samples"), sample(3, device="pi-1")) == 0
            old.close()

            # 3. no certificate, or a certificate with the right name from another CA: not even connected.
            assert not Client(fleet, None).connect()
            assert not Client(fleet, fleet["foreign"]).connect()

            # 4. pi-3, revoked after the broker was configured: the broker still lets it in, the collector does not.
            revoked = Client(fleet, ids["pi-3"])
            assert revoked.connect()
            assert revoked.publish(protocol.topic("lab", "pi-3", "samples"), sample(4, device="pi-3")) == 0
            revoked.close()

            # 5. the real agent speaking for pi-1 with pi-2's certificate: refused, counted, kept, no loop.
            impostor = agent_config(fleet, tmp_path, ids["pi-2"], "pi-1", drain=1.5)
            with Agent(impostor, source=ArraySource(x[20:25])) as agent:
                stats = agent.run()
            assert (stats.flagged, stats.published, stats.rejected, stats.pending) == (5, 0, 5, 5)

            # The two refusals the collector saw arrived after everything forged above: nothing else is coming.
            assert wait_for(lambda: store.quarantine_counts() == {"topic_mismatch": 1, "not_allowed": 1}, 20), \
                store.quarantine_counts()
            assert collector.wait_idle(0.2, timeout=20)
        samples = store.list_samples()
        assert {s.sample_id for s in samples} == sent and {s.device for s in samples} == {"pi-1"}
        rows = fleet_status(store)
        version = json.loads((DATA / "digits-bundle" / "manifest.json").read_text())["version"]
        assert [(r["device"], r["model_version"]) for r in rows] == [("pi-1", version)] and version != "999"
        assert rows[0]["online"] is False  # the real board's own "offline" as it closed; the impostor's was refused


def test_only_the_pusher_commands_and_pushes_and_a_board_reads_only_its_own(fleet):
    ids = fleet["ids"]
    cmd1, bundle1 = protocol.topic("lab", "pi-1", "cmd"), protocol.topic("lab", "pi-1", "bundle")
    cmd2 = protocol.topic("lab", "pi-2", "cmd")
    target = Client(fleet, ids["pi-1"], client_id="edgekit-lab-pi-1")
    assert target.connect()
    target.subscribe(cmd1, bundle1)
    snoop = Client(fleet, ids["pi-2"], client_id="edgekit-lab-pi-1")  # pi-1's client id: no takeover
    assert snoop.connect()
    snoop.subscribe("#", cmd2)
    silence = {"schema": "edgekit.cmd/1", "cmd": "set_thresholds", "args": {"confidence": 0, "margin": 0}}
    try:
        # A board and the collector try to command or re-flash pi-1: the broker refuses.
        assert snoop.publish(cmd1, dict(silence, id="forged")) == NOT_AUTHORIZED
        collector = Client(fleet, ids["collector"])
        assert collector.connect()
        payload, data = bundle_message(DATA / "digits-bundle-v2")
        assert collector.publish(bundle1, data, retain=True) == NOT_AUTHORIZED
        assert collector.publish(cmd1, dict(silence, id="collector")) == NOT_AUTHORIZED
        collector.close()

        # The pusher may: `edgekit fleet push` with its certificate, then a command to each board.
        results = push_bundle(data, broker_url=fleet["url"], fleet="lab", devices=["pi-1"], ca_file=str(ids["pusher"].ca),
                              cert_file=str(ids["pusher"].cert), key_file=str(ids["pusher"].key))
        assert [(r.ok, r.detail) for r in results] == [(True, "acknowledged")]
        pusher = Client(fleet, ids["pusher"])
        assert pusher.connect()
        assert pusher.publish(cmd1, dict(silence, id="real")) == 0
        assert pusher.publish(cmd2, {"schema": "edgekit.cmd/1", "cmd": "ping", "id": "last"}) == 0
        pusher.close()

        # The broker routes each client's messages in order: once pi-1 has the pusher's command and pi-2 its
        # own, anything forged or not theirs would have arrived before.
        assert wait_for(lambda: target.received(cmd1) and snoop.received(cmd2), 10)
        assert [json.loads(p)["id"] for p in target.received(cmd1)] == ["real"]
        assert [json.loads(p)["sha256"] for p in target.received(bundle1)] == [payload["sha256"]]
        assert {t for t, _ in snoop.messages} == {cmd2}  # "#" gave pi-2 nothing of pi-1's
        assert target.connected.is_set() and not target.gone.is_set()  # pi-2 reusing its client id kicked nobody
    finally:
        target.close()
        snoop.close()
        clear = Client(fleet, ids["pusher"])  # the retained bundle goes with the module's broker anyway
        if clear.connect():
            clear.publish(bundle1, b"", retain=True)
            clear.close()
