"""Labels with a memory, on SQLite and PostgreSQL: history, version checks, leases, and old stores migrated."""

from __future__ import annotations

import re
import sqlite3
import uuid

import pytest

from collecting import PG_BASE, sample, store, store_url  # noqa: F401  (fixtures)
from edgekit.errors import LabelConflictError, StoreError
from edgekit.loop.store import INVALID_LABEL, open_store


def test_a_changed_label_keeps_the_one_it_replaced(store):
    p = sample(1)
    store.put_sample(p, "t")
    sid = p["sample_id"]
    assert store.get_sample(sid).label_version == 0
    v1 = store.save_label(sid, "7", by="ann", expected_version=0)
    v2 = store.save_label(sid, "1", by="bob", expected_version=v1)
    r = store.get_sample(sid)
    assert (r.label, r.labeled_by, r.label_version) == ("1", "bob", v2) and v2 == 2
    events = store.label_history(sid)
    assert [(e.label, e.previous_label, e.labeled_by, e.action) for e in events] == [
        ("1", "7", "bob", "relabel"), ("7", None, "ann", "label")]
    assert events[0].labeled_at >= events[1].labeled_at


def test_a_second_save_of_a_changed_sample_is_refused_and_says_by_whom(store_url):
    with open_store(store_url) as a, open_store(store_url) as b:  # two labelers, two connections
        p = sample(1)
        a.put_sample(p, "t")
        sid = p["sample_id"]
        seen = b.get_sample(sid).label_version  # both opened the sample at version 0
        a.save_label(sid, "7", by="ann", expected_version=seen)
        with pytest.raises(LabelConflictError, match=r"labelled '7' by ann .* your label was not saved") as err:
            b.save_label(sid, "9", by="bob", expected_version=seen)
        assert err.value.current["label"] == "7" and err.value.current["label_version"] == 1
        assert a.get_sample(sid).label == "7"
        assert len(a.label_history(sid)) == 1


def test_undo_restores_the_previous_label_or_none(store):
    p = sample(1)
    store.put_sample(p, "t")
    sid = p["sample_id"]
    v1 = store.save_label(sid, "7", by="ann", expected_version=0)
    v2 = store.save_label(sid, "1", by="ann", expected_version=v1)
    assert store.undo_label(sid, by="ann", expected_version=v2) == ("7", 3)
    with pytest.raises(LabelConflictError):
        store.undo_label(sid, by="ann", expected_version=v1)
    restored, v4 = store.undo_label(sid, by="ann", expected_version=3)
    assert restored == "1" and store.get_sample(sid).label == "1"  # undoing the undo
    store.set_labels({sid: "2"}, by="csv")
    assert store.get_sample(sid).label_version == v4 + 1
    assert [e.action for e in store.label_history(sid)][:3] == ["relabel", "undo", "undo"]


def test_undo_of_a_first_label_puts_the_sample_back_in_the_queue(store):
    p = sample(1)
    store.put_sample(p, "t")
    sid = p["sample_id"]
    v = store.save_label(sid, INVALID_LABEL, by="ann", expected_version=0)
    assert sid not in store.unlabeled_ids()
    assert store.label_counts() == {INVALID_LABEL: 1}
    assert store.undo_label(sid, by="ann", expected_version=v) == (None, 2)
    r = store.get_sample(sid)
    assert (r.label, r.labeled_by, r.labeled_at) == (None, None, None)
    assert store.unlabeled_ids() == {sid}


def test_a_lease_gives_a_sample_to_one_labeler_until_it_expires(store_url):
    with open_store(store_url) as a, open_store(store_url) as b:
        p = sample(1)
        a.put_sample(p, "t")
        sid = p["sample_id"]
        assert a.claim_lease(sid, "ann", 300) is True
        assert b.claim_lease(sid, "bob", 300) is False
        assert a.claim_lease(sid, "ann", 300) is True  # renewing one's own
        assert b.leased_by_others("bob") == {sid: "ann"}
        a.release_leases("ann")
        assert b.claim_lease(sid, "bob", -1) is True  # an already-expired lease ...
        assert a.claim_lease(sid, "ann", 300) is True  # ... is free for the taking
        assert b.leased_by_others("bob") == {sid: "ann"}
        a.save_label(sid, "3", by="ann", expected_version=0)
        assert b.leased_by_others("bob") == {}  # saving ends the lease


def test_filters_count_and_list_what_is_left(store):
    a, b, c = sample(1, device="a"), sample(2, device="b"), sample(3, device="b", version="2.0.0")
    for p in (a, b, c):
        store.put_sample(p, "t")
    store.set_labels({b["sample_id"]: "4"}, by="x")
    assert store.unlabeled_ids(device="b") == {c["sample_id"]}
    assert store.label_counts(device="b") == {"4": 1, None: 1}
    assert store.label_counts(model_version="2.0.0") == {None: 1}
    assert store.unlabeled_ids(since=1e12) == set()
    assert [r.seq for r in store.list_samples(since=0.0)] == [1, 2, 3]
    with pytest.raises(StoreError, match="unknown sample filter"):
        store.unlabeled_ids(colour="red")
    store.set_labels({b["sample_id"]: "4"}, by="x")  # the same label again is no change
    assert len(store.label_history(b["sample_id"])) == 1


# The tables exactly as the previous edgekit release created them (no label_version, no history).
_OLD_SAMPLES = """
CREATE TABLE samples (
    sample_id TEXT PRIMARY KEY, device TEXT NOT NULL, fleet TEXT NOT NULL, seq {int} NOT NULL,
    ts {real} NOT NULL, received_at {real} NOT NULL, model_name TEXT, model_version TEXT, model_sha256 TEXT,
    label_pred TEXT, pred_index INTEGER, confidence {real}, margin {real}, entropy {real}, reasons TEXT,
    top_k TEXT, source TEXT, input_dtype TEXT NOT NULL, input_shape TEXT NOT NULL, input_data {blob} NOT NULL,
    label TEXT, labeled_by TEXT, labeled_at {real}
)"""
_OLD_ROW = ("INSERT INTO samples VALUES ('old-1', 'pi-1', 'lab', 1, 1.0, 1.0, 'digits', '1.0.0', '', '3', 3, 0.4, "
            "0.1, 1.5, '[\"low_confidence\"]', '[]', '{{}}', 'uint8', '[2, 2, 1]', {blob}, '5', 'old-cli', 2.0)")


def _check_migrated(url):
    with open_store(url) as s:
        r = s.get_sample("old-1")
        assert (r.label, r.labeled_by, r.label_version) == ("5", "old-cli", 0)
        v = s.save_label("old-1", "6", by="ann", expected_version=0)
        assert [(e.label, e.previous_label) for e in s.label_history("old-1")] == [("6", "5")]
    with open_store(url) as s:  # opening it again changes nothing
        assert s.get_sample("old-1").label_version == v


def test_a_sqlite_store_of_the_previous_version_is_migrated_in_place(tmp_path):
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute(_OLD_SAMPLES.format(int="INTEGER", real="REAL", blob="BLOB"))
    conn.execute(_OLD_ROW.format(blob="X'01020304'"))
    conn.commit()
    conn.close()
    _check_migrated(f"sqlite:///{path}")


def test_a_postgres_store_of_the_previous_version_is_migrated_in_place():
    import psycopg

    schema = f"ek_old_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_BASE) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
        conn.execute(f'SET search_path TO "{schema}"')
        conn.execute(_OLD_SAMPLES.format(int="BIGINT", real="DOUBLE PRECISION", blob="BYTEA"))
        conn.execute(_OLD_ROW.format(blob="'\\x01020304'::bytea"))
    url = f"{PG_BASE}?schema={schema}"
    try:
        _check_migrated(url)
    finally:
        with open_store(url) as s:
            s.drop()


def test_samples_show_prints_who_changed_the_label_and_from_what(tmp_path, capsys):
    from edgekit.cli import main

    url = f"sqlite:///{tmp_path}/s.db"
    with open_store(url) as s:
        p = sample(1)
        s.put_sample(p, "t")
    sid = p["sample_id"]
    assert main(["samples", "label", "--store", url, sid, "7", "--by", "ann"]) == 0
    assert main(["samples", "label", "--store", url, sid, "1", "--by", "bob"]) == 0
    capsys.readouterr()
    assert main(["samples", "show", "--store", url, sid]) == 0
    out = capsys.readouterr().out
    assert "label 1 by bob" in out
    assert re.search(r"bob: 1  \(was 7; relabel\)\n.*ann: 7  \(was \(none\); label\)", out)
