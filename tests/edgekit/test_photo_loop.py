"""The loop on photos, end to end: `edgekit demo --workload photos` over a real Mosquitto.

The model is the one every Keras transfer-learning tutorial builds: MobileNetV2 (alpha 0.35, 96x96x3, no top,
random init: no download) nested in a Sequential with its own Rescaling, trained here on real photographs
(scikit-learn's sample photos cut into three classes of JPEG/PNG patches of varied sizes). QAT must reach the
whole base (it used to be left float, 99% of the weights), the Rescaling must move into the bundle's
preprocessing, the int8 model must stay within a point of the float one, and the agent, reading a folder of
picture files on the board's code path, must see what the host sees. Then the flagged photos travel to the
collector, are labelled, the model is retrained and the new version goes back to the board.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from device_agent.update.manifest import load_bundle
from edgekit.demo import DemoConfig, run_demo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("photos") / "demo-photos-out"
    lines = []
    result = run_demo(DemoConfig(output=out, broker="mosquitto", workload="photos"), say=lines.append)
    return result, lines


@pytest.fixture(scope="module")
def tests_npz(demo):
    with np.load(demo[0].output / "test.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def float_accuracy(demo, tests_npz, keras) -> float:
    """Top-1 of the model as the user made it (raw pixels in) on the 300 held-out photos, computed once."""
    model = keras.models.load_model(demo[0].output / "model" / "photos.keras")
    x, y = tests_npz["x_test"], tests_npz["y_test"]
    return float(np.mean(model.predict(x.astype(np.float32), verbose=0).argmax(axis=1) == y))


def test_qat_reaches_the_whole_nested_base_and_the_rescaling_moves_to_the_bundle(demo, keras):
    result, lines = demo
    out = result.output
    model = keras.models.load_model(out / "model" / "photos.keras")
    m = load_bundle(out / "bundle-v1").manifest
    cov = m.quantization["qat_coverage"]
    assert m.quantization["mode"] == "qat" and cov["flattened"] == ["mobilenetv2_0.35_96"], cov
    assert cov["fraction_parameters"] >= 0.9 and cov["parameters"] == model.count_params(), cov
    assert cov["float_layers"] == []  # the Rescaling moved out; every other layer is one tfmot quantizes
    assert m.quantization["input"]["range"] == "0..255 -> -1..1"
    assert abs(m.preprocessing.scale - 1 / 127.5) < 1e-9 and m.preprocessing.offset == -1.0
    assert "QAT coverage: **100.00% of the parameters**" in (out / "bundle-v1" / "report" / "report.md").read_text()
    assert any("QAT over 100.0% of the parameters" in ln for ln in lines)


def test_qat_int8_is_within_a_point_of_float_on_the_held_out_photos(demo, tests_npz, float_accuracy):
    from edgekit.loop.retrain import bundle_accuracy

    out = demo[0].output
    x, y = tests_npz["x_test"], tests_npz["y_test"]
    assert len(y) == 300  # a point is 3 photos
    float_acc = float_accuracy
    int8_acc = bundle_accuracy(out / "bundle-v1", x, y)
    assert float_acc >= 0.8, float_acc
    assert int8_acc >= float_acc - 0.01, (float_acc, int8_acc)


def test_the_agent_reads_the_picture_files_as_the_host_does(demo):
    from device_agent.inference.interpreter import TFLiteModel
    from edgekit.data import read_images

    result, _ = demo
    out = result.output
    bundle = load_bundle(out / "bundle-v1")
    m = bundle.manifest
    rows = [json.loads(ln) for ln in (out / "agent" / "results.jsonl").read_text().splitlines()]
    files = sorted((out / "stream").iterdir())
    assert len(rows) == len(files) == result.counts["stream"] == 120
    by_file = {r["source"]["uri"]: r for r in rows}
    assert sorted(by_file) == [str(f) for f in files]  # every picture once, none failed
    assert {f.suffix for f in files} == {".jpg", ".png"}
    # the host: decoded and resized by edgekit.data (the loader convert and retrain use), the int8 model run by
    # TensorFlow's own interpreter
    x = read_images(files, m.preprocessing) * np.float32(m.preprocessing.scale) + np.float32(m.preprocessing.offset)
    with TFLiteModel.open(bundle.model_path, runtime="tensorflow") as tm:
        host = [m.labels[int(np.argmax(tm(row)))] for row in x.astype(np.float32)]
    board = [by_file[str(f)]["label"] for f in files]
    assert board == host


def test_flagged_photos_go_to_the_collector_are_labelled_retrained_and_shipped(demo):
    from device_agent.inference.preprocess import decode_image
    from edgekit.loop.store import open_store

    result, lines = demo
    out, c = result.output, result.counts
    truth = json.loads((out / "stream-truth.json").read_text())
    assert 0 < c["flagged"] == c["published"] == c["stored"] == c["labeled"] < c["stream"]
    with open_store(f"sqlite:///{out / 'samples.db'}") as store:
        labeled = store.list_samples(labeled=True)
    assert len(labeled) == c["labeled"]
    for r in labeled:  # each stored photo: the picture as the board read it (upright, its own size, before the
        # resize to 96x96), its file's name and the person's (here: the truth's) label
        name = r.source["uri"].rsplit("/", 1)[-1]
        assert r.label == truth[name]["label"]
        picture = decode_image(out / "stream" / name, "rgb")
        assert tuple(r.input_shape) == picture.shape and r.input_data == picture.tobytes()
    v1, v2 = load_bundle(out / "bundle-v1").manifest, load_bundle(out / "bundle-v2").manifest
    assert (v1.version, v2.version) == ("1", "2") and v1.sha256 != v2.sha256
    assert v2.quantization["qat_coverage"]["fraction_parameters"] >= 0.9
    assert v2.preprocessing == v1.preprocessing
    retrain = json.loads((out / "bundle-v2" / "retrain.json").read_text())
    assert retrain["verdict"] == result.verdict and retrain["counts"]["feedback"] == c["labeled"]
    if result.verdict == "promote":  # shipped: the board verified v2, swapped it in and ran it
        assert c["after_update"].get("2", 0) > 0, c["after_update"]
    else:
        assert c["after_update"] == {}
    assert [ln.split("]")[0] for ln in lines if ln.startswith("[")] == [f"[{i}/11" for i in range(1, 12)]


def test_the_same_model_converts_with_ptq_from_the_folder_of_pictures(demo, tests_npz, float_accuracy, tmp_path,
                                                                     capsys):
    """`edgekit convert --mode ptq` on the user's nested model and their folder of JPEG/PNG files."""
    from edgekit.cli import main
    from edgekit.loop.retrain import bundle_accuracy

    out = demo[0].output
    bundle = tmp_path / "ptq"
    assert main(["convert", str(out / "model" / "photos.keras"), "--data", str(out / "photos"), "--mode", "ptq",
                 "-o", str(bundle), "--runtime", "ai_edge_litert", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "WARNING" not in printed and "moved into the bundle's preprocessing: raw 0..255 -> -1..1" in printed
    m = load_bundle(bundle).manifest
    assert m.quantization["mode"] == "ptq" and m.preprocessing == load_bundle(out / "bundle-v1").manifest.preprocessing
    x, y = tests_npz["x_test"], tests_npz["y_test"]
    assert bundle_accuracy(bundle, x, y) >= float_accuracy - 0.03  # calibration only: no training to recover a loss
