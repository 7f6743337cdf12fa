"""The agent against a real Mosquitto: schema, broker outage, outbox cap. Nothing flagged may go missing.

The policy is made deterministic (``random_fraction = 1.0`` flags every input)
so each test knows exactly which samples must arrive.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np

from device_agent.agent import Agent
from device_agent.delivery.protocol import decode_array
from device_agent.sources import ArraySource

from conftest import validate

FLAG_ALL = {"random_fraction": 1.0, "dedupe": False}


class SlowSource(ArraySource):
    """An array streamed at a fixed pace, idling in between like a real sensor."""

    finite = True

    def __init__(self, x, period_s, ids=None):
        super().__init__(x, ids)
        self.period_s = period_s

    def items(self, stop):
        for item in super().items(stop):
            yield item
            end = time.monotonic() + self.period_s
            while time.monotonic() < end and not stop.is_set():
                yield None
                time.sleep(0.01)


def test_samples_arrive_with_the_documented_schema(broker, sub_factory, make_config, digits, expected_runtime, tmp_path):
    x, y = digits
    sub = sub_factory(broker.port)
    config = make_config(broker.url, policy=FLAG_ALL, mqtt={"publish_predictions": True})
    ids = [f"digit-{i}" for i in range(40)]

    class Connected(ArraySource):  # predictions are QoS 0, dropped while offline: classify once connected
        def items(self, stop):
            agent.link.connected.wait(30)
            yield from super().items(stop)

    with Agent(config, source=Connected(x[:40], ids)) as agent:
        stats = agent.run()
    assert stats.runtime == expected_runtime
    assert (stats.inferences, stats.flagged, stats.published, stats.pending, stats.dropped) == (40, 40, 40, 0, 0)
    assert sub.wait(lambda s: len(s.samples()) >= 40 and s.messages("status")[-1]["state"] == "offline", 10)

    samples = sub.samples()
    for s in samples:
        validate(s)
    by_index = {s["source"]["index"]: s for s in samples}
    assert sorted(by_index) == list(range(40))
    for i, s in by_index.items():
        assert s["source"] == {"uri": "array", "index": i, "id": f"digit-{i}"}
        assert np.array_equal(decode_array(s["input"]), x[i])  # the raw input travels, byte for byte
        assert s["reasons"] == ["random"] or "random" in s["reasons"]
        assert (s["device"], s["fleet"]) == ("dev1", "test")
        assert s["model"]["sha256"] == agent.manifest.sha256
    assert sorted(s["seq"] for s in samples) == list(range(40))

    statuses = sub.messages("status")
    for m in statuses:
        validate(m)
    assert [m["state"] for m in statuses][0] == "online" and statuses[-1]["state"] == "offline"
    telemetry = sub.messages("telemetry")
    assert telemetry, "no telemetry arrived"
    for m in telemetry:
        validate(m)
    last = telemetry[-1]
    assert last["inferences"] == 40 and last["runtime"] == expected_runtime
    assert last["outbox"] == {"depth": 0, "bytes": 0, "dropped": 0}
    assert last["latency_ms"]["p50"] > 0 and last["memory_rss_bytes"] > 0

    predictions = sub.messages("predictions")  # QoS 0 and optional, but on a quiet local broker all arrive
    for m in predictions:
        validate(m)
    assert {m["sample_id"] for m in predictions} <= {s["sample_id"] for s in samples} and predictions

    # Every prediction is a result line; a flagged one names the sample it became.
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 40
    assert {line["sample_id"] for line in lines} == {s["sample_id"] for s in samples}


def test_broker_stopped_for_10s_mid_run_loses_nothing(broker, sub_factory, make_config, digits):
    x, _ = digits
    n = 150
    sub = sub_factory(broker.port)
    config = make_config(broker.url, policy=FLAG_ALL)
    outage = {}

    def cut():
        time.sleep(2.5)
        broker.stop()
        outage["down"] = time.monotonic()
        time.sleep(10)
        broker.start()
        outage["up"] = time.monotonic()

    cutter = threading.Thread(target=cut)
    with Agent(config, source=SlowSource(x[:n], 0.1)) as agent:
        cutter.start()
        depth_seen = []
        stop = threading.Event()
        threading.Thread(target=lambda: [depth_seen.append(agent.outbox.depth) or time.sleep(0.2)
                                         for _ in iter(stop.is_set, True)], daemon=True).start()
        stats = agent.run()
        stop.set()
        generations = agent.link.generation
    cutter.join()
    assert outage["up"] - outage["down"] >= 10
    assert generations >= 2, "the agent never reconnected"
    assert max(depth_seen) > 10, "samples did not wait in the outbox during the outage"
    assert (stats.flagged, stats.pending, stats.dropped) == (n, 0, 0)
    assert sub.alive()  # it reconnects by itself; its persistent session kept our QoS 1 messages
    assert sub.wait(lambda s: {m["source"]["index"] for m in s.samples()} >= set(range(n)), 20)
    assert {m["source"]["index"] for m in sub.samples()} == set(range(n))


def test_outbox_cap_holds_and_the_dropped_count_is_exact(broker, sub_factory, make_config, digits):
    x, _ = digits
    n, cap = 100, 20_000
    sub = sub_factory(broker.port)
    broker.stop()
    config = make_config(broker.url, policy=FLAG_ALL, outbox={"max_bytes": cap, "drain_timeout_s": 0.5})
    with Agent(config, source=ArraySource(x[:n])) as agent:
        stats = agent.run()
        kept_bytes = agent.outbox.bytes
    assert stats.flagged == n
    assert 0 < stats.pending < n and kept_bytes <= cap
    assert stats.dropped == n - stats.pending

    broker.start()
    assert sub.synced()  # telemetry is QoS 0: the broker keeps none for an absent subscriber
    with Agent(config.with_overrides(outbox={"drain_timeout_s": 20.0}), source=ArraySource(x[:0])) as agent:
        drained = agent.run()  # until the collector (the acker) has acknowledged every sample
        telemetry = agent.telemetry()
    assert (drained.published, drained.pending) == (stats.pending, 0)
    assert telemetry["outbox"]["dropped"] == stats.dropped  # reported, and it survived the restart
    assert sub.wait(lambda s: len(s.samples()) >= stats.pending, 10)
    got = sorted(m["seq"] for m in sub.samples())
    assert got == list(range(n - stats.pending, n)), "the oldest must go first, the newest must all arrive"
    reported = [m["outbox"]["dropped"] for m in sub.messages("telemetry")]
    assert reported and reported[-1] == stats.dropped
