"""Pruning in convert, on the real digits: the sparsity reached in the int8 model the board runs, a 2:4 pattern in its
weights, accuracy against the unpruned bundle, the bytes a board downloads, and the bad options."""

from __future__ import annotations

import json

import numpy as np
import pytest

from device_agent.delivery.protocol import pack_bundle
from device_agent.update.manifest import load_bundle
from edgekit.cli import main
from edgekit.convert.prune import PruneSpec, parse_structure
from edgekit.convert.prune_measure import has_m_by_n
from edgekit.errors import ConversionError

# Accuracy margin of a pruned bundle against the unpruned QAT bundle: the digits test split has 360 inputs, so one
# input is 0.28 points; 50% magnitude pruning of this CNN with 4 epochs of fine-tuning measured 0 to +1 points
# (bench/bench_shrink.py). 2 points (7 inputs) absorbs the fine-tuning's run-to-run spread and still fails a pruning
# that damages the model (a broken mask or QAT that refills the zeros moves accuracy or sparsity far more).
MARGIN_POINTS = 2.0
RUNTIME = "ai_edge_litert"


def _int8_weights(path):
    """Every constant int8 weight tensor of a .tflite, read through the board's interpreter (not edgekit's reader)."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))
    interp.allocate_tensors()
    out = {}
    for d in interp.get_tensor_details():
        # weights: int8, rank 2 or 4, not batch-first (activations here all have batch size 1)
        if np.dtype(d["dtype"]) == np.int8 and len(d["shape"]) in (2, 4) and d["shape"][0] != 1:
            out[d["name"]] = interp.get_tensor(d["index"])
    return out


def _kernel(weights, layer):
    names = [n for n in weights if f"/{layer}/" in n or f"/quant_{layer}/" in n]
    assert len(names) == 1, (layer, list(weights))
    return weights[names[0]]


@pytest.fixture(scope="session")
def pruned_qat(tmp_path_factory, float_model_path, qat_result):
    out = tmp_path_factory.mktemp("prune") / "p50"
    rc = main(["convert", str(float_model_path), "--data", "digits", "--mode", "qat", "--prune", "0.5", "-o", str(out),
               "--baseline", str(qat_result.bundle_path), "--runtime", RUNTIME, "--no-progress", "--name", "digits-p50"])
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def pruned_2x4(tmp_path_factory, float_model_path):
    out = tmp_path_factory.mktemp("prune") / "p2x4"
    rc = main(["convert", str(float_model_path), "--data", "digits", "--mode", "ptq", "--prune-structure", "2x4",
               "--prune-epochs", "2", "-o", str(out), "--runtime", RUNTIME, "--no-progress"])
    assert rc == 0
    return out


@pytest.mark.slow
def test_int8_model_reaches_the_requested_sparsity(pruned_qat):
    bundle = load_bundle(pruned_qat)
    weights = _int8_weights(bundle.model_path)
    for layer in ("conv1", "conv2", "dense", "scores"):
        zeros = float(np.mean(_kernel(weights, layer) == 0))
        # tfmot masks exactly 50% by magnitude; int8 rounding can only add zeros
        assert 0.49 <= zeros <= 0.56, (layer, zeros)
    report = json.loads((pruned_qat / "report" / "report.json").read_text())["pruning"]
    assert report["sparsity"]["int8"] == pytest.approx(0.5, abs=0.02)
    measured = {r["layer"]: r["int8"] for r in report["layers"]}
    for layer in ("conv2", "dense"):  # edgekit's own reading of the flatbuffer agrees with the interpreter's tensors
        assert measured[layer] == pytest.approx(float(np.mean(_kernel(weights, layer) == 0)), abs=1e-9)
    entry = bundle.manifest.quantization["pruning"]
    assert entry["target_sparsity"] == 0.5 and entry["pruned_layers"] == 4
    assert entry["sparsity_int8"] == pytest.approx(0.5, abs=0.02)
    assert bundle.manifest.quantization["mode"] == "qat"


@pytest.mark.slow
def test_pruned_bundle_keeps_accuracy_of_the_unpruned_bundle(pruned_qat, qat_result):
    report = json.loads((pruned_qat / "report" / "report.json").read_text())
    unpruned = qat_result.report.int8.accuracy
    assert report["baseline"]["kind"] == "bundle"
    assert report["baseline"]["accuracy"] == pytest.approx(unpruned)
    assert 100 * (report["int8"]["accuracy"] - unpruned) >= -MARGIN_POINTS, (report["int8"]["accuracy"], unpruned)
    md = (pruned_qat / "report" / "report.md").read_text()
    assert "## Pruning" in md and "Pruning cost: this bundle minus the baseline bundle" in md


@pytest.mark.slow
def test_report_shows_what_a_board_downloads(pruned_qat, qat_result):
    sizes = json.loads((pruned_qat / "report" / "report.json").read_text())["pruning"]["size_bytes"]
    pruned, base = sizes["pruned"], sizes["baseline"]
    assert pruned["tflite"] == (pruned_qat / "model.tflite").stat().st_size
    assert pruned["download"] == len(pack_bundle(pruned_qat))  # exactly what `fleet push` sends
    assert base["download"] == len(pack_bundle(qat_result.bundle_path))
    # the raw int8 file stores every weight: not smaller; compressed, half the weights being zero shows
    assert pruned["tflite"] > 0.9 * base["tflite"]
    assert pruned["gzip"] < 0.85 * base["gzip"]
    assert pruned["download"] < 0.85 * base["download"]
    latency = json.loads((pruned_qat / "report" / "report.json").read_text())["pruning"]["latency_ms"]
    assert [row["runtime"] for row in latency] == [RUNTIME]
    assert latency[0]["pruned_int8_ms"] > 0 and latency[0]["unpruned_int8_ms"] > 0


@pytest.mark.slow
def test_2x4_structure_holds_in_the_int8_weights(pruned_2x4):
    bundle = load_bundle(pruned_2x4)
    weights = _int8_weights(bundle.model_path)
    for layer in ("conv2", "dense", "scores"):
        w = _kernel(weights, layer)  # TFLite layout: input channels last
        blocks = w.reshape(-1, w.shape[-1])
        assert blocks.shape[1] % 4 == 0
        nonzero = np.count_nonzero(blocks.reshape(blocks.shape[0], -1, 4), axis=-1)
        assert nonzero.max() <= 2, (layer, nonzero.max())
        assert float(np.mean(w == 0)) >= 0.5
    # one input channel: no 2x4 pattern fits, so the first convolution stays dense, and the report says why
    assert float(np.mean(_kernel(weights, "conv1") == 0)) < 0.2
    report = json.loads((pruned_2x4 / "report" / "report.json").read_text())["pruning"]
    rows = {r["layer"]: r for r in report["layers"]}
    assert rows["conv1"]["keras"] is None and "input channel" in rows["conv1"]["note"]
    assert all(rows[n]["pattern"] is True for n in ("conv2", "dense", "scores"))
    assert report["pattern_int8"] is True and report["spec"]["structure"] == "2x4"
    assert report["accuracy"]["pruned_int8"] > 0.9
    assert load_bundle(pruned_2x4).manifest.quantization["pruning"]["pattern_int8"] is True


def test_m_by_n_check_by_hand():
    ok = np.array([[0, 3, 0, -1, 5, 0, 0, 2]], dtype=np.int8)
    assert has_m_by_n(ok, 2, 4)
    assert not has_m_by_n(np.array([[0, 3, 1, -1, 5, 0, 0, 2]]), 2, 4)
    assert has_m_by_n(np.array([[7, 0, 0]]), 2, 4)  # padded to 4 with zeros, as tfmot pads
    assert not has_m_by_n(np.ones((2, 3, 8)), 1, 4)


@pytest.mark.parametrize("text,expected", [("2x4", (2, 4)), ("2:4", (2, 4)), ("1X2", (1, 2)), ("2by4", (2, 4))])
def test_structure_parses(text, expected):
    assert parse_structure(text) == expected


@pytest.mark.parametrize("kwargs,needle", [
    ({"sparsity": 0.0}, "within (0, 1)"),
    ({"sparsity": 1.0}, "within (0, 1)"),
    ({"sparsity": float("nan")}, "within (0, 1)"),
    ({"sparsity": 0.75, "structure": "2x4"}, "does not match structure 2x4"),
    ({"sparsity": 0.5, "schedule": "cosine"}, "schedule"),
    ({"sparsity": 0.5, "epochs": 0}, "epochs=0"),
    ({}, "needs a target sparsity"),
])
def test_bad_spec(kwargs, needle):
    with pytest.raises(ConversionError, match=None) as info:
        PruneSpec(**kwargs)
    assert needle in str(info.value)


def test_structure_alone_sets_the_sparsity():
    assert PruneSpec(structure="1x4").sparsity == 0.25


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


@pytest.mark.parametrize("extra,needles", [
    (["--prune", "0"], ("sparsity=0.0", "(0, 1)")),
    (["--prune", "1"], ("sparsity=1.0", "(0, 1)")),
    (["--prune", "1.5"], ("sparsity=1.5",)),
    (["--prune", "-0.2"], ("sparsity=-0.2",)),
    (["--prune-structure", "4x2"], ("0 < M < N",)),
    (["--prune-structure", "0x4"], ("0 < M < N",)),
    (["--prune-structure", "two-by-four"], ("is not MxN",)),
    (["--prune", "0.75", "--prune-structure", "2x4"], ("does not match structure 2x4", "--prune 0.5")),
    (["--prune", "0.5", "--prune-epochs", "0"], ("epochs=0",)),
])
def test_bad_prune_options_one_line_no_bundle(capsys, tmp_path, extra, needles):
    out = tmp_path / "b"
    _one_line_error(capsys, ["convert", "example", "--data", "digits", "-o", str(out)] + extra, out, "ConversionError", *needles)


@pytest.mark.slow
def test_a_nested_model_is_flattened_and_pruned_inside_a_subclassed_one_is_one_error(digits):
    from edgekit._keras import keras
    from edgekit.convert.prune import prune_model

    inner_in = keras.Input((8, 8, 1))
    inner = keras.Model(inner_in, keras.layers.Conv2D(8, 3, activation="relu", name="inner_conv")(inner_in), name="backbone")
    model = keras.Sequential([keras.Input((8, 8, 1)), inner, keras.layers.Flatten(),
                              keras.layers.Dense(10, activation="softmax", name="head")], name="nested")
    pruned = prune_model(model, digits, PruneSpec(0.5, epochs=1), from_logits=False, progress=False)
    rows = {r.layer: r for r in pruned.layers}
    assert rows["inner_conv"].keras == pytest.approx(0.5, abs=0.01)  # the backbone's layer, pruned like any other
    assert rows["head"].keras == pytest.approx(0.5, abs=0.01)
    kernel = pruned.model.get_layer("inner_conv").get_weights()[0]
    assert np.count_nonzero(kernel == 0) / kernel.size == pytest.approx(0.5, abs=0.01)

    class Block(keras.Model):  # a subclassed model inside: no graph to flatten
        def __init__(self):
            super().__init__(name="block")
            self.conv = keras.layers.Conv2D(8, 3, activation="relu")

        def call(self, x):
            return self.conv(x)

    x_in = keras.Input((8, 8, 1))
    opaque = keras.Model(x_in, keras.layers.Dense(10, activation="softmax", name="head")(keras.layers.Flatten()(Block()(x_in))))
    with pytest.raises(ConversionError, match="block .*subclassed.*convert without --prune"):
        prune_model(opaque, digits, PruneSpec(0.5, epochs=1), from_logits=False, progress=False)
