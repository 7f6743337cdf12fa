"""Bad input through the CLI (one line, exit 1, nothing written), fallbacks, Keras 3 models."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from edgekit.cli import main
from edgekit.errors import ConversionError


def _run(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return rc, [line for line in err if not line.startswith(("INFO ", "WARNING ", "DEBUG "))]


def _assert_one_line_error(capsys, argv, out, expected_type, *needles):
    rc, lines = _run(capsys, argv)
    assert rc == 1
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{expected_type}: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists(), "a half-written output was left behind"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "a temp dir was left behind"


def test_missing_model_file(capsys, tmp_path):
    out = tmp_path / "b"
    _assert_one_line_error(capsys, ["convert", str(tmp_path / "nope.keras"), "--data", "digits", "-o", str(out)], out,
                           "ModelError", "does not exist")


def test_corrupt_model_file(capsys, tmp_path):
    bad = tmp_path / "bad.keras"
    bad.write_bytes(os.urandom(2048))
    out = tmp_path / "b"
    _assert_one_line_error(capsys, ["convert", str(bad), "--data", "digits", "-o", str(out)], out, "ModelError", "cannot be loaded")


def test_truncated_h5_model(capsys, tmp_path, float_model_path):
    bad = tmp_path / "cut.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    out = tmp_path / "b"
    _assert_one_line_error(capsys, ["convert", str(bad), "--data", "digits", "-o", str(out)], out, "ModelError", "cut.h5")


def test_data_shape_does_not_fit_the_model(capsys, tmp_path, float_model_path):
    data = tmp_path / "big.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x_train=rng.integers(0, 255, (30, 10, 10, 1)), y_train=np.arange(30) % 10,
             x_test=rng.integers(0, 255, (10, 10, 10, 1)), y_test=np.arange(10) % 10)
    out = tmp_path / "b"
    _assert_one_line_error(capsys, ["convert", str(float_model_path), "--data", str(data), "--mode", "ptq", "-o", str(out)],
                           out, "DataError", "shape=[10, 10, 1]", "[8, 8, 1]")


def test_label_count_does_not_fit_the_model(capsys, tmp_path, float_model_path):
    data = tmp_path / "three.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x_train=rng.integers(0, 255, (30, 8, 8, 1)), y_train=np.arange(30) % 3,
             x_test=rng.integers(0, 255, (9, 8, 8, 1)), y_test=np.arange(9) % 3)
    out = tmp_path / "b"
    _assert_one_line_error(capsys, ["convert", str(float_model_path), "--data", str(data), "--mode", "ptq", "-o", str(out)],
                           out, "DataError", "3 classes", "10 scores")


def test_empty_image_folder(capsys, tmp_path, float_model_path):
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    out = tmp_path / "b"
    _assert_one_line_error(capsys, ["convert", str(float_model_path), "--data", str(tmp_path / "imgs"), "-o", str(out)],
                           out, "DataError", "no images")


def test_unreadable_image_folder(capsys, tmp_path, float_model_path):
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "imgs" / c / "ok.png")
    (tmp_path / "imgs" / "a" / "zz.jpg").write_bytes(b"garbage")
    out = tmp_path / "b"
    _assert_one_line_error(capsys, ["convert", str(float_model_path), "--data", str(tmp_path / "imgs"), "-o", str(out)],
                           out, "DataError", "zz.jpg")


def test_existing_output_without_force(capsys, tmp_path, float_model_path):
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, lines = _run(capsys, ["convert", str(float_model_path), "--data", "digits", "-o", str(out)])
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("OutputExistsError: ") and "--force" in lines[0]
    assert (out / "keep.txt").read_text() == "mine"


def test_cli_convert_example_ptq_then_evaluate(capsys, tmp_path, ptq_result, float_model_path):
    out = tmp_path / "ex"
    rc = main(["convert", "example", "--data", "digits", "--mode", "ptq", "--train-epochs", "3", "--no-progress",
               "--runtime", "ai_edge_litert", "-o", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0 and (out / "manifest.json").is_file() and (out / "report" / "report.md").is_file()
    assert "int8" in printed and "bundle:" in printed
    ev = tmp_path / "ev"
    rc = main(["evaluate", str(out), "--data", "digits", "--float", str(float_model_path), "--baseline",
               str(ptq_result.bundle_path), "--runtime", "ai_edge_litert", "-o", str(ev)])
    assert rc == 0 and (ev / "report.json").is_file() and (ev / "confusion.png").is_file()
    # --force replaces the bundle, and a failed replacement keeps the old one
    rc, lines = _run(capsys, ["convert", str(tmp_path / "missing.keras"), "--data", "digits", "-o", str(out), "--force"])
    assert rc == 1 and (out / "manifest.json").is_file()


def _unsupported_model():
    from edgekit._keras import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv")(inputs)
    x = keras.layers.SeparableConv2D(8, 3, padding="same", activation="relu", name="sep")(x)
    x = keras.layers.Lambda(lambda t: t * 0.5, name="halve")(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(10, activation="softmax", name="scores")(x)
    return keras.Model(inputs, outputs, name="odd")


def test_unsupported_layers_are_named_with_their_fallback(digits, tmp_path):
    from edgekit.convert import convert

    result = convert(_unsupported_model(), digits, mode="qat", output=tmp_path / "b", epochs=1, progress=False,
                     runtimes=["ai_edge_litert"], report=False)
    named = dict(result.fallbacks)
    assert set(named) == {"sep", "halve"}
    assert "SeparableConv2D" in named["sep"] and "left float during QAT" in named["sep"]
    assert "Lambda" in named["halve"]
    m = result.manifest
    assert m.quantization["mode"] == "qat" and m.input.dtype == "int8" and m.output.dtype == "int8"
    assert {f["layer"] for f in m.quantization["fallbacks"]} == {"sep", "halve"}


def test_unsupported_layers_with_fallback_fail(capsys, tmp_path, digits):
    path = tmp_path / "odd.h5"
    _unsupported_model().save(path)
    out = tmp_path / "b"
    _assert_one_line_error(capsys, ["convert", str(path), "--data", "digits", "--fallback", "fail", "-o", str(out)],
                           out, "ConversionError", "sep (SeparableConv2D)", "halve (Lambda)", "--fallback ptq")


def test_subclassed_model_falls_back_to_ptq(digits, tmp_path):
    from edgekit._keras import keras
    from edgekit.convert import convert

    class Tiny(keras.Model):
        def __init__(self):
            super().__init__(name="tiny")
            self.flat = keras.layers.Flatten()
            self.hidden = keras.layers.Dense(32, activation="relu")
            self.out = keras.layers.Dense(10, activation="softmax")

        def call(self, x):
            return self.out(self.hidden(self.flat(x)))

    model = Tiny()
    model(digits.model_inputs(digits.x_train[:2]))
    with pytest.raises(ConversionError, match="subclassed"):
        convert(model, digits, mode="qat", output=tmp_path / "f", fallback="fail", progress=False)
    assert not (tmp_path / "f").exists()
    result = convert(model, digits, mode="qat", output=tmp_path / "b", epochs=1, progress=False,
                     runtimes=["ai_edge_litert"], report=False)
    assert result.manifest.quantization["mode"] == "ptq"
    assert result.fallbacks[0][0] == "tiny" and "whole model converted with PTQ" in result.fallbacks[0][1]


KERAS3_SAVE = textwrap.dedent(
    """
    import sys, numpy as np, keras
    assert keras.__version__.startswith("3"), keras.__version__
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(10, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.layers[2].set_weights([w + 0.1 * np.ones_like(w) for w in model.layers[2].get_weights()])
    model.save(sys.argv[1])
    x = np.random.default_rng(0).random((4, 8, 8, 1)).astype("float32")
    np.save(sys.argv[2], model.predict(x, verbose=0))
    """
)


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_keras3_saved_model_loads_and_converts(tmp_path, digits, suffix):
    from edgekit.convert import convert, load_model

    path, expected = tmp_path / f"k3{suffix}", tmp_path / "expected.npy"
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    subprocess.run([sys.executable, "-c", KERAS3_SAVE, str(path), str(expected)], env=env, check=True,
                   capture_output=True, timeout=120)
    model = load_model(path)
    x = np.random.default_rng(0).random((4, 8, 8, 1)).astype("float32")
    np.testing.assert_allclose(model.predict(x, verbose=0), np.load(expected), atol=1e-5)
    if suffix == ".keras":
        result = convert(path, digits, mode="qat", output=tmp_path / "b", epochs=1, progress=False,
                         runtimes=["ai_edge_litert"], report=False)
        assert result.manifest.quantization["mode"] == "qat" and result.manifest.input.dtype == "int8"


def test_savedmodel_directory_loads(tmp_path, float_model_path, digits):
    from edgekit.convert import load_model

    model = load_model(float_model_path)
    model.save(tmp_path / "sm", save_format="tf")
    again = load_model(tmp_path / "sm")
    x = digits.model_inputs(digits.x_test[:8])
    np.testing.assert_allclose(again.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
