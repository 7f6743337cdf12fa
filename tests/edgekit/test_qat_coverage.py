"""A "qat" bundle whose QAT reached under 90% of the parameters says so: a WARNING line ending the CLI output, the
same line at the top of the report, and the layers left float with their parameters in the manifest."""

from __future__ import annotations

import pytest

from device_agent.update.manifest import load_bundle


@pytest.mark.slow
def test_low_qat_coverage_is_loud(tmp_path, digits, capsys):
    from edgekit._keras import keras
    from edgekit.cli import main
    from edgekit.models import train

    # Conv1D is not in tfmot's 8-bit registry: 1,600 of the 2,250 parameters stay float during QAT
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Reshape((8, 8)), keras.layers.Conv1D(64, 3, name="conv1d"),
                              keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(10, activation="softmax")])
    train(model, digits, 3, progress=False)
    path = tmp_path / "conv1d.keras"
    model.save(path)
    out = tmp_path / "b"
    assert main(["convert", str(path), "--data", "digits", "--mode", "qat", "--epochs", "1", "-o", str(out),
                 "--runtime", "ai_edge_litert", "--no-progress"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    loud = [line for line in printed if line.startswith("WARNING: QAT reached only")]
    assert loud and "28.9% of the parameters (650 of 2,250)" in loud[0] and "conv1d (Conv1D, 1,600 parameters)" in loud[0]
    assert loud[0] in printed[-2:]  # at the end, after the long report
    cov = load_bundle(out).manifest.quantization["qat_coverage"]
    assert cov["parameters"] == 2250 and cov["parameters_qat"] == 650 and cov["fraction_parameters"] < 0.9
    assert [(x["layer"], x["parameters"]) for x in cov["float_layers"]] == [("conv1d", 1600)]
    report = (out / "report" / "report.md").read_text().splitlines()
    assert report[4] == f"> **{loud[0]}**"
