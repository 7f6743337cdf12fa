"""edgekit retrain: a new version whose report compares it with the old one, and clear errors.

Uses the session fixtures of conftest.py (the trained digits CNN and its PTQ
bundle, version "1") and a real SQLite store filled through edgekit.loop.store.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from device_agent.delivery import protocol
from device_agent.update.manifest import load_bundle
from edgekit.loop.retrain import Feedback, Verdict, bump_version, judge, retrain, split_feedback
from edgekit.shift import DEFAULT_SHIFT, apply_shift
from edgekit.loop.store import open_store


def _fill_store(path, x_raw, labels, model_ref, start=0):
    """Samples as the collector stores them, labeled by a person (here: from the ground truth)."""
    url = f"sqlite:///{path}"
    with open_store(url) as store:
        mapping = {}
        for i, (raw, label) in enumerate(zip(x_raw, labels)):
            sid = f"s-{start + i:05d}"
            payload = protocol.sample_payload(
                device="dev-1", fleet="test", seq=start + i, model=model_ref, sample_id=sid,
                prediction={"label": "0", "index": 0, "confidence": 0.3, "margin": 0.05, "entropy": 1.5, "top_k": []},
                reasons=["low_confidence"], raw=np.asarray(raw, dtype=np.uint8), source={"uri": "test", "index": i},
            )
            store.put_sample(payload)
            if label is not None:
                mapping[sid] = label
        if mapping:
            store.set_labels(mapping, by="test")
    return url


@pytest.fixture(scope="module")
def feedback_store(tmp_path_factory, digits, ptq_result):
    x = np.round(apply_shift(digits.x_test[:200], DEFAULT_SHIFT, seed=1))
    labels = [digits.labels[int(i)] for i in digits.y_test[:200]]
    return _fill_store(tmp_path_factory.mktemp("store") / "samples.db", x, labels, ptq_result.manifest.model_ref)


@pytest.fixture(scope="module")
def retrained(tmp_path_factory, ptq_result, float_model_path, feedback_store):
    out = tmp_path_factory.mktemp("retrain") / "v2"
    return retrain(ptq_result.bundle_path, float_model=float_model_path, data="digits", feedback=feedback_store,
                   output=out, epochs=5, qat_epochs=2, progress=False)


def test_retrain_writes_a_new_version_that_differs(retrained, ptq_result):
    old = ptq_result.manifest
    new = load_bundle(retrained.bundle_path).manifest  # sha256 checked
    assert (old.version, new.version, retrained.version) == ("1", "2", "2")
    assert new.sha256 != old.sha256
    assert new.quantization["mode"] == "qat"
    assert new.input.dtype == "int8" and new.labels == old.labels
    assert retrained.float_model_path.is_file()


def test_report_compares_with_the_old_version_and_says_whether_to_promote(retrained):
    md = (retrained.bundle_path / "retrain.md").read_text()
    doc = json.loads((retrained.bundle_path / "retrain.json").read_text())
    assert "version 1 -> 2" in md
    assert doc["verdict"] in ("promote", "do not promote")
    assert f"**Verdict: {doc['verdict']}.**" in md
    assert doc["promote"] == (doc["verdict"] == "promote") == retrained.verdict.promote
    for who in ("current", "new"):
        for part in ("test", "feedback", "combined"):
            assert 0.0 <= doc["accuracy"][who][part] <= 1.0
    assert doc["counts"]["feedback"] == 200
    assert doc["counts"]["feedback_train"] + doc["counts"]["feedback_holdout"] == 200
    assert set(doc["feedback_train_ids"]).isdisjoint(doc["feedback_holdout_ids"])
    # the shifted feedback is what the retrain was for: the new model must do better on its held-out part
    assert doc["accuracy"]["new"]["feedback"] > doc["accuracy"]["current"]["feedback"]
    # and the converter's own report used the old bundle as the baseline to beat
    rep = json.loads((retrained.bundle_path / "report" / "report.json").read_text())
    assert "v1" in json.dumps(rep["baseline"])


def test_the_retrained_float_model_starts_the_next_retrain(retrained, tmp_path):
    from edgekit.convert import load_model

    model = load_model(retrained.float_model_path)
    assert model.count_params() > 0
    assert bump_version(retrained.version) == "3"


def _run_cli(argv, capsys):
    from edgekit.cli import main

    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def test_unknown_label_is_one_clear_line_and_no_output(tmp_path, digits, ptq_result, float_model_path, capsys):
    url = _fill_store(tmp_path / "s.db", digits.x_test[:3], ["1", "seven", "2"], ptq_result.manifest.model_ref)
    out = tmp_path / "v2"
    code, err = _run_cli(["retrain", str(ptq_result.bundle_path), "--float-model", str(float_model_path),
                          "--data", "digits", "--feedback", url, "-o", str(out), "--no-progress"], capsys)
    assert code == 1
    assert len(err) == 1 and "'seven'" in err[0] and err[0].startswith("DataError:")
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "s.db"] or not out.exists()


@pytest.mark.parametrize("labeled", [False, True])
def test_empty_or_unlabeled_store_is_one_clear_line_and_no_output(tmp_path, digits, ptq_result, float_model_path,
                                                                  capsys, labeled):
    labels = [None, None] if not labeled else []
    url = _fill_store(tmp_path / "s.db", digits.x_test[: len(labels)], labels, ptq_result.manifest.model_ref)
    out = tmp_path / "v2"
    code, err = _run_cli(["retrain", str(ptq_result.bundle_path), "--float-model", str(float_model_path),
                          "--data", "digits", "--feedback", url, "-o", str(out), "--no-progress"], capsys)
    assert code == 1
    assert len(err) == 1 and "no labeled samples" in err[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left either


def test_a_float_model_that_does_not_fit_is_one_clear_line(tmp_path, digits, ptq_result, feedback_store, capsys):
    from edgekit.models import digits_cnn

    other = digits_cnn(num_classes=3, width=4)
    other.save(tmp_path / "three.keras")
    out = tmp_path / "v2"
    code, err = _run_cli(["retrain", str(ptq_result.bundle_path), "--float-model", str(tmp_path / "three.keras"),
                          "--data", "digits", "--feedback", feedback_store, "-o", str(out), "--no-progress"], capsys)
    assert code == 1 and len(err) == 1 and "3" in err[0] and "10" in err[0]
    assert not out.exists()


def test_bump_version():
    assert bump_version("1") == "2"
    assert bump_version("1.3") == "1.4"
    assert bump_version("v9") == "v10"
    assert bump_version("2.0-rc1") == "2.0-rc2"
    from edgekit.errors import DataError

    with pytest.raises(DataError, match="--version"):
        bump_version("latest")


def test_feedback_split_is_deterministic_and_stable_as_feedback_grows():
    ids = tuple(f"id-{i}" for i in range(200))
    fb = Feedback(np.zeros((200, 8, 8, 1), np.float32), np.zeros(200, np.int64), ids)
    train, held = split_feedback(fb, 0.3)
    train2, held2 = split_feedback(fb, 0.3)
    assert held.ids == held2.ids and train.ids == train2.ids
    assert 40 <= len(held) <= 80 and set(train.ids) | set(held.ids) == set(ids)
    more = Feedback(np.zeros((300, 8, 8, 1), np.float32), np.zeros(300, np.int64), ids + tuple(f"new-{i}" for i in range(100)))
    _, held3 = split_feedback(more, 0.3)
    assert set(held.ids) <= set(held3.ids)  # held out once, held out for good
    tiny_train, tiny_held = split_feedback(fb.take(np.arange(200) < 2), 0.3)
    assert len(tiny_train) == 1 and len(tiny_held) == 1


def test_judge_promotes_only_a_better_model_that_keeps_the_original_accuracy():
    cur = {"test": 0.97, "feedback": 0.60, "combined": 0.9}
    assert judge(cur, {"test": 0.968, "feedback": 0.75, "combined": 0.92}).promote
    worse = judge(cur, {"test": 0.94, "feedback": 0.80, "combined": 0.92})
    assert not worse.promote and "lost 3.00 points" in worse.reason
    same = judge(cur, {"test": 0.97, "feedback": 0.60, "combined": 0.9})
    assert not same.promote and isinstance(same, Verdict) and same.word == "do not promote"


def test_fine_tune_keeps_frozen_layers_and_repeats_the_feedback(digits):
    from edgekit.models import digits_cnn
    from edgekit.loop.retrain import fine_tune

    model = digits_cnn(width=4)
    x, y = digits.model_inputs(digits.x_train[:200]), digits.y_train[:200]
    fx, fy = digits.model_inputs(digits.x_test[:10]), digits.y_test[:10]
    tuned, info = fine_tune(model, x, y, fx, fy, epochs=1, freeze=2, feedback_share=0.5)
    assert info["frozen_layers"] == ["conv1", "conv2"]
    assert info["feedback_repeats"] == 20 and info["examples_per_epoch"] == 400  # 10 x 20 = half of each epoch
    for before, after in zip(model.layers, tuned.layers):
        same = all(np.array_equal(a, b) for a, b in zip(before.get_weights(), after.get_weights()))
        assert same == (before.name in ("conv1", "conv2") or not before.get_weights()), before.name


def test_without_float_model_the_bundles_own_is_used_or_its_absence_named(tmp_path, digits, ptq_result, capsys):
    import shutil

    bare = tmp_path / "bare-v1"
    shutil.copytree(ptq_result.bundle_path, bare)
    (bare / "float_model.keras").unlink()
    url = _fill_store(tmp_path / "s.db", digits.x_test[:3], ["1", "7", "2"], ptq_result.manifest.model_ref)
    out = tmp_path / "v2"
    code, err = _run_cli(["retrain", str(bare), "--data", "digits", "--feedback", url, "-o", str(out),
                          "--no-progress"], capsys)
    assert code == 1 and len(err) == 1
    assert err[0].startswith("ModelError:") and "float_model.keras" in err[0] and "--float-model" in err[0]
    assert not out.exists()
    # convert keeps it, so the plain command finds it
    assert (ptq_result.bundle_path / "float_model.keras").is_file()
