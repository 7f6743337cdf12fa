"""The sample store, on SQLite and on the local PostgreSQL: one suite, both backends."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from collecting import sample, store, store_url, telemetry  # noqa: F401  (fixtures)
from device_agent.delivery import protocol
from edgekit.errors import StoreError
from edgekit.loop.store import open_store


def test_a_sample_is_stored_once_and_reads_back_as_sent(store):
    raw = np.arange(64, dtype=np.uint8).reshape(8, 8, 1)
    p = sample(7, raw=raw, confidence=0.31)
    assert store.put_sample(p, "t") is True
    assert store.put_sample(p, "t") is False
    assert store.count_samples() == 1
    r = store.get_sample(p["sample_id"])
    assert (r.device, r.fleet, r.seq, r.model_version, r.label_pred) == ("pi-1", "lab", 7, "1.0.0", "3")
    assert r.confidence == pytest.approx(0.31)
    assert r.reasons == ("low_confidence",)
    assert r.source == {"file": "in-7.npy"}
    assert r.array().dtype == np.uint8 and np.array_equal(r.array(), raw)
    assert r.label is None


def test_filters_select_what_a_labeler_asks_for(store):
    rows = [
        sample(1, device="a", confidence=0.2),
        sample(2, device="a", confidence=0.6, reasons=["random"]),
        sample(3, device="b", confidence=0.4, version="2.0.0", reasons=["low_margin", "low_confidence"]),
    ]
    for p in rows:
        store.put_sample(p, "t")
    ids = lambda recs: [r.seq for r in recs]  # noqa: E731
    assert ids(store.list_samples(device="a")) == [1, 2]
    assert ids(store.list_samples(model_version="2.0.0")) == [3]
    assert ids(store.list_samples(reason="low_confidence")) == [1, 3]
    assert ids(store.list_samples(reason="random")) == [2]
    assert ids(store.list_samples(max_confidence=0.45)) == [1, 3]
    assert ids(store.list_samples(min_confidence=0.3, max_confidence=0.7)) == [2, 3]
    assert ids(store.list_samples(limit=2)) == [1, 2]
    store.set_label(rows[1]["sample_id"], "8", by="ann")
    assert ids(store.list_samples(labeled=True)) == [2]
    assert ids(store.list_samples(labeled=False)) == [1, 3]
    r = store.get_sample(rows[1]["sample_id"])
    assert (r.label, r.labeled_by) == ("8", "ann") and r.labeled_at is not None
    assert store.count_samples(labeled=True) == 1


def test_labeling_an_unknown_id_changes_nothing(store):
    p = sample(1)
    store.put_sample(p, "t")
    with pytest.raises(StoreError, match="not in the store"):
        store.set_labels({p["sample_id"]: "4", "00000000-0000-0000-0000-000000000000": "5"})
    assert store.get_sample(p["sample_id"]).label is None
    with pytest.raises(StoreError, match="not in the store"):
        store.get_sample("nope")


def test_telemetry_and_status_make_a_device_record(store):
    store.put_status(protocol.status_payload(device="pi-1", fleet="lab", state="online", model={"version": "1.0.0"}))
    store.put_telemetry(telemetry(inferences=10, ts=100.0))
    store.put_telemetry(telemetry(inferences=5, ts=50.0))  # arrives late: not the latest
    store.put_sample(sample(1), "t")
    (d,) = store.devices()
    assert (d.fleet, d.device, d.state, d.model_version, d.samples) == ("lab", "pi-1", "online", "1.0.0", 1)
    assert (d.inferences, d.outbox_depth, d.dropped, d.temperature_c) == (10, 3, 2, 51.5)
    assert store.count_telemetry() == 2
    # The last will is composed at connect time, so it is older than "online" and still wins.
    store.put_status(protocol.status_payload(device="pi-1", fleet="lab", state="offline", ts=1.0))
    assert store.devices()[0].state == "offline"


def test_quarantine_keeps_the_payload_and_why(store):
    store.quarantine("edgekit/v1/lab/pi-1/samples", b"\x00\xffnot json", "not_json", "payload is not UTF-8 JSON")
    store.quarantine("edgekit/v1/lab/pi-1/samples", b"x" * 200_000, "oversized", "too big")
    q = store.quarantined()
    assert [x["reason"] for x in q] == ["not_json", "oversized"]
    assert q[0]["payload"] == b"\x00\xffnot json"
    assert q[1]["size"] == 200_000 and len(q[1]["payload"]) == 64 * 1024
    assert store.quarantine_counts() == {"not_json": 1, "oversized": 1}


def test_a_store_that_cannot_open_says_why(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        open_store(f"sqlite:///{tmp_path}/missing/dir/s.db")
    with pytest.raises(StoreError, match="unknown scheme"):
        open_store("mysql://host/db")
    with pytest.raises(StoreError, match="cannot open PostgreSQL store"):
        open_store("postgresql://postgres@127.0.0.1:1/test")
    with pytest.raises(StoreError, match="schema="):
        open_store("postgresql://postgres@127.0.0.1:5432/test?schema=Bad;Name")


def test_a_plain_path_is_a_sqlite_store(tmp_path):
    with open_store(str(tmp_path / "plain.db")) as s:
        s.put_sample(sample(1), "t")
    with open_store(f"sqlite:///{tmp_path}/plain.db") as s:
        assert s.count_samples() == 1
    with pytest.raises(StoreError, match="closed"):
        s.count_samples()


def test_a_batch_insert_says_which_samples_were_new(store):
    a, b, c = sample(1), sample(2), sample(3)
    assert store.put_sample(a, "t") is True
    assert store.put_samples([a, b, b, c]) == [False, True, False, True]
    assert store.put_samples([]) == []
    assert store.count_samples() == 3
    assert [d.samples for d in store.devices()] == [3]


def test_a_batch_over_one_statement_reads_back_exactly(store):
    """More rows than one INSERT takes (200), float inputs, a repeat inside the batch: every stored
    sample reads back as sent, from the wire's base64 and from bytes decoded by the collector alike."""
    rng = np.random.default_rng(7)
    sent = [sample(i, device=f"pi-{i % 3}", confidence=float(rng.random()),
                   raw=rng.standard_normal((2, 3)).astype(np.float32)) for i in range(260)]
    decoded = [dict(p, input=dict(p["input"], data=base64.b64decode(p["input"]["data"]))) for p in sent[130:]]
    assert store.put_samples(sent[:130] + decoded + [sent[5]]) == [True] * 260 + [False]
    assert store.count_samples() == 260
    for p in (sent[0], sent[199], sent[200], sent[259]):
        got = store.get_sample(p["sample_id"])
        assert got.input_data == base64.b64decode(p["input"]["data"])
        assert (got.input_dtype, got.input_shape, got.seq) == ("float32", (2, 3), p["seq"])
        assert got.confidence == p["prediction"]["confidence"] and got.device == p["device"]


def test_a_batch_updates_each_of_its_devices_once_with_its_last_model(store):
    store.put_status(protocol.status_payload(device="pi-2", fleet="lab", state="online", model={"version": "0.9.0"}))
    (before,) = store.devices()
    with store.batch():
        store.put_samples([sample(1, device="pi-1"), sample(2, device="pi-2", version="1.1.0")])
        store.put_samples([sample(3, device="pi-3"), sample(4, device="pi-1", version="2.0.0")])
    devices = {d.device: d for d in store.devices()}
    assert {k: (d.model_version, d.samples, d.state) for k, d in devices.items()} == {
        "pi-1": ("2.0.0", 2, None), "pi-2": ("1.1.0", 1, "online"), "pi-3": ("1.0.0", 1, None)}
    assert all(d.last_seen >= before.last_seen for d in devices.values())


def test_a_value_no_column_holds_is_a_store_error_and_stores_nothing(store):
    """A 400-digit ts or seq (JSON numbers the schema lets through; the collector refuses them before) is a
    StoreError naming the sample or board, never an OverflowError, and leaves nothing half-written."""
    huge = 10**400
    for field in ("ts", "seq"):
        p = sample(1)
        p[field] = huge
        with pytest.raises(StoreError, match=p["sample_id"] if field == "ts" else "store"):
            store.put_samples([sample(2), p])
    with pytest.raises(StoreError, match="lab/pi-1 has a ts no float column holds"):
        store.put_telemetry(telemetry(ts=huge))
    with pytest.raises(StoreError, match="lab/pi-1 has a ts no float column holds"):
        store.put_status(protocol.status_payload(device="pi-1", fleet="lab", state="online", ts=huge))
    assert (store.count_samples(), store.count_telemetry(), store.devices()) == (0, 0, [])
    store.put_sample(sample(3), "t")  # the store still works
    assert store.count_samples() == 1
