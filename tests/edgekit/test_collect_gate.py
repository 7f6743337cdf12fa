"""The collector speaks for no board: exact topic identity, an allow-list and a per-device rate limit."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collecting import Publisher, sample, telemetry  # noqa: F401
from device_agent.delivery import protocol
from device_agent.delivery.schemas import NAME
from edgekit.errors import IdentityError
from edgekit.fleet.identity import init_ca
from edgekit.fleet.status import fleet_status
from edgekit.loop.collect import Collector
from edgekit.loop.gate import DeviceGate
from edgekit.loop.store import open_store
from edgekit.loop.validate import Malformed, check_message


def status(device: str, fleet: str = "lab", version: str = "1.0.0") -> dict:
    return protocol.status_payload(device=device, fleet=fleet, state="online",
                                   model={"name": "digits", "version": version, "sha256": "ab" * 32})


@pytest.mark.parametrize("topic_device, payload_device, reason", [
    ("pi-1", "pi-1", None),
    ("pi-1", "pi-2", "topic_mismatch"),
    ("pi-1", "PI-1", "topic_mismatch"),  # names are case-sensitive: exact, not "the same board"
    ("pi-1", "pi-1\n", "topic_mismatch"),
    ("pi-1\n", "pi-1\n", "bad_topic"),  # '$' in the name pattern lets a trailing newline through: a look-alike
    ("pi-1 ", "pi-1 ", "bad_topic"),
])
def test_the_topic_is_the_identity_and_the_payload_must_repeat_it_exactly(topic_device, payload_device, reason):
    payload = json.dumps(status(payload_device)).encode()
    topic = f"edgekit/v1/lab/{topic_device}/status"
    if reason is None:
        assert check_message(topic, payload)[1]["device"] == "pi-1"
    else:
        with pytest.raises(Malformed) as err:
            check_message(topic, payload)
        assert err.value.reason == reason
    other_fleet = json.dumps(status("pi-1", fleet="yard")).encode()
    with pytest.raises(Malformed, match="topic_mismatch"):
        check_message("edgekit/v1/lab/pi-1/status", other_fleet)


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_rate_limit_is_a_token_bucket_per_device():
    clock = Clock()
    gate = DeviceGate(rate_per_minute=60, burst=5, clock=clock)
    t1, t2 = protocol.topic("lab", "pi-1", "samples"), protocol.topic("lab", "pi-2", "samples")
    for _ in range(5):
        gate.admit(t1)
    with pytest.raises(Malformed) as err:
        gate.admit(t1)
    assert err.value.reason == "rate_limited" and "lab/pi-1" in err.value.detail
    gate.admit(t2)  # another device has its own bucket
    clock.t += 2.0  # 60/min = one a second
    gate.admit(t1)
    gate.admit(t1)
    with pytest.raises(Malformed):
        gate.admit(t1)


def test_allow_list_from_a_file_or_the_ca_follows_enrolment_while_running(tmp_path):
    f = tmp_path / "allow.txt"
    f.write_text("# boards of the lab\nlab/pi-1\npi-9   # any fleet\n")
    gate = DeviceGate(allow=f)
    assert gate.allowed("lab", "pi-1") and gate.allowed("yard", "pi-9")
    assert not gate.allowed("yard", "pi-1") and not gate.allowed("lab", "pi-2")
    f.write_text("lab/bad name\n")
    with pytest.raises(IdentityError, match="line 1"):
        DeviceGate(allow=f)

    clock = Clock()
    ca = init_ca(tmp_path / "ca")
    ca.enroll("pi-1", tmp_path / "ids" / "pi-1", fleet="lab")
    gate = DeviceGate(allow=tmp_path / "ca", clock=clock)
    assert gate.allowed("lab", "pi-1") and not gate.allowed("lab", "pi-2")
    ca.enroll("pi-2", tmp_path / "ids" / "pi-2", fleet="lab")
    ca.revoke("pi-1")
    clock.t += 5  # the list is re-read when it changed (checked every 2 s)
    assert gate.allowed("lab", "pi-2") and not gate.allowed("lab", "pi-1")


def test_fleet_status_is_not_fooled_by_devices_off_the_allow_list(broker, tmp_path):
    allow = tmp_path / "allow.txt"
    allow.write_text("lab/pi-1\n")
    with open_store(f"sqlite:///{tmp_path}/s.db") as store:
        gate = DeviceGate(allow=allow, rate_per_minute=0.001, burst=10)  # no refill during the test
        with Collector(broker.url, store, fleet="lab", client_id="gate-test", gate=gate) as collector:
            pub = Publisher(broker.port)
            for i in range(15):  # pi-1 floods: 10 pass (the burst), 5 are refused
                pub.publish(protocol.topic("lab", "pi-1", "samples"), sample(i))
            pub.publish(protocol.topic("lab", "pi-1", "status"), status("pi-1"))
            pub.publish(protocol.topic("lab", "pi-kitchen-1", "status"), status("pi-kitchen-1", version="999"),
                        retain=True)
            for i in range(50):  # invented names
                pub.publish(protocol.topic("lab", f"ghost-{i}", "samples"), sample(100 + i, device=f"ghost-{i}"))
            pub.close()
            assert collector.wait_handled(67, timeout=30), collector.stats.line()
            stats = collector.stats
        assert (stats.stored, stats.status) == (10, 0)
        assert stats.malformed == {"rate_limited": 6, "not_allowed": 51}
        assert store.quarantine_counts() == {"rate_limited": 6, "not_allowed": 51}
        assert [r["device"] for r in fleet_status(store)] == ["pi-1"]
        assert {s.device for s in store.list_samples()} == {"pi-1"}
    # cleanup of the retained forgery on this private broker is not needed: the broker goes with the test


NAMES = st.text(alphabet="ab1.-_ /\n+#\x00é", min_size=0, max_size=8) | st.sampled_from(["pi-1", "lab", "x" * 64, "x" * 65])


# Poison: a ts no float column holds (400 digits, 1e400 read as inf, NaN) and models nested past any limit.
TS = st.none() | st.floats() | st.integers() | st.sampled_from([10**400, -10**400, 2**1024, 2**1023])
NEST = st.just(0) | st.integers(1, 40) | st.sampled_from([999, 3000, 100_000])


def _finite(ts) -> bool:
    try:
        return math.isfinite(ts)
    except OverflowError:
        return False


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fleet=NAMES, device=NAMES, claimed=st.none() | NAMES, claimed_fleet=st.none() | NAMES, ts=TS, nest=NEST)
def test_fuzz_only_exact_names_on_topic_and_payload_pass(fleet, device, claimed, claimed_fleet, ts, nest):
    """Whatever the topic, the payload's names, its ts and how deep its model nests, a message passes only when
    both are the same valid names, its ts a finite number and its nesting within 32 levels; anything else is
    refused with a reason, never an exception of another kind."""
    payload = status(device if claimed is None else claimed, fleet=fleet if claimed_fleet is None else claimed_fleet)
    if ts is not None:
        payload["ts"] = ts
    data = json.dumps(payload)
    if nest:  # the status's model is any object: the schema sets no depth
        data = data.replace('"model": {', '"model": {"x": ' + "[" * nest + "]" * nest + ", ", 1)
    topic = f"edgekit/v1/{fleet}/{device}/status"
    gate = DeviceGate(rate_per_minute=1000)
    try:
        gate.admit(topic)
        _, obj = check_message(topic, data.encode())
    except Malformed as bad:
        assert bad.reason in {"bad_topic", "schema", "topic_mismatch", "rate_limited", "not_json"}
    else:
        assert NAME.fullmatch(fleet) and NAME.fullmatch(device)
        assert (obj["fleet"], obj["device"]) == (fleet, device) and claimed in (None, device)
        assert _finite(obj["ts"]) and nest <= 30  # 32 levels: the payload, its model, 30 lists


def test_a_batch_the_store_refused_once_is_not_rate_limited_on_its_retry(tmp_path):
    """The gate's decision on a message holds for its retries: a batch the database refused is stored again
    message by message, and that must not take the device's tokens a second (and third) time, turning the
    board's samples into rate-limited ones after a database hiccup."""
    from edgekit.loop.collect_write import _Msg

    gate = DeviceGate(rate_per_minute=0.001, burst=4, clock=Clock())  # 4 messages, no refill in the test
    msgs = [_Msg("edgekit/v1/lab/pi-1/samples", json.dumps(sample(i)).encode(), i + 1, 1, 1) for i in range(4)]
    with open_store(f"sqlite:///{tmp_path / 'samples.db'}") as store:
        real, calls = store.put_samples, []

        def put_once_refused(payloads):
            calls.append(len(payloads))
            if len(calls) == 1:
                raise RuntimeError("database is locked")  # a hiccup: the batch's transaction is rolled back
            return real(payloads)

        store.put_samples = put_once_refused
        collector = Collector("mqtt://127.0.0.1:1883", store, fleet="lab", gate=gate)  # never started: no acks
        collector._store_batch(msgs)
        assert calls[0] == 4 and len(calls) == 5  # the batch, then each message on its own
        assert store.count_samples() == 4 and store.quarantine_counts() == {}
        assert collector.stats.stored == 4 and collector.stats.malformed == {}
        with pytest.raises(Malformed, match="rate_limited"):  # the 4 tokens went to these 4 messages, once each
            gate.admit("edgekit/v1/lab/pi-1/samples")
