"""Measure the transfer-learning tutorial's model through `edgekit convert`: what QAT reaches, what int8 costs.

The model: MobileNetV2 (alpha 0.35, 96x96x3, no top, random init) nested in
``Sequential([Rescaling(1/127.5, offset=-1), base, GlobalAveragePooling2D(), Dense(3)])``, trained here on real
photographs (scikit-learn's sample photos cut into three classes of JPEG/PNG patches, ``edgekit.photos``).

Printed, side by side from one run:
- QAT coverage (parameters and layers under QAT) before flattening (what tfmot reached on the nested model: the
  top-level layers only) and after (what `convert --mode qat` reaches now);
- float vs PTQ vs QAT: top-1 on the test split, agreement with float, model.tflite bytes and int8/float size;
- where the int8 bytes go (int8 weights, int32 biases, per-channel quantization parameters, the rest): why int8
  stays above a quarter of float on this model;
- latency per runtime (one thread, every model in turn on each runtime).

    .venv/bin/python bench/bench_models.py [--per-class 50] [--qat-epochs 1] [--runs 200]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Dict

import numpy as np


def _coverage_before(model) -> Dict[str, float]:
    """tfmot on the nested model as it is: a model used as a layer is not annotated (left float whole)."""
    from edgekit.convert import quantize as q

    reasons = {name: f"{cls} is not supported by tfmot QAT" for name, cls in q.unsupported_layers(model)}
    return q.coverage(model, reasons)


def _breakdown(tflite: bytes) -> Dict[str, int]:
    """Bytes of model.tflite by kind: int8 weight data, int32 bias data, quantization parameters, the rest."""
    from edgekit._keras import tflite_flatbuffer

    fb = tflite_flatbuffer()
    model = fb.convert_bytearray_to_object(bytearray(tflite))
    out = {"int8_weights": 0, "int32_biases": 0, "float_data": 0, "quant_params": 0}
    sub = model.subgraphs[0]
    for t in sub.tensors:
        buf = model.buffers[t.buffer].data if t.buffer < len(model.buffers) else None
        n = 0 if buf is None else len(buf)
        if t.type == 9:  # INT8
            out["int8_weights"] += n
        elif t.type == 2:  # INT32
            out["int32_biases"] += n
        elif t.type == 0:  # FLOAT32
            out["float_data"] += n
        if t.quantization is not None and t.quantization.scale is not None:
            # float32 scale + int64 zero point per channel (+ min/max when present)
            out["quant_params"] += len(t.quantization.scale) * (4 + 8)
    out["rest (graph, names, shapes)"] = len(tflite) - sum(out.values())
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--qat-epochs", type=int, default=1)
    p.add_argument("--runs", type=int, default=200)
    args = p.parse_args()

    from device_agent.inference.interpreter import TFLiteModel, available_runtimes
    from device_agent.update.manifest import load_bundle
    from edgekit.convert import convert
    from edgekit.convert.flatten import flatten_model
    from edgekit.data import load_dataset
    from edgekit.photos import train_tutorial_model, tutorial_model, write_photo_folder

    work = Path(tempfile.mkdtemp(prefix="bench-models-"))
    photos = write_photo_folder(work / "photos", per_class=args.per_class)
    data = load_dataset(str(photos))
    model = train_tutorial_model(tutorial_model(data.num_classes), data.x_train, data.y_train)
    print(f"photos: {len(data.x_train)} train / {len(data.x_test)} test, {data.num_classes} classes; "
          f"model {model.name}: {model.count_params():,} parameters")

    before = _coverage_before(model)
    from edgekit.convert import quantize as q

    flat = flatten_model(model)
    after_raw = q.coverage(flat, {n: f"{c} is not supported" for n, c in q.unsupported_layers(flat)}, ["base"])
    bundles = {}
    for mode in ("ptq", "qat"):
        out = work / mode
        convert(model, data, mode=mode, output=out, epochs=args.qat_epochs, progress=False, report=True,
                runtimes=available_runtimes(include_tensorflow=False) or None)
        bundles[mode] = load_bundle(out)
    after = bundles["qat"].manifest.quantization["qat_coverage"]

    print("\nQAT coverage (parameters / layers under QAT)")
    print(f"  before flattening (tfmot on the nested model):       {100 * before['fraction_parameters']:6.2f}%  "
          f"{before['layers_qat']}/{before['layers']} layers; float: "
          + ", ".join(f"{x['layer']} ({x['parameters']:,})" for x in before["float_layers"]))
    print(f"  flattened, Rescaling kept in the model:              {100 * after_raw['fraction_parameters']:6.2f}%  "
          f"{after_raw['layers_qat']}/{after_raw['layers']} layers; float: "
          + (", ".join(x["layer"] for x in after_raw["float_layers"]) or "none"))
    print(f"  convert --mode qat (flattened, Rescaling moved out): {100 * after['fraction_parameters']:6.2f}%  "
          f"{after['layers_qat']}/{after['layers']} layers; float: "
          + (", ".join(x["layer"] for x in after["float_layers"]) or "none"))

    metrics = {mode: b.manifest.metrics for mode, b in bundles.items()}
    fsize = metrics["ptq"]["size_bytes"]["float_tflite"]
    print("\n| model | top-1 | agreement with float | model.tflite bytes | / float |")
    print("|---|---|---|---|---|")
    print(f"| float | {100 * metrics['ptq']['accuracy_float']:.2f}% | - | {fsize:,} | 1.000 |")
    for mode in ("ptq", "qat"):
        m = metrics[mode]
        size = m["size_bytes"]["int8_tflite"]
        print(f"| {mode} int8 | {100 * m['accuracy_int8']:.2f}% | {100 * m['agreement']:.2f}% | {size:,} | {size / fsize:.3f} |")

    qat_bytes = (bundles["qat"].path / bundles["qat"].manifest.model_file).read_bytes()
    parts = _breakdown(qat_bytes)
    print(f"\nwhere the QAT int8 model's {len(qat_bytes):,} bytes go:")
    for k, v in parts.items():
        print(f"  {k:28} {v:>9,}  {100 * v / len(qat_bytes):5.1f}%")
    weights = int(sum(np.prod(w.shape) for w in flat.weights if "kernel" in w.name))
    print(f"  (the float model's kernels: {weights:,} weights = {4 * weights:,} float bytes; at 1 byte each they would "
          f"be {weights / (fsize):.3f} of the float file)")

    print("\nlatency per inference, median ms (one thread)")
    x = data.model_inputs(data.x_test[:1])[0]
    paths = {"float": None, "ptq": bundles["ptq"].path / "model.tflite", "qat": bundles["qat"].path / "model.tflite"}
    from edgekit.convert.quantize import to_tflite_float
    from edgekit.convert.inputs import resolve

    stripped, _ = resolve(flat, data.preprocessing)
    fpath = work / "float.tflite"
    fpath.write_bytes(to_tflite_float(stripped))
    paths["float"] = fpath
    print(f"{'runtime':16} " + " ".join(f"{n:>10}" for n in paths))
    for rt in available_runtimes(include_tensorflow=True):
        row = []
        for name, path in paths.items():
            try:
                with TFLiteModel.open(path, runtime=rt) as tm:
                    t = tm.time_invoke(x, runs=args.runs, warmup=max(5, args.runs // 10))
                row.append(f"{np.median(t) * 1e3:10.3f}")
            except Exception as exc:  # noqa: BLE001 - a runtime that cannot run one model is shown, not fatal
                row.append(f"{'n/a':>10}")
                print(f"  {rt} {name}: {str(exc).splitlines()[0][:100]}")
        print(f"{rt:16} " + " ".join(row))
    print(f"\nwork directory: {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
