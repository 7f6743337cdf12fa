"""`edgekit demo` end to end with the embedded broker: the path that needs nothing installed."""

from __future__ import annotations

import json

import pytest

from device_agent.update.manifest import load_bundle
from edgekit.demo import MARKER, DemoConfig, run_demo
from edgekit.errors import EdgekitError
from edgekit.loop.store import open_store


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo-out"
    lines = []
    result = run_demo(DemoConfig(output=out, broker="embedded"), say=lines.append)
    return result, lines


def test_the_loop_runs_over_the_embedded_broker_and_improves_the_shifted_accuracy(demo):
    result, lines = demo
    assert result.broker == "embedded"
    c = result.counts
    assert c["inferences"] == c["stream"] == 500
    assert 0 < c["flagged"] == c["published"] == c["stored"] == c["labeled"]
    # the agent's confidence signal found the shifted inputs: they are over-represented among the flagged
    assert c["shifted"] / c["labeled"] > c["stream_shifted"] / c["stream"]
    acc = result.accuracy
    assert acc["v2"]["shifted"] > acc["v1"]["shifted"]
    assert acc["v1"]["clean"] > 0.9 and acc["v2"]["clean"] > 0.9
    assert sum(result.stages.values()) <= result.seconds


def test_every_artifact_is_where_the_output_says(demo):
    result, lines = demo
    out = result.output
    text = "\n".join(lines)
    v1, v2 = load_bundle(out / "bundle-v1").manifest, load_bundle(out / "bundle-v2").manifest
    assert (v1.version, v2.version) == ("1", "2") and v1.sha256 != v2.sha256
    assert (out / "bundle-v2" / "retrain.md").is_file() and (out / "bundle-v2" / "float_model.keras").is_file()
    assert json.loads((out / "bundle-v2" / "retrain.json").read_text())["verdict"] == result.verdict
    with open_store(f"sqlite:///{out / 'samples.db'}") as store:
        labeled = store.list_samples(labeled=True)
        assert len(labeled) == result.counts["labeled"]
        assert {r.labeled_by for r in labeled} == {"demo-ground-truth"}
        assert {r.device for r in labeled} == {"demo-board-1"} and {r.fleet for r in labeled} == {"demo"}
    assert "stands in for a person" in text
    assert f"edgekit samples list --store sqlite:///{out / 'samples.db'}" in text
    assert "edgekit fleet status" in text
    assert str(out / "bundle-v2" / "retrain.md") in text
    assert [ln.split("]")[0] for ln in lines if ln.startswith("[")] == [f"[{i}/11" for i in range(1, 12)]


def test_a_promoted_v2_goes_back_to_the_board_and_runs_there(demo):
    result, lines = demo
    after = result.counts["after_update"]
    if result.verdict == "promote":
        # every input after the push ran on v2: the board verified it, swapped it in and kept it
        assert after == {"2": 100}
        assert (result.output / "agent" / "results-after-update.jsonl").is_file()
        assert "swapped it in between two inferences" in "\n".join(lines)
    else:
        assert after == {} and "not shipped" in "\n".join(lines)


def test_the_demo_signs_its_bundles_and_its_board_runs_only_what_its_key_signed(demo):
    import stat

    from edgekit.fleet.keys import load_signing_key, verify_bundle

    result, lines = demo
    out = result.output
    key = load_signing_key(out / "keys" / "signing.key")
    assert stat.S_IMODE((out / "keys" / "signing.key").stat().st_mode) == 0o600
    assert verify_bundle(out / "bundle-v1", [key]).release == 1
    assert verify_bundle(out / "bundle-v2", [key]).release == 2
    record = json.loads((out / "agent" / "releases-demo-board-1.json").read_text())["keys"]
    assert list(record) == [key.key_id]
    assert record[key.key_id]["release"] == (2 if result.verdict == "promote" else 1)
    assert "signed as release 1 with key" in "\n".join(lines)


def test_output_not_made_by_the_demo_is_left_alone(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(EdgekitError, match="not made by the demo"):
        run_demo(DemoConfig(output=tmp_path), say=lambda line: None)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    assert not (tmp_path / MARKER).exists()


@pytest.mark.parametrize("prefer", ["mosquitto", "embedded"])
def test_a_started_broker_carries_qos1_messages_and_stops(tmp_path, prefer):
    import threading

    import paho.mqtt.client as mqtt

    from edgekit.broker import find_or_start_broker, mqtt_answers

    broker = find_or_start_broker(tmp_path, prefer=prefer)
    port = int(broker.url.rsplit(":", 1)[1])
    try:
        assert broker.kind == prefer and broker.protocol == ("5" if prefer == "mosquitto" else "3.1.1")
        proto = mqtt.MQTTv5 if broker.protocol == "5" else mqtt.MQTTv311
        got, done = [], threading.Event()
        sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="t-sub", protocol=proto)
        sub.on_message = lambda c, u, m: (got.append(m.payload), len(got) == 3 and done.set())
        subscribed = threading.Event()
        sub.on_subscribe = lambda *a: subscribed.set()
        sub.connect("127.0.0.1", port)
        sub.loop_start()
        sub.subscribe("edgekit/v1/t/#", qos=1)
        assert subscribed.wait(5)
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="t-pub", protocol=proto)
        pub.connect("127.0.0.1", port)
        pub.loop_start()
        for i in range(3):
            pub.publish("edgekit/v1/t/d/samples", f"m{i}".encode(), qos=1).wait_for_publish(5)
        assert done.wait(5) and got == [b"m0", b"m1", b"m2"]
        for c in (pub, sub):
            c.disconnect()
            c.loop_stop()
    finally:
        broker.stop()
    assert not mqtt_answers("127.0.0.1", port, timeout=1.0, protocol=broker.protocol)
