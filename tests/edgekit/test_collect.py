"""The collector against a real Mosquitto: idempotent storage, telemetry/status, shared subscriptions."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from collecting import Publisher, sample, store, store_url, telemetry  # noqa: F401  (fixtures)
from device_agent.delivery import protocol
from edgekit.cli import main
from edgekit.loop.collect import Collector, check_message, Malformed
from edgekit.errors import BrokerError, EdgekitError
from edgekit.loop.store import open_store


def _cid(name: str) -> str:
    return f"{name}-{time.monotonic_ns()}"


def test_the_same_sample_twice_is_one_row_even_from_an_independent_client(broker, store):
    p = sample(1)
    topic = protocol.topic("lab", "pi-1", "samples")
    with Collector(broker.url, store, fleet="lab", client_id=_cid("dup")) as c:
        pub = Publisher(broker.port)
        pub.publish(topic, p)
        pub.publish(topic, p)
        pub.close()
        subprocess.run(["mosquitto_pub", "-p", str(broker.port), "-q", "1", "-t", topic, "-m", json.dumps(p)],
                       check=True, timeout=10)
        assert c.wait_handled(3, timeout=10)
    assert c.stats.stored == 1 and c.stats.duplicates == 2 and c.stats.malformed_total == 0
    assert [r.sample_id for r in store.list_samples()] == [p["sample_id"]]


def test_telemetry_and_status_reach_fleet_status(broker, store_url, capsys):
    status_topic = protocol.topic("lab", "pi-2", "status")
    offline = json.dumps(protocol.status_payload(device="pi-2", fleet="lab", state="offline"))
    with open_store(store_url) as store, Collector(broker.url, store, client_id=_cid("fleet")) as c:
        pub = Publisher(broker.port)
        pub.publish(protocol.topic("lab", "pi-1", "status"),
                    protocol.status_payload(device="pi-1", fleet="lab", state="online", model={"version": "1.0.0"}),
                    retain=True)
        pub.publish(protocol.topic("lab", "pi-1", "telemetry"), telemetry(inferences=4321, depth=7, dropped=2))
        pub.publish(protocol.topic("lab", "pi-1", "samples"), sample(1))
        pub.close()
        # pi-2 is an independent client whose connection dies: the broker publishes its last will.
        sub = subprocess.Popen(
            ["mosquitto_sub", "-p", str(broker.port), "-t", "none", "-k", "5", "--will-topic", status_topic,
             "--will-payload", offline, "--will-qos", "1", "--will-retain"], stdout=subprocess.DEVNULL)
        time.sleep(0.5)
        sub.send_signal(signal.SIGKILL)
        sub.wait()
        assert c.wait_handled(4, timeout=15), c.stats
    assert main(["fleet", "status", "--store", store_url, "--json"]) == 0
    rows = {r["device"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert rows["pi-1"]["online"] is True and rows["pi-2"]["online"] is False
    assert rows["pi-2"]["state"] == "offline"
    one = rows["pi-1"]
    assert (one["model_version"], one["inferences"], one["outbox_depth"], one["dropped"], one["samples"]) == (
        "1.0.0", 4321, 7, 2, 1)
    assert one["temperature_c"] == 51.5 and one["low_confidence_rate"] == pytest.approx(0.081)
    assert main(["fleet", "status", "--store", store_url]) == 0
    table = capsys.readouterr().out
    assert "pi-1" in table and "online" in table and "4321" in table and "8.1%" in table and "offline" in table


def test_collectors_in_a_share_group_split_the_fleet_and_store_each_sample_once(broker, tmp_path):
    url = f"sqlite:///{tmp_path}/shared.db"
    with open_store(url) as s1, open_store(url) as s2:
        with Collector(broker.url, s1, share_group="g", client_id=_cid("a")) as a, \
                Collector(broker.url, s2, share_group="g", client_id=_cid("b")) as b:
            pub = Publisher(broker.port)
            for i in range(200):
                pub.publish(protocol.topic("lab", f"pi-{i % 4}", "samples"), sample(i, device=f"pi-{i % 4}"))
            pub.close()
            deadline = time.monotonic() + 20
            while a.stats.handled + b.stats.handled < 200 and time.monotonic() < deadline:
                time.sleep(0.05)
        assert a.stats.stored + b.stats.stored == 200
        assert a.stats.stored > 0 and b.stats.stored > 0
        assert s1.count_samples() == 200


def test_bad_collector_settings_name_the_field(store):
    with pytest.raises(EdgekitError, match="scheme"):
        Collector("http://x", store)
    with pytest.raises(EdgekitError, match="fleet"):
        Collector("mqtt://127.0.0.1:1", store, fleet="a/b")
    with pytest.raises(EdgekitError, match="max_payload_bytes"):
        Collector("mqtt://127.0.0.1:1", store, max_payload_bytes=10)


def test_check_message_names_each_problem():
    t = protocol.topic("lab", "pi-1", "samples")
    good = json.dumps(sample(1)).encode()
    assert check_message(t, good)[0] == "samples"
    with pytest.raises(Malformed) as e:
        check_message(t, good, max_bytes=100)
    assert e.value.reason == "oversized" and "limit=100" in e.value.detail
    with pytest.raises(Malformed) as e:
        check_message("edgekit/v1/lab/pi-1/other", good)
    assert e.value.reason == "bad_topic"
    with pytest.raises(Malformed) as e:
        check_message(protocol.topic("lab", "pi-9", "samples"), good)
    assert e.value.reason == "topic_mismatch"


def test_a_collector_without_a_broker_fails_with_one_clear_line(store):
    from broker import free_port

    with pytest.raises(BrokerError, match="cannot connect to mqtt://127.0.0.1:.*is the broker running"):
        Collector(f"mqtt://127.0.0.1:{free_port()}", store).start()
