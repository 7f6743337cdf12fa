"""A broker whose ACL refuses the board's samples: the agent counts each refusal, keeps the samples and does
not spin re-sending them; once the ACL is fixed they all go out. A broker that refuses the board's ack
subscription: the board subscribes again until the broker takes it."""

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



def nats_auth(board_reads_acks: bool) -> str:
    """NATS users: the board (by name and password) may not subscribe to its ack topic unless allowed; any
    client without credentials (the collector's stand-in) is the unrestricted user ``collector``. The board
    keeps publish permissions either way: nats-server 2.9 crashes on a reload when a user who stored a
    retained message (the board's status) has none (fixed upstream, nats-io/nats-server#7596)."""
    subscribe = '{allow: [">"]}' if board_reads_acks else '{deny: ["edgekit.v1.test.dev1.ack"]}'
    board = '{user: board, password: board-pw, permissions: {publish: {allow: [">"]}, subscribe: %s}}' % subscribe
    return f"no_auth_user: collector\nauthorization {{ users = [ {board}, {{user: collector}} ] }}\n"


def test_a_refused_ack_subscription_is_tried_again_on_the_same_connection_until_the_broker_takes_it(
        tmp_path, make_config, digits, caplog):
    """A broker may answer a SUBSCRIBE with a failure code and keep the connection: NATS does when a user
    may not read the topic, and when it cannot create the subscription's JetStream consumer in time (as a
    cluster that lost a node elects new leaders: tests/edgekit/test_delivery.py). A board without its ack
    subscription resends its samples for ever and never empties its outbox; so it subscribes again, with
    backoff, on the same connection, until the broker takes it, and then resends at once what waits for
    an ack (the acks sent meanwhile reached nobody)."""
    from nats_broker import NatsServer  # tests/nats_broker.py
    from test_acks import ThenIdle, flagged_ids
    from test_agent_mqtt import FLAG_ALL
    from test_update import Running

    from conftest import wait_for

    broker = NatsServer(tmp_path / "nats", extra_conf=nats_auth(board_reads_acks=False)).start()
    acker = Acker(broker.mqtt_port, topic="edgekit/v1/test/dev1/samples").start()
    try:
        assert acker.subscribed.wait(30)
        x, _ = digits
        n = 20
        config = make_config(broker.url, policy=FLAG_ALL, mqtt={"protocol": "3.1.1", "username": "board",
                                                                "password": "board-pw", "ack_timeout_s": 0.5})
        with caplog.at_level(logging.INFO, logger="device_agent.delivery.mqtt"):
            run = Running(config, ThenIdle(x[:n]))
            agent = run.agent
            try:
                # every line written: every sample committed (lines go out after their block's commit)
                assert wait_for(lambda: len(ids := flagged_ids(tmp_path / "results.jsonl")) == n
                                and set(ids) <= set(acker.acked), 60), "the collector did not get every sample"
                refused = [r.getMessage() for r in caplog.records if "refused the subscription" in r.getMessage()]
                assert len(refused) == 1 and "edgekit/v1/test/dev1/ack" in refused[0], refused
                assert agent.outbox.depth == n  # all stored by the collector, but no ack reached the board
                generation = agent.link.generation
                broker.reconfigure(nats_auth(board_reads_acks=True))  # the operator fixes it; connections stay
                assert wait_for(lambda: agent.outbox.depth == 0, 60), agent.outbox.depth
                assert agent.link.generation == generation, "the board reconnected instead of subscribing again"
                assert agent.link.resubscribed == 1
                assert any("took the subscription to edgekit/v1/test/dev1/ack" in r.getMessage()
                           for r in caplog.records)
            finally:
                stats = run.finish()
    finally:
        acker.stop()
        broker.stop()
    assert (stats.flagged, stats.published, stats.pending, stats.dropped) == (n, n, 0, 0)
    assert "Subscription Violation" in broker.log
