"""A broker whose ACL refuses the board's samples: the agent counts each refusal, keeps the samples and does
not spin re-sending them; once the ACL is fixed they all go out."""

from __future__ import annotations

import logging

from device_agent.agent import Agent
from device_agent.sources import ArraySource

from broker import Mosquitto  # tests/broker.py, on the path through tests/conftest.py
from conftest import Acker

ACL_WITHOUT_SAMPLES = """\
topic write edgekit/v1/test/dev1/status
topic write edgekit/v1/test/dev1/telemetry
topic read edgekit/v1/test/dev1/cmd
topic read edgekit/v1/test/dev1/bundle
"""


def test_refused_samples_are_counted_kept_and_sent_once_the_acl_allows_them(tmp_path, make_config, digits, caplog):
    acl = tmp_path / "acl.conf"
    acl.write_text(ACL_WITHOUT_SAMPLES)
    broker = Mosquitto(tmp_path / "broker", extra_conf=f"acl_file {acl}\n").start()
    try:
        x, _ = digits
        config = make_config(broker.url, policy={"random_fraction": 1.0, "dedupe": False},
                             outbox={"drain_timeout_s": 1.5})
        with caplog.at_level(logging.ERROR, logger="device_agent.delivery.outbox"):
            with Agent(config, source=ArraySource(x[:10])) as agent:
                stats = agent.run()
                telemetry = agent.telemetry()
        # MQTT 5: Mosquitto answers each with PUBACK "Not authorized". Each sample was offered once on this
        # connection (no loop), counted, and kept in the outbox.
        assert (stats.flagged, stats.published, stats.rejected, stats.pending) == (10, 0, 10, 0 + 10)
        assert telemetry["rejected"] == 10
        said = [r for r in caplog.records if "refuses the samples of this board" in r.getMessage()]
        assert len(said) == 1 and "[device].id" in said[0].getMessage()

        # The operator fixes the ACL and restarts the broker: the kept samples go out on the next start, and
        # leave the outbox when the collector (its stand-in here, allowed to read them and write the board's
        # ack topic) acknowledges them.
        acl.write_text(ACL_WITHOUT_SAMPLES + "topic readwrite edgekit/v1/test/dev1/samples\n"
                                             "topic readwrite edgekit/v1/test/dev1/ack\n")
        broker.stop()
        broker.start()
        acker = Acker(broker.port, topic="edgekit/v1/test/dev1/samples").start()
        assert acker.subscribed.wait(10)
        with Agent(config.with_overrides(outbox={"drain_timeout_s": 20.0}), source=ArraySource(x[:0])) as agent:
            stats = agent.run()
        acker.stop()
        assert (stats.published, stats.rejected, stats.pending) == (10, 0, 0)
    finally:
        broker.stop()
