"""Bookkeeping in blocks: flagged samples committed one transaction per block, result lines written in blocks.

What stays true: every result line is on disk after a normal stop and after SIGTERM; a result line that
names a sample is never on disk before its sample is in the outbox (so after ``kill -9`` too); a block
keeps the byte cap, dedupe and sequence numbers of one-by-one writes; the fast paths give the same numbers.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np

from conftest import BUNDLE, ROOT, wait_for
from device_agent.agent import Agent
from device_agent.delivery.outbox import Outbox
from device_agent.inference.classify import classify, classify_table
from device_agent.inference.interpreter import dequantize
from device_agent.sampling.drift import DriftMonitor
from device_agent.sources import ArraySource
from device_agent.update.manifest import TensorSpec


def _lines(path: Path) -> list:
    # Only whole lines: the agent may be appending while this reads.
    return [json.loads(line) for line in path.read_text().split("\n")[:-1]] if path.exists() else []


def _outbox_ids(path: Path) -> set:
    with sqlite3.connect(path) as db:
        return {r[0] for r in db.execute("SELECT sample_id FROM samples")}


def test_a_normal_stop_leaves_every_line_and_every_flagged_sample_on_disk(make_config, digits, tmp_path):
    x, _ = digits
    config = make_config(policy={"random_fraction": 0.3, "seed": 1, "dedupe": False},
                         outbox={"batch": 8, "batch_wait_s": 10.0})
    with Agent(config, source=ArraySource(x)) as agent:
        stats = agent.run()
    lines = _lines(tmp_path / "results.jsonl")
    assert [line["seq"] for line in lines] == list(range(len(x)))
    flagged = {line["sample_id"] for line in lines if line["flagged"]}
    assert len(flagged) == stats.flagged > 8  # more than one block, the last one partial
    assert _outbox_ids(tmp_path / "outbox.sqlite") == flagged  # no broker: all of them wait
    with Outbox(tmp_path / "outbox.sqlite") as box:
        seqs = sorted(json.loads(r.payload)["seq"] for r in box.pending(limit=1000))
    assert seqs == list(range(len(flagged)))


def _write_config(tmp_path: Path, runtime: str) -> Path:
    (tmp_path / "inbox").mkdir()
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"""
[device]
id = "blocks"
fleet = "test"
[bundle]
path = "{BUNDLE}"
[runtime]
name = "{runtime}"
[source]
kind = "folder"
path = "{tmp_path / 'inbox'}"
watch = true
poll_interval_s = 0.1
[policy]
random_fraction = 0.5
dedupe = false
[mqtt]
broker = ""
[outbox]
path = "{tmp_path / 'outbox.sqlite'}"
batch_wait_s = 30.0
[results]
path = "{tmp_path / 'results.jsonl'}"
""")
    return cfg


def _start(cfg: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "device_agent", "run", "--config", str(cfg)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=open(log, "ab"))


def test_sigterm_writes_every_line_and_commits_every_sample_it_names(tmp_path, digits, expected_runtime):
    x, _ = digits
    cfg = _write_config(tmp_path, expected_runtime)
    for i in range(40):
        np.save(tmp_path / "inbox" / f"d-{i:03d}.npy", x[i])
    agent = _start(cfg, tmp_path / "agent.log")
    try:
        # batch_wait_s = 30: only the result flush (every 0.5 s) commits the samples its lines name
        assert wait_for(lambda: len(_lines(tmp_path / "results.jsonl")) >= 40, 60), \
            (tmp_path / "agent.log").read_text()[-2000:]
        lines = _lines(tmp_path / "results.jsonl")
        assert {line["sample_id"] for line in lines if line["flagged"]} <= _outbox_ids(tmp_path / "outbox.sqlite")
    finally:
        agent.send_signal(signal.SIGTERM)
        rc = agent.wait(30)
    assert rc == 0, (tmp_path / "agent.log").read_text()[-2000:]
    lines = _lines(tmp_path / "results.jsonl")
    assert sorted(Path(line["source"]["uri"]).name for line in lines) == [f"d-{i:03d}.npy" for i in range(40)]
    named = {line["sample_id"] for line in lines if line["flagged"]}
    assert named and _outbox_ids(tmp_path / "outbox.sqlite") == named


def test_after_kill_9_every_sample_a_line_names_is_in_the_outbox(tmp_path, digits, expected_runtime):
    x, _ = digits
    cfg = _write_config(tmp_path, expected_runtime)
    for i in range(200):
        np.save(tmp_path / "inbox" / f"d-{i:03d}.npy", x[i])
    agent = _start(cfg, tmp_path / "agent.log")
    assert wait_for(lambda: len(_lines(tmp_path / "results.jsonl")) >= 20, 60), \
        (tmp_path / "agent.log").read_text()[-2000:]
    agent.send_signal(signal.SIGKILL)
    agent.wait(10)
    text = (tmp_path / "results.jsonl").read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.endswith("}")]  # a torn last line is possible
    named = {line["sample_id"] for line in lines if line["flagged"]}
    assert named and named <= _outbox_ids(tmp_path / "outbox.sqlite")


def test_a_block_keeps_the_byte_cap_dedupe_and_sequence_of_single_puts(tmp_path):
    payload = b"x" * 1000
    with Outbox(tmp_path / "o.sqlite", max_bytes=4500, batch=100, batch_wait_s=60) as box:
        for i in range(7):
            box.add("t", payload, f"id{i}", digest=f"d{i}", seq=box.next_seq())
        assert box.gathered == 7 and box.depth == 0 and box.seen("d3")  # in memory, yet a duplicate already
        assert len(box.commit()) == 3  # the cap applies sample by sample: the block's own oldest made room
        assert [r.sample_id for r in box.pending()] == ["id3", "id4", "id5", "id6"]
        assert box.dropped == 3 and box.depth == 4 and box.bytes == 4000
        assert box.seen("d0") and box.seen("d6") and not box.seen("d7")
        box.add("t", payload, "id7", seq=box.next_seq())  # left gathered: close() commits it
    with Outbox(tmp_path / "o.sqlite", max_bytes=4500) as box:
        assert [r.sample_id for r in box.pending()] == ["id4", "id5", "id6", "id7"]
        assert box.dropped == 4 and box.next_seq() == 8


def test_a_full_block_commits_by_itself(tmp_path):
    with Outbox(tmp_path / "o.sqlite", batch=3, batch_wait_s=60) as box:
        for i in range(7):
            box.add("t", b"p", f"id{i}", seq=box.next_seq())
        assert box.depth == 6 and box.gathered == 1 and not box.commit_due()


def test_the_score_table_gives_exactly_what_dequantize_then_classify_gives():
    rng = np.random.default_rng(0)
    labels = [str(i) for i in range(10)]
    for dtype, scale, zp in (("int8", 1 / 256, -128), ("uint8", 1 / 255, 0), ("int8", 0.13, 5)):
        spec = TensorSpec(name="out", shape=(1, 10), dtype=dtype, scale=scale, zero_point=zp)
        codes = np.arange(256, dtype=np.uint8).view(dtype)
        table = dequantize(codes, spec).astype(np.float64).tolist()
        info = np.iinfo(dtype)
        for activation in ("softmax", "logits"):
            for _ in range(300):
                q = rng.integers(info.min, info.max + 1, size=(1, 10)).astype(dtype)
                want = classify(dequantize(q, spec).reshape(-1), labels, activation)
                assert classify_table(q, table, labels, activation) == want


def test_drift_updates_in_blocks_give_the_snapshot_of_item_by_item_updates():
    ref = {"input": {"mean": [0.5, 0.2], "std": [0.1, 0.1]},
           "confidence": {"mean": 0.8, "histogram": {"edges": [0, 0.5, 0.8, 0.9, 1.0], "counts": [10, 20, 30, 40]}}}
    rng = np.random.default_rng(3)
    means, confs = rng.uniform(0, 1, size=(700, 2)), rng.uniform(0, 1, size=700)
    mon = DriftMonitor(ref, window=300)
    for n in (1, 299, 301, 700):
        mon.reset()
        for m, c in zip(means[:n].tolist(), confs[:n].tolist()):
            mon.update(m, c)
        snap = mon.snapshot()
        last = slice(max(0, n - 300), n)
        assert snap.samples == min(n, 300)
        assert snap.confidence_mean == round(float(confs[last].mean()), 6)
        z = (means[last].mean(axis=0) - np.array([0.5, 0.2])) / 0.1
        assert snap.input_z == tuple(round(float(v), 4) for v in z)
        assert snap.confidence_psi is not None


def test_sample_message_is_byte_for_byte_the_json_of_sample_payload():
    from device_agent.delivery import protocol

    dumps = json.JSONEncoder(separators=(",", ":")).encode
    rng = np.random.default_rng(5)
    fields = dict(device="d", fleet="f", seq=7, model={"name": "m", "version": "1", "sha256": "ab"},
                  prediction={"label": "é\u0000\"x", "confidence": 0.5}, reasons=("random",), sample_id="s",
                  ts=1.5, source={"uri": "a\\b\"c", "index": 3, "id": None})
    for raw in (rng.integers(0, 256, (96, 96, 3), dtype=np.uint8), rng.normal(size=(8, 8)).astype(np.float32),
                rng.normal(size=5), np.zeros((0,), np.uint8), np.asfortranarray(rng.normal(size=(4, 3)))):
        want = dumps(protocol.sample_payload(raw=raw, **fields)).encode()
        assert protocol.sample_message(raw=raw, **fields) == want


def test_result_lines_go_out_in_blocks_the_first_at_once_after_their_samples(tmp_path):
    from device_agent.results import ResultsWriter

    committed = []
    path = tmp_path / "r.jsonl"
    with ResultsWriter(str(path), flush_every_s=60.0, before_flush=lambda: committed.append(len(_lines(path)))) as w:
        w.write({"seq": 0})
        w.tick()
        assert _lines(path) == [{"seq": 0}] and committed == [0]  # the first line at once, the outbox first
        w.write({"seq": 1})
        w.write({"seq": 2, "x": float("nan")})
        w.tick()
        assert len(_lines(path)) == 1  # the block waits for flush_every_s ...
    assert path.read_text().splitlines()[1:] == ['{"seq":1}', '{"seq":2,"x":NaN}']  # ... or the close
    assert committed == [0, 1]


def test_kept_predictions_give_every_line_what_the_general_path_gives(make_config, digits, monkeypatch):
    """A prediction is computed once per distinct 8-bit output and kept: every result line still carries what
    dequantize + classify give for that input's output, through a kept entry or a new one, and the number
    kept stays within its bound."""
    import device_agent.inference.fastpath as fastpath

    monkeypatch.setattr(fastpath, "_MEMO_MAX", 7)  # far fewer than the digits' distinct outputs: it fills and empties
    x, _ = digits
    xs = np.concatenate([x, x[::-1]])  # every output seen at least twice
    config = make_config(policy={"random_fraction": 0.0, "dedupe": False})
    with Agent(config, source=ArraySource(xs)) as agent:
        model, m = agent.model, agent.manifest
        assert agent._scores is not None  # the digits model's int8 output: the table path is the one under test
        sizes = set()
        for i, raw in enumerate(xs):
            line = agent.step({"uri": "t", "index": i}, raw)
            want = classify(dequantize(model.raw_output(), model.output_spec).reshape(-1), m.labels,
                            m.output_activation)
            assert (line["label"], line["confidence"], line["margin"], line["entropy"]) == (
                want.label, round(want.confidence, 6), round(want.margin, 6), round(want.entropy, 6) + 0.0), i
            assert line["flagged"] == (want.confidence < agent.policy.confidence_threshold
                                       or want.margin < agent.policy.margin_threshold)
            sizes.add(len(agent._memo))
    assert max(sizes) <= 7 and len(sizes) > 3  # bounded, and it did fill and empty


def test_every_lookup_kind_gives_the_general_paths_prediction_in_any_memory_layout(make_config, digits):
    """The 8-bit fast path has four forms (nothing to do, a bit flip, bytes.translate, np.take), picked per bundle
    by what its table is; each must give what preprocess + the float input give, whatever the picture's memory
    layout (C order, Fortran order, a strided view). The digits bundle's table allows all but "identity"."""
    from device_agent.inference.preprocess import preprocess

    x, _ = digits
    layouts = {
        "C": lambda a: np.ascontiguousarray(a),
        "F": lambda a: np.asfortranarray(a),
        "strided": lambda a: np.repeat(np.repeat(a, 2, axis=0), 2, axis=1)[::2, ::2],
    }
    config = make_config(policy={"random_fraction": 0.0, "dedupe": False})
    with Agent(config, source=ArraySource(x[:1])) as agent:
        model, m = agent.model, agent.manifest
        want = [classify(model(preprocess(raw, m.preprocessing)), m.labels, m.output_activation) for raw in x[:60]]
        agent._lut_bytes = agent._lut.view(np.uint8).tobytes()
        for kind in ("xor", "translate", "take"):
            agent._lut_kind = kind
            for name, layout in layouts.items():
                for i, raw in enumerate(x[:60]):
                    line = agent.step({"uri": kind, "index": i}, layout(raw))
                    assert (line["label"], line["confidence"]) == (want[i].label, round(want[i].confidence, 6)), \
                        (kind, name, i)
