"""The transfer-learning tutorial's model, end to end through `edgekit convert --mode qat`: MobileNetV2 (alpha 0.35,
96x96x3, no top, random init: no download) nested in a Sequential with its own Rescaling, trained here on real
photographs (scikit-learn's sample photos cut into three classes of JPEG/PNG patches). QAT must reach the whole
base (it used to be left float, 99% of the weights), the Rescaling must move into the bundle's preprocessing, and
the int8 model must stay close to the float one."""

from __future__ import annotations

import numpy as np
import pytest

from edgekit.photos import train_tutorial_model, tutorial_model, write_photo_folder

# The test split holds 30 photos (10 per class), one photo is 3.3 points. QAT int8 against float on it: within 2
# photos; a QAT that missed the base or a preprocessing mismatch between host and bundle costs far more.
MAX_INT8_DROP = 2 / 30 + 1e-9


@pytest.mark.slow
def test_nested_mobilenetv2_converts_with_qat_over_the_whole_base(tmp_path, capsys):
    from device_agent.update.manifest import load_bundle
    from edgekit.cli import main
    from edgekit.data import load_dataset

    photos = write_photo_folder(tmp_path / "photos", per_class=50)
    data = load_dataset(str(photos))
    model = train_tutorial_model(tutorial_model(3), data.x_train, data.y_train)  # raw 0..255: it rescales itself
    float_acc = float(np.mean(model.predict(data.x_test, verbose=0).argmax(axis=1) == data.y_test))
    assert float_acc >= 0.8, float_acc
    path = tmp_path / "tutorial.keras"
    model.save(path)

    out = tmp_path / "bundle"
    assert main(["convert", str(path), "--data", str(photos), "--mode", "qat", "--epochs", "1", "-o", str(out),
                 "--runtime", "ai_edge_litert", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "WARNING" not in printed
    m = load_bundle(out).manifest
    cov = m.quantization["qat_coverage"]
    assert m.quantization["mode"] == "qat" and cov["flattened"] == ["mobilenetv2_0.35_96"], cov
    assert cov["fraction_parameters"] >= 0.9 and cov["parameters"] == model.count_params(), cov
    assert cov["float_layers"] == []  # the Rescaling moved out; every other layer is one tfmot quantizes
    assert m.quantization["input"]["range"] == "0..255 -> -1..1"
    assert abs(m.preprocessing.scale - 1 / 127.5) < 1e-9 and m.preprocessing.offset == -1.0
    report = (out / "report" / "report.md").read_text()
    assert "QAT coverage: **100.00% of the parameters**" in report
    assert m.metrics["accuracy_float"] >= 0.8
    assert m.metrics["accuracy_int8"] >= m.metrics["accuracy_float"] - MAX_INT8_DROP, m.metrics
