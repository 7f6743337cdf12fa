""" `edgekit import`: .tflite classifiers made the ways other tools make them become bundles the agent runs, and
the agent's predictions on a folder of pictures equal the .tflite run directly by TF's own interpreter."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgekit.cli import main

tf = pytest.importorskip("tensorflow")

N_PER_CLASS = 12


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("import")


@pytest.fixture(scope="module")
def digits_folder(work):
    """Real digits as the PNG files a user's folder holds: one subfolder per class, 8 x 8 grayscale."""
    from sklearn.datasets import load_digits

    d = load_digits()
    root = work / "digits-png"
    for c in range(10):
        (root / str(c)).mkdir(parents=True)
        idx = np.flatnonzero(d.target == c)[-N_PER_CLASS:]  # the last ones: the model below never saw them
        for i in idx:
            Image.fromarray((d.images[i] * (255.0 / 16.0)).round().astype(np.uint8), mode="L").save(
                root / str(c) / f"{i:04d}.png")
    (work / "labels.txt").write_text("".join(f"{c}\n" for c in range(10)))
    (work / "tm-labels.txt").write_text("".join(f"{c} {c}\n" for c in range(10)))  # Teachable Machine's format
    return root


@pytest.fixture(scope="module")
def logits_net():
    """A small CNN on 0..1 pixels ending in logits (Dense without softmax), trained on the first digits."""
    from sklearn.datasets import load_digits

    tf.keras.utils.set_random_seed(0)
    d = load_digits()
    n = len(d.target) - 10 * N_PER_CLASS - 200
    x = (d.images[:n, :, :, None] / 16.0).astype(np.float32)
    net = tf.keras.Sequential([
        tf.keras.Input((8, 8, 1)),
        tf.keras.layers.Conv2D(8, 3, activation="relu"),
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(10),
    ])
    net.compile("adam", tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    net.fit(x, d.target[:n], epochs=12, batch_size=32, verbose=0)
    net.calibration = x[:200]
    return net


def _convert(model, path: Path, *, int8: bool = False, io=None, calibration=None) -> Path:
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    if int8:
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = lambda: ([c[None]] for c in calibration)
    if io is not None:  # full-integer: integer input and output tensors, as Teachable Machine's "quantized" export
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = io
        conv.inference_output_type = io
    path.write_bytes(conv.convert())
    return path


@pytest.fixture(scope="module")
def models(logits_net, work):
    net = logits_net
    softmax = tf.keras.Sequential([tf.keras.Input((8, 8, 1)), net, tf.keras.layers.Softmax()])
    # Teachable Machine style: RGB input in -1..1 (MobileNet's preprocessing), uint8 tensors in and out.
    to_gray = tf.keras.layers.Conv2D(1, 1, use_bias=False, kernel_initializer=tf.keras.initializers.Constant(1 / 3))
    rgb = tf.keras.Sequential([tf.keras.Input((8, 8, 3)), tf.keras.layers.Rescaling(0.5, offset=0.5), to_gray, net,
                               tf.keras.layers.Softmax()])
    rgb_cal = np.repeat(net.calibration * 2.0 - 1.0, 3, axis=-1)
    return {
        "float32": (_convert(softmax, work / "float32.tflite"), ["--input-range", "0..1"], np.float32, "softmax"),
        "int8-float-io": (_convert(softmax, work / "int8-float-io.tflite", int8=True, calibration=net.calibration),
                          ["--input-range", "0..1"], np.float32, "softmax"),
        "uint8-io": (_convert(rgb, work / "uint8-io.tflite", int8=True, io=tf.uint8, calibration=rgb_cal), [],
                     np.uint8, "softmax"),
        "logits": (_convert(net, work / "logits.tflite"), ["--input-range", "0..1"], np.float32, "logits"),
        # the RGB model in float: -1..1 input (MobileNet's preprocessing), nothing in the file says so
        "float32-rgb": (_convert(rgb, work / "float32-rgb.tflite"), ["--input-range=-1..1"], np.float32, "softmax"),
    }


def _direct(path: Path, files, dtype) -> np.ndarray:
    """Probabilities from TF's own interpreter, fed as the exporting tool documents it: float models 0..1 pixels,
    uint8 models the raw pixel bytes (RGB)."""
    interp = tf.lite.Interpreter(model_path=str(path))
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    rows = []
    for f in files:
        img = Image.open(f)
        if inp["shape"][-1] == 3:
            img = img.convert("RGB")
        px = np.asarray(img, dtype=np.uint8).reshape(inp["shape"])
        interp.set_tensor(inp["index"], px if dtype == np.uint8 else (px / 255.0).astype(np.float32))
        interp.invoke()
        q = interp.get_tensor(out["index"]).reshape(-1).astype(np.float64)
        scale, zp = out["quantization"]
        rows.append((q - zp) * scale if scale else q)
    return np.asarray(rows)


def _agent_lines(bundle: Path, folder: Path, tmp: Path):
    from device_agent.agent import Agent
    from device_agent.config import load_config

    files = sorted(folder.rglob("*.png"))
    flat = tmp / "inbox"
    flat.mkdir()
    for f in files:  # the board's inbox: one folder, names in the same order
        (flat / f"{f.parent.name}-{f.name}").write_bytes(f.read_bytes())
    config = load_config(None, bundle=str(bundle), broker="", device_id="dev1", fleet="test",
                         outbox={"path": str(tmp / "outbox.sqlite")}, results={"path": str(tmp / "results.jsonl")},
                         source={"kind": "folder", "path": str(flat)})
    with Agent(config) as agent:
        stats = agent.run()
    assert stats.inferences == len(files) and dict(stats.errors) == {} and dict(stats.input_mismatch) == {}
    return files, [json.loads(v) for v in (tmp / "results.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["float32", "int8-float-io", "uint8-io", "logits"])
def test_an_imported_tflite_runs_on_the_agent_as_it_runs_directly(kind, models, digits_folder, work, tmp_path, capsys):
    path, options, dtype, activation = models[kind]
    out = tmp_path / "bundle"
    labels = work / ("tm-labels.txt" if kind == "uint8-io" else "labels.txt")
    rc = main(["import", str(path), "--labels", str(labels), "--data", str(digits_folder), "-o", str(out),
               "--runtime", "tensorflow", *options])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    m = json.loads((out / "manifest.json").read_text())
    assert m["labels"] == [str(c) for c in range(10)]
    assert m["output_activation"] == activation and f"output: {activation}" in printed
    assert m["input"]["dtype"] == np.dtype(dtype).name and m["quantization"]["mode"] == "imported"
    assert m["preprocessing"]["color"] == ("rgb" if kind == "uint8-io" else "grayscale")
    # Measured as convert measures: report, thresholds from the test split, reference statistics.
    assert (out / "report" / "report.md").is_file() and m["metrics"]["accuracy_int8"] > 0.85
    assert m["reference"]["samples"] > 0 and 0.3 <= m["confidence"]["threshold"] <= 0.95
    if kind == "uint8-io":  # the range the quantized input covers: raw pixels are the input bytes, nothing moves
        assert "about -1..1" in printed
    files, lines = _agent_lines(out, digits_folder, tmp_path)
    direct = _direct(path, files, dtype)
    if activation == "logits":
        e = np.exp(direct - direct.max(axis=1, keepdims=True))
        direct = e / e.sum(axis=1, keepdims=True)
    want = [str(i) for i in direct.argmax(axis=1)]
    got = [line["label"] for line in lines]
    assert got == want
    conf = np.array([line["confidence"] for line in lines])
    assert np.allclose(conf, direct.max(axis=1) / direct.sum(axis=1), atol=2e-3)
    assert np.mean([g == f.parent.name for g, f in zip(got, files)]) > 0.85


def _keras_two_inputs():
    a, b = tf.keras.Input((4,)), tf.keras.Input((4,))
    return tf.keras.Model([a, b], tf.keras.layers.Dense(3, activation="softmax")(tf.keras.layers.Concatenate()([a, b])))


def _keras_feature_map():
    return tf.keras.Sequential([tf.keras.Input((8, 8, 1)), tf.keras.layers.Conv2D(4, 3)])


@pytest.mark.parametrize("case, expected", [
    ("text", "is not a TFLite model"),
    ("keras", "is not a TFLite model"),
    ("two-inputs", "has 2 inputs"),
    ("feature-map", "not a classifier's [1, k]"),
    ("labels", "3 labels given"),
    ("data-shape", "does not fit the model's input"),
    ("no-range", "does not say its range; pass --input-range"),
])
def test_bad_input_is_one_line_and_no_bundle(case, expected, logits_net, digits_folder, work, tmp_path, capsys):
    model = tmp_path / "m.tflite"
    labels = str(work / "labels.txt")
    extra = ["--input-range", "0..1"]
    if case == "text":
        model.write_text("this is not a model\n")
    elif case == "keras":
        model = tmp_path / "m.keras"
        logits_net.save(model)
    elif case == "two-inputs":
        _convert(_keras_two_inputs(), model)
        labels = "a,b,c"
    elif case == "feature-map":
        _convert(_keras_feature_map(), model)
    else:
        _convert(logits_net, model)
        if case == "labels":
            labels = "a,b,c"
        elif case == "data-shape":
            rng = np.random.default_rng(0)
            np.savez(tmp_path / "d.npz", x_train=rng.random((20, 5, 5), np.float32), y_train=np.arange(20) % 10,
                     x_test=rng.random((10, 5, 5), np.float32), y_test=np.arange(10))
            extra += ["--data", str(tmp_path / "d.npz")]
        elif case == "no-range":
            extra = []
    out = tmp_path / "out" / "bundle"
    rc = main(["import", str(model), "--labels", labels, "-o", str(out), *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 1
    assert expected in err and "\n" not in err, err
    assert not out.exists()
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []  # nothing half-written


def test_without_data_and_signed_it_runs_on_a_board_that_trusts_only_signed_bundles(models, tmp_path, capsys):
    """No data: specs and preprocessing from the model alone (default thresholds, no reference statistics);
    --sign-key signs it, and an agent with trusted keys (the board's signature check) runs it."""
    from sklearn.datasets import load_digits

    from device_agent.agent import Agent
    from device_agent.config import load_config
    from device_agent.sources import ArraySource
    from edgekit.fleet.keys import init_keys

    keys = init_keys(tmp_path / "keys")
    path = models["uint8-io"][0]
    out = tmp_path / "bundle"
    assert main(["import", str(path), "--labels", ",".join(map(str, range(10))), "-o", str(out),
                 "--sign-key", str(keys.private)]) == 0
    printed = capsys.readouterr().out
    assert "signed: release 1 with key" in printed
    m = json.loads((out / "manifest.json").read_text())
    assert m["metrics"] == {} and m["reference"] == {} and m["confidence"]["threshold"] == 0.5
    d = load_digits()
    pixels = (d.images[-50:] * (255.0 / 16.0)).round().astype(np.uint8)
    inputs = [np.repeat(p[..., None], 3, axis=-1) for p in pixels]  # what an RGB camera gives
    config = load_config(None, bundle=str(out), broker="", device_id="dev1", fleet="test",
                         outbox={"path": str(tmp_path / "outbox.sqlite")}, results={"path": str(tmp_path / "r.jsonl")},
                         update={"trusted_keys": [str(tmp_path / "keys" / "signing.pub")]})
    with Agent(config, source=ArraySource(inputs)) as agent:
        assert agent.verifier is not None
        stats = agent.run()
    lines = [json.loads(v) for v in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert stats.inferences == 50 and dict(stats.input_mismatch) == {}
    assert np.mean([line["label"] == str(t) for line, t in zip(lines, d.target[-50:])]) > 0.85


def test_a_binary_classifier_ending_in_one_logit(digits_folder, work, tmp_path, capsys):
    """TF's transfer-learning tutorial ends in Dense(1) trained with from_logits=True: one logit, 'is it the
    second class'. The bundle says logits; the agent's confidence is the logistic of it, as run directly."""
    from sklearn.datasets import load_digits

    tf.keras.utils.set_random_seed(1)
    d = load_digits()
    keep = np.flatnonzero(d.target[: -10 * N_PER_CLASS] < 2)
    x = (d.images[keep, :, :, None] / 16.0).astype(np.float32)
    net = tf.keras.Sequential([tf.keras.Input((8, 8, 1)), tf.keras.layers.Flatten(), tf.keras.layers.Dense(1)])
    net.compile("adam", tf.keras.losses.BinaryCrossentropy(from_logits=True))
    net.fit(x, d.target[keep].astype(np.float32), epochs=20, verbose=0)
    path = _convert(net, tmp_path / "binary.tflite")
    folder = tmp_path / "zero-one"
    for c in ("0", "1"):
        (folder / c).mkdir(parents=True)
        for f in (digits_folder / c).iterdir():
            (folder / c / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "bundle"
    assert main(["import", str(path), "--labels", "0,1", "--data", str(folder), "--input-range", "0..1", "-o",
                 str(out), "--runtime", "tensorflow"]) == 0
    assert "not LOGISTIC" in capsys.readouterr().out
    m = json.loads((out / "manifest.json").read_text())
    assert m["output_activation"] == "logits" and m["metrics"]["accuracy_int8"] > 0.9
    files, lines = _agent_lines(out, folder, tmp_path)
    logit = _direct(path, files, np.float32)[:, 0]
    p1 = 1.0 / (1.0 + np.exp(-logit))
    assert [line["label"] for line in lines] == ["1" if p > 0.5 else "0" for p in p1]
    assert np.allclose([line["confidence"] for line in lines], np.maximum(p1, 1 - p1), atol=1e-4)


def test_a_float_input_of_unstated_range_is_found_from_the_data(models, digits_folder, work, tmp_path, capsys):
    """Model Maker and Edge Impulse float exports often say nothing about their input range: with --data the
    standard range under which the model is right stands out (-1..1 here), and is written and said. (A model
    that is right under every range, as the plain digits CNN nearly is, gets the error asking for the option.)"""
    path = models["float32-rgb"][0]
    out = tmp_path / "bundle"
    assert main(["import", str(path), "--labels", str(work / "labels.txt"), "--data", str(digits_folder),
                 "-o", str(out), "--runtime", "tensorflow"]) == 0
    printed = capsys.readouterr().out
    assert "range not stated" in printed and "using -1..1" in printed, printed
    pre = json.loads((out / "manifest.json").read_text())["preprocessing"]
    assert pre["scale"] == pytest.approx(2 / 255) and pre["offset"] == -1.0
