"""The input range follows the model (edgekit.convert.inputs): a model that normalizes its own input gets raw pixels,
an exact scalar normalization moves into the bundle's preprocessing, the options override it, the board reproduces
the host's model inputs byte for byte, and a float model fed the wrong range is diagnosed with the option that
fixes it."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from device_agent.update.manifest import Preprocessing
from edgekit.convert.inputs import diagnose, range_preprocessing, resolve
from edgekit.errors import ConversionError

from edgekit.photos import write_photo_folder

PIXELS = Preprocessing(kind="image", shape=(16, 16, 3), color="rgb", resize="bilinear", scale=1 / 255, raw_dtype="uint8")



@pytest.mark.parametrize("option, lo, hi", [("0..1", 0.0, 1.0), ("-1..1", -1.0, 1.0), ("0..255", 0.0, 255.0)])
def test_input_range_maps_raw_pixels_onto_the_range(option, lo, hi):
    pre = range_preprocessing(PIXELS, option)
    raw = np.array([0, 255], np.float32)
    np.testing.assert_allclose(raw * pre.scale + pre.offset, [lo, hi], atol=1e-6)


def test_mean_std_and_conflicting_options():
    pre = range_preprocessing(PIXELS, mean=127.5, std=127.5)
    np.testing.assert_allclose(np.array([0, 255]) * pre.scale + pre.offset, [-1, 1], atol=1e-6)
    with pytest.raises(ConversionError, match="pass one of them"):
        range_preprocessing(PIXELS, "0..1", mean=0.5)
    with pytest.raises(ConversionError, match="std must be"):
        range_preprocessing(PIXELS, std=0)


def _model(keras, first, inside=()):
    """[first layers] -> a nested base (optionally starting with ``inside`` layers) -> pooling -> softmax."""
    base_in = keras.Input((16, 16, 3))
    x = base_in
    for layer in inside:
        x = layer(x)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    base = keras.Model(base_in, x, name="base")
    return keras.Sequential([keras.Input((16, 16, 3))] + list(first) +
                            [base, keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2, activation="softmax")])


def _check_same(model, converted, choice):
    from edgekit.convert.flatten import flatten_model  # noqa: F401 - the pipeline flattens before resolving

    raw = np.random.default_rng(0).uniform(0, 255, (4, 16, 16, 3)).astype(np.float32)
    pre = choice.preprocessing
    fed = (raw * np.float32(pre.scale) + np.float32(pre.offset)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(converted(fed)), np.asarray(model(raw)), atol=1e-5)


@pytest.mark.parametrize("where", ["outer", "inside the nested base", "preprocess_input Lambda"])
def test_a_scalar_normalization_moves_into_the_preprocessing(keras, where):
    from edgekit.convert.flatten import flatten_model

    if where == "outer":
        model = _model(keras, [keras.layers.Rescaling(1 / 127.5, offset=-1)])
    elif where == "inside the nested base":
        model = _model(keras, [], inside=[keras.layers.Rescaling(1 / 127.5, offset=-1)])
    else:
        model = _model(keras, [keras.layers.Lambda(keras.applications.mobilenet_v2.preprocess_input)])
    converted, choice = resolve(flatten_model(model), PIXELS)
    assert choice.source == "model" and len(choice.moved_layers) == 1
    assert choice.to_dict()["range"] == "0..255 -> -1..1"
    assert not any(type(x).__name__ in ("Rescaling", "Lambda") for x in converted.layers)
    _check_same(model, converted, choice)


def test_a_per_channel_normalization_stays_in_the_model_fed_raw_pixels(keras):
    from edgekit.convert.flatten import flatten_model

    model = _model(keras, [keras.layers.Normalization(mean=[100, 110, 120], variance=[900, 1000, 1100])])
    converted, choice = resolve(flatten_model(model), PIXELS)
    assert choice.source == "model" and choice.moved_layers == () and len(choice.normalizing_layers) == 1
    assert choice.to_dict()["range"] == "0..255 -> 0..255"
    _check_same(model, converted, choice)


def test_options_override_the_model_and_a_plain_model_keeps_the_data_recipe(keras):
    model = _model(keras, [keras.layers.Rescaling(1 / 127.5, offset=-1)])
    kept, choice = resolve(model, PIXELS, input_range="0..1")
    assert kept is model and choice.source == "option" and choice.preprocessing.scale == pytest.approx(1 / 255)
    plain = _model(keras, [])
    kept, choice = resolve(plain, PIXELS)
    assert kept is plain and choice.source == "data" and choice.preprocessing == PIXELS


def test_diagnose_names_the_labels_order():
    y = np.repeat(np.arange(3), 10)

    def swapped(x):  # a perfect model whose outputs are in the order b, a, c
        return np.eye(3)[np.array([1, 0, 2])[y]]

    line = diagnose(swapped, np.zeros((30, 16, 16, 3)), y, PIXELS, ("a", "b", "c"), 1 / 3, 1 / 3)
    assert "labels order" in line and "--labels b,a,c" in line


# --- on real photos, through the CLI ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_photo_folder(tmp_path_factory.mktemp("photos") / "photos", per_class=30)


@pytest.fixture(scope="module")
def rescaling_model(tmp_path_factory, photos, keras):
    """A small nested model with its own Rescaling, trained on the photos fed as raw pixels 0..255."""
    from edgekit.data import load_dataset
    from edgekit.models import seed_everything

    seed_everything(0)
    data = load_dataset(str(photos))
    base_in = keras.Input((96, 96, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, use_bias=False)(base_in)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU(6.0)(x)
    x = keras.layers.DepthwiseConv2D(3, strides=2)(x)
    x = keras.layers.Conv2D(16, 1, activation="relu")(x)
    base = keras.Model(base_in, x, name="small_base")
    model = keras.Sequential([keras.Input((96, 96, 3)), keras.layers.Rescaling(1 / 127.5, offset=-1), base,
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3, activation="softmax")])
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(data.x_train, data.y_train, epochs=15, batch_size=16, verbose=0)  # raw 0..255: the model rescales
    acc = float(np.mean(model.predict(data.x_test, verbose=0).argmax(axis=1) == data.y_test))
    assert acc >= 0.85, acc
    path = tmp_path_factory.mktemp("rescaling") / "rescaling.keras"
    model.save(path)
    return path


@pytest.mark.slow
def test_board_reproduces_the_host_model_inputs_byte_for_byte(tmp_path, photos, rescaling_model, capsys):
    from device_agent.inference.interpreter import TFLiteModel
    from device_agent.inference.preprocess import IMAGE_SUFFIXES, load_raw, preprocess
    from device_agent.update.manifest import load_bundle
    from edgekit.cli import main
    from edgekit.data import load_dataset

    out = tmp_path / "bundle"
    assert main(["convert", str(rescaling_model), "--data", str(photos), "--mode", "ptq", "-o", str(out),
                 "--runtime", "ai_edge_litert", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"input: the model normalizes its input \(rescaling\w* \(Rescaling\)", printed) and "WARNING" not in printed
    m = load_bundle(out).manifest  # what the board reads
    assert [n.split("_")[0] for n in m.quantization["input"]["moved_layers"]] == ["rescaling"]
    assert m.quantization["input"]["range"] == "0..255 -> -1..1"
    assert m.metrics["accuracy_float"] >= 0.85
    # the host's model inputs: the data set the bundle was calibrated and evaluated on, with the manifest's recipe
    data = load_dataset(str(photos))
    host = {row.tobytes() for row in (np.concatenate([data.x_train, data.x_test]) * np.float32(m.preprocessing.scale)
                                      + np.float32(m.preprocessing.offset)).astype(np.float32)}
    files = sorted(f for f in photos.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
    board = [preprocess(load_raw(f, m.preprocessing.color), m.preprocessing) for f in files]
    assert all(b.dtype == np.float32 and b.tobytes() in host for b in board)
    with TFLiteModel.open(out / m.model_file) as tm:  # and the board's int8 model sees what the host's float model did
        pred = np.asarray(tm.predict(np.stack(board))).argmax(axis=1)
    truth = np.array([sorted(p.name for p in photos.iterdir()).index(f.parent.name) for f in files])
    assert float(np.mean(pred == truth)) >= 0.85


@pytest.mark.slow
def test_the_wrong_input_range_is_diagnosed_with_the_fix(tmp_path, photos, rescaling_model, capsys):
    from edgekit.cli import main

    out = tmp_path / "wrong"
    assert main(["convert", str(rescaling_model), "--data", str(photos), "--mode", "ptq", "--input-range", "0..1",
                 "-o", str(out), "--runtime", "ai_edge_litert", "--no-progress"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("WARNING: the float model does not clearly beat the majority baseline")
    assert "input range" in last and "pass --input-range 0..255" in last
    report = (out / "report" / "report.md").read_text().splitlines()
    assert report[4].startswith("> **WARNING: the float model does not clearly beat")
    assert "--input-range 0..255" in json.loads((out / "report" / "report.json").read_text())["diagnosis"]
    assert main(["evaluate", str(out), "--data", str(photos), "--float", str(rescaling_model),
                 "--runtime", "ai_edge_litert"]) == 0
    assert "pass --input-range 0..255" in capsys.readouterr().out.strip().splitlines()[-1]


@pytest.mark.slow
def test_distill_feeds_a_teacher_that_rescales_its_own_input_raw_pixels(tmp_path, photos, rescaling_model, keras, capsys):
    """The tutorial-style teacher (its own Rescaling) distilled from a folder of pictures: the teacher, the control
    and the student all get raw 0..255 mapped as the teacher's Rescaling did, and the student's bundle keeps it."""
    from device_agent.update.manifest import load_bundle
    from edgekit.cli import main

    inp = keras.Input((96, 96, 3))
    x = keras.layers.Conv2D(8, 3, strides=4, activation="relu")(inp)
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu")(x)
    student = keras.Model(inp, keras.layers.Dense(3, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x)))
    student.save(tmp_path / "student.keras")
    out = tmp_path / "distilled"
    assert main(["distill", str(rescaling_model), "--student", str(tmp_path / "student.keras"), "--data", str(photos),
                 "--mode", "ptq", "--epochs", "10", "-o", str(out), "--runtime", "ai_edge_litert", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    teacher = float(re.search(r"^teacher (\d+\.\d+)%", printed, re.M).group(1))
    assert teacher >= 85.0, printed[-600:]  # fed 0..1, as before, it scored the majority baseline (33%)
    m = load_bundle(out).manifest
    assert m.quantization["input"]["range"] == "0..255 -> -1..1"
    assert abs(m.preprocessing.scale - 1 / 127.5) < 1e-9 and m.preprocessing.offset == -1.0
