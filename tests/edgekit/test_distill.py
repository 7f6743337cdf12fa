"""Knowledge distillation on the real digits: the Hinton loss by hand, soft targets from either kind of teacher,
a distilled bundle whose report holds teacher, control and distilled student, and the bad inputs."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from device_agent.update.manifest import load_bundle
from edgekit.cli import main

RUNTIME = "ai_edge_litert"


def test_hinton_loss_matches_a_hand_computation():
    from edgekit.convert.distill import hinton_loss

    teacher = [2.0, 1.0, 0.0]
    student = [0.5, 0.2, 0.1]
    label, t, alpha = 1, 2.0, 0.3

    def softmax(z):
        e = [math.exp(v) for v in z]
        return [v / sum(e) for v in e]

    hard = -math.log(softmax(student)[label])
    pt = softmax([v / t for v in teacher])
    ps = softmax([v / t for v in student])
    kl = sum(p * math.log(p / q) for p, q in zip(pt, ps))
    expected = alpha * hard + (1 - alpha) * t * t * kl
    # the second row: a student that already matches the teacher owes nothing to the soft term
    got = hinton_loss(np.array([label, 0]), np.array([teacher, teacher], np.float32),
                      np.array([student, teacher], np.float32), temperature=t, alpha=alpha).numpy()
    assert got[0] == pytest.approx(expected, rel=1e-5)
    assert got[1] == pytest.approx(alpha * -math.log(softmax(teacher)[0]), rel=1e-5)
    # alpha=1 is plain cross-entropy on the labels
    only_hard = hinton_loss(np.array([label]), np.array([teacher], np.float32), np.array([student], np.float32),
                            temperature=t, alpha=1.0).numpy()
    assert only_hard[0] == pytest.approx(hard, rel=1e-5)


def test_keras_loss_reads_packed_targets_and_a_softmax_student():
    from edgekit.convert.distill import HintonLoss, hinton_loss

    teacher = np.array([[3.0, -1.0, 0.5]], np.float32)
    logits = np.array([[0.2, 0.1, -0.3]], np.float32)
    probs = np.exp(logits) / np.exp(logits).sum()
    packed = np.concatenate([[[2.0]], teacher], axis=1).astype(np.float32)
    want = float(hinton_loss(np.array([2]), teacher, logits, temperature=3.0, alpha=0.2).numpy()[0])
    assert float(HintonLoss(3.0, 0.2, "logits")(packed, logits)) == pytest.approx(want, rel=1e-5)
    assert float(HintonLoss(3.0, 0.2, "softmax")(packed, probs)) == pytest.approx(want, rel=1e-4)


def test_softmax_and_logits_teachers_give_the_same_soft_targets():
    from edgekit._keras import keras
    from edgekit.convert.distill import teacher_logits

    keras.utils.set_random_seed(0)
    inp = keras.Input((4,))
    logits_model = keras.Model(inp, keras.layers.Dense(3, name="d")(inp))
    softmax_model = keras.Model(inp, keras.layers.Softmax()(logits_model.output))
    x = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
    a = teacher_logits(logits_model, x, "logits")
    b = teacher_logits(softmax_model, x, "softmax")
    for t in (1.0, 4.0):
        sa = np.exp(a / t) / np.exp(a / t).sum(axis=1, keepdims=True)
        sb = np.exp(b / t) / np.exp(b / t).sum(axis=1, keepdims=True)
        np.testing.assert_allclose(sa, sb, atol=1e-5)


@pytest.mark.slow
def test_soft_targets_alone_teach_the_student(digits, float_model_path):
    """alpha=0: the student never sees a label, only the teacher's softened outputs, and still learns the digits."""
    from edgekit._keras import keras
    from edgekit.convert.distill import HintonLoss, build_student, teacher_logits
    from edgekit.convert.load import load_model

    teacher = load_model(float_model_path)
    student = build_student("tiny", digits)
    x = digits.model_inputs(digits.x_train)
    wrong = (digits.y_train + 1) % 10  # labels the loss must ignore at alpha=0
    packed = np.concatenate([wrong[:, None].astype(np.float32), teacher_logits(teacher, x, "softmax")], axis=1)
    keras.utils.set_random_seed(0)
    student.compile(optimizer=keras.optimizers.Adam(3e-3), loss=HintonLoss(2.0, 0.0, "softmax"))
    student.fit(x, packed, epochs=12, batch_size=32, verbose=0)
    pred = student.predict(digits.model_inputs(digits.x_test), verbose=0).argmax(axis=1)
    assert np.mean(pred == digits.y_test) > 0.85


@pytest.fixture(scope="session")
def distilled(tmp_path_factory, float_model_path):
    import contextlib
    import io

    from edgekit.fleet.keys import init_keys

    work = tmp_path_factory.mktemp("distill")
    out = work / "tiny"
    keys = init_keys(work / "keys")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["distill", str(float_model_path), "--student", "tiny", "--data", "digits", "--mode", "ptq",
                   "--epochs", "12", "-o", str(out), "--runtime", RUNTIME, "--no-progress", "--sign-key", str(keys.private)])
    assert rc == 0
    return out, buf.getvalue(), keys


@pytest.mark.slow
def test_distilled_bundle_is_a_convert_bundle(distilled, ptq_result):
    from edgekit.fleet.keys import load_signing_key, verify_bundle

    out, stdout, keys = distilled
    bundle = load_bundle(out)  # sha256 checked, as a board checks it
    m = bundle.manifest
    assert m.input.dtype == "int8" and m.output.dtype == "int8"
    assert m.quantization["mode"] == "ptq"
    # the same manifest fields convert fills in
    ref = ptq_result.manifest
    assert set(m.metrics) == set(ref.metrics)
    assert m.reference.keys() == ref.reference.keys()
    assert 0 < m.confidence_threshold < 1
    assert (out / "float_model.keras").is_file()
    for f in ("report.md", "report.json", "confusion.png"):
        assert (out / "report" / f).is_file()
    # signed like convert signs (--sign-key): the key's first release
    assert "signed: release 1 with key" in stdout
    assert verify_bundle(out, [load_signing_key(keys.private)]).release == 1


@pytest.mark.slow
def test_report_puts_the_three_arms_side_by_side(distilled):
    out, stdout, _ = distilled
    report = json.loads((out / "report" / "report.json").read_text())
    d = report["distillation"]
    arms = {(a["role"], a["precision"]): a for a in d["arms"]}
    assert set(arms) == {("teacher", "float"), ("control", "float"), ("distilled", "float"), ("distilled", "int8")}
    for a in arms.values():
        assert 0 <= a["accuracy"] <= 1 and 0 <= a["macro_f1"] <= 1
        assert a["tflite_bytes"] > 0
        assert set(a["latency_ms"]) == {RUNTIME} and a["latency_ms"][RUNTIME] > 0
    teacher, control = arms[("teacher", "float")], arms[("control", "float")]
    student, bundle = arms[("distilled", "float")], arms[("distilled", "int8")]
    # the int8 arm is this bundle, measured as convert measures it
    assert bundle["accuracy"] == pytest.approx(report["int8"]["accuracy"])
    assert bundle["download_bytes"] > 0 and bundle["tflite_bytes"] == (out / "model.tflite").stat().st_size
    assert student["params"] == control["params"] == bundle["params"] <= teacher["params"] / 4
    assert student["accuracy"] > 0.85 and bundle["accuracy"] > 0.85  # the student learned the digits
    # the verdict follows the numbers, in the JSON, the Markdown and the CLI summary
    beats = student["accuracy"] > control["accuracy"]
    assert d["beats_control"] is beats
    md = (out / "report" / "report.md").read_text()
    assert "## Distillation" in md
    assert ("Distillation **beats** the student trained alone" in md) is beats
    assert ("Distillation does **NOT** beat the student trained alone" in md) is (not beats)
    assert ("distillation beats the student trained alone" in stdout) is beats
    assert ("distillation does NOT beat the student trained alone" in stdout) is (not beats)
    assert d["temperature"] == 2.0 and d["alpha"] == 0.5 and d["epochs"] == 12


def _one_line_error(capsys, argv, out, expected, *needles):
    rc = main(argv)
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith(("INFO ", "WARNING "))]
    assert rc == 1
    assert len(err) == 1, err
    assert err[0].startswith(f"{expected}: "), err[0]
    for needle in needles:
        assert needle in err[0], err[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def _save(tmp_path, name, input_shape, classes):
    from edgekit._keras import keras

    model = keras.Sequential([keras.Input(input_shape), keras.layers.Flatten(), keras.layers.Dense(classes, activation="softmax")],
                             name=name)
    path = tmp_path / f"{name}.keras"
    model.save(path)
    return path


def test_student_input_shape_does_not_fit(capsys, tmp_path, float_model_path):
    student = _save(tmp_path, "wide", (10, 10, 1), 10)
    out = tmp_path / "b"
    _one_line_error(capsys, ["distill", str(float_model_path), "--student", str(student), "--data", "digits", "-o", str(out)],
                    out, "DataError", "student wide", "shape=[10, 10, 1]", "[8, 8, 1]")


def test_student_output_does_not_fit(capsys, tmp_path, float_model_path):
    student = _save(tmp_path, "five", (8, 8, 1), 5)
    out = tmp_path / "b"
    _one_line_error(capsys, ["distill", str(float_model_path), "--student", str(student), "--data", "digits", "-o", str(out)],
                    out, "DataError", "student five outputs 5 scores", "10 classes")


def test_teacher_output_does_not_fit(capsys, tmp_path):
    teacher = _save(tmp_path, "three", (8, 8, 1), 3)
    out = tmp_path / "b"
    _one_line_error(capsys, ["distill", str(teacher), "--student", "tiny", "--data", "digits", "-o", str(out)],
                    out, "DataError", "teacher three", "10 classes", "3 scores")


def test_teacher_cannot_be_loaded(capsys, tmp_path):
    bad = tmp_path / "teacher.keras"
    bad.write_bytes(os.urandom(4096))
    out = tmp_path / "b"
    _one_line_error(capsys, ["distill", str(bad), "--student", "tiny", "--data", "digits", "-o", str(out)],
                    out, "ModelError", "teacher", "cannot be loaded")
    _one_line_error(capsys, ["distill", str(tmp_path / "missing.keras"), "--data", "digits", "-o", str(out)],
                    out, "ModelError", "teacher", "does not exist")


def test_student_file_cannot_be_loaded(capsys, tmp_path, float_model_path):
    out = tmp_path / "b"
    _one_line_error(capsys, ["distill", str(float_model_path), "--student", str(tmp_path / "nope.h5"), "--data", "digits",
                             "-o", str(out)], out, "ModelError", "student", "does not exist")


def test_builtin_student_needs_images(capsys, tmp_path):
    data = tmp_path / "features.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x_train=rng.normal(size=(40, 12)), y_train=np.arange(40) % 2, x_test=rng.normal(size=(10, 12)),
             y_test=np.arange(10) % 2)
    out = tmp_path / "b"
    _one_line_error(capsys, ["distill", "example", "--student", "tiny", "--data", str(data), "-o", str(out)],
                    out, "DataError", "built-in students take images", "--student FILE")


@pytest.mark.parametrize("extra,needle", [
    (["--temperature", "0"], "temperature=0.0"),
    (["--temperature", "-2"], "temperature=-2.0"),
    (["--alpha", "1.5"], "alpha=1.5"),
    (["--alpha", "-0.1"], "alpha=-0.1"),
    (["--epochs", "0"], "epochs=0"),
])
def test_bad_hyperparameters(capsys, tmp_path, extra, needle):
    out = tmp_path / "b"
    _one_line_error(capsys, ["distill", "example", "--data", "digits", "-o", str(out)] + extra, out, "ConversionError", needle)


def test_missing_sign_key_fails_before_training(capsys, tmp_path):
    out = tmp_path / "b"
    _one_line_error(capsys, ["distill", "example", "--data", "digits", "-o", str(out), "--sign-key", str(tmp_path / "none.key")],
                    out, "SigningError", "does not exist")
