"""Measure what distillation and pruning cost and buy, judged by what a board downloads and runs.

Distillation (issue 9 goal: the distilled student within 1 point of the teacher at <= 1/4 of its parameters, or
the figure reached): the example model (the digits CNN; MobileNetV2 alpha 0.35 for images of 32x32 and more) is
the teacher; the built-in ``tiny`` student (a quarter of the filters; MobileNetV2 alpha 0.1) is trained alone
(the control) and distilled, from the same initial weights, for the same epochs (``edgekit.convert.distill``).
All three are converted to int8 the same way (``--mode``) and measured float and int8: top-1, macro F1,
parameters, model.tflite bytes, the bundle archive a board downloads, latency per runtime.

Pruning (50% and 75% unstructured, and 2x4): the teacher converted without and with ``--prune``; accuracy change,
sparsity in the int8 model, model.tflite raw / gzip / the download, latency per runtime. A float TFLite of the 75%
pruned model converted with the converter's sparse encoding (``EXPERIMENTAL_SPARSITY``) shows the only case where
TFLite stores zeros compactly, and whether any runtime runs it faster.

Latency: one thread, every model in turn per runtime (side by side, so each sees the same machine), through
device_agent's TFLiteModel: every runtime in .venv, plus tflite_runtime 2.14 from .venv-tflite in a subprocess
(it needs numpy < 2), as bench/bench_convert.py does.

    .venv/bin/python bench/bench_shrink.py [--data digits|NPZ|IMAGE_FOLDER] [--teacher MODEL] [--teacher-epochs 30] [--epochs 60]
                                           [--mode qat] [--runs 1000] [--skip-distill] [--skip-prune]
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TFLITE_VENV = ROOT / ".venv-tflite" / "bin" / "python"

_TIMER = """
import json, sys, numpy as np
from device_agent.inference.interpreter import TFLiteModel
x = np.load(sys.argv[1]); runs = int(sys.argv[2]); out = {}
for path in sys.argv[3:]:
    try:
        with TFLiteModel.open(path, runtime="tflite_runtime") as m:
            t = m.time_invoke(x, runs=runs, warmup=max(5, runs // 10))
        out[path] = [float(np.median(t)), float(np.percentile(t, 95))]
    except Exception as exc:
        out[path] = str(exc).splitlines()[0][:120]
print(json.dumps(out))
"""


def _gzip(b: bytes) -> int:
    return len(gzip.compress(b, compresslevel=9, mtime=0))


def _latency(paths: Dict[str, Path], x: np.ndarray, runs: int) -> Dict[str, Dict[str, object]]:
    """{runtime: {variant: median ms | error}} for every runtime, each variant in turn."""
    from device_agent.inference.interpreter import TFLiteModel, available_runtimes

    out: Dict[str, Dict[str, object]] = {}
    for rt in available_runtimes(include_tensorflow=True):
        out[rt] = {}
        for name, path in paths.items():
            try:
                with TFLiteModel.open(path, runtime=rt) as m:
                    t = m.time_invoke(x, runs=runs, warmup=max(5, runs // 10))
                out[rt][name] = 1e3 * float(np.median(t))
            except Exception as exc:  # noqa: BLE001 - reported, not fatal
                out[rt][name] = f"error: {str(exc).splitlines()[0][:80]}"
    if TFLITE_VENV.exists():
        with tempfile.TemporaryDirectory() as tmp:
            np.save(Path(tmp) / "x.npy", x)
            proc = subprocess.run([str(TFLITE_VENV), "-c", _TIMER, str(Path(tmp) / "x.npy"), str(runs)]
                                  + [str(p) for p in paths.values()], capture_output=True, text=True, cwd=ROOT)
        if proc.returncode == 0:
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            out["tflite_runtime (.venv-tflite)"] = {
                name: (1e3 * res[str(p)][0] if isinstance(res[str(p)], list) else f"error: {res[str(p)]}")
                for name, p in paths.items()
            }
        else:
            print(f"tflite_runtime timing failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
    return out


def _print_latency(lat: Dict[str, Dict[str, object]], names: List[str], ref: Optional[str] = None) -> None:
    width = max(12, *(len(n) for n in names))
    print(f"{'runtime':30} " + " ".join(f"{n:>{width}}" for n in names))
    for rt, row in lat.items():
        cells = []
        for n in names:
            v = row.get(n)
            if isinstance(v, float):
                r = row.get(ref) if ref else None
                cells.append(f"{v:.4f}" + (f" ({v / r:.2f}x)" if isinstance(r, float) and n != ref else ""))
            else:
                cells.append(str(v)[:width])
        print(f"{rt:30} " + " ".join(f"{c:>{width}}" for c in cells))


def _accuracy(path: Path, data) -> float:
    from device_agent.inference.interpreter import TFLiteModel

    with TFLiteModel.open(path) as m:
        pred = m.predict(data.model_inputs(data.x_test)).argmax(axis=1)
    return float(np.mean(pred == data.y_test))


def distillation(data, args, work: Path) -> Tuple[dict, object]:
    from device_agent.delivery.protocol import pack_bundle
    from edgekit.convert import convert
    from edgekit.convert.distill import distill
    from edgekit.convert.quantize import to_tflite_float

    t0 = time.perf_counter()
    res = distill(args.teacher or "example", data, output=work / "distilled", student="tiny", mode=args.mode, epochs=args.epochs,
                  teacher_epochs=args.teacher_epochs, qat_epochs=args.qat_epochs, temperature=args.temperature,
                  alpha=args.alpha, progress=False, runtimes=["ai_edge_litert"], seed=args.seed)
    seconds = time.perf_counter() - t0
    bundles = {"distilled": work / "distilled"}
    for role, model in (("teacher", res.teacher_model), ("control", res.control_model)):
        convert(model, data, mode=args.mode, output=work / role, epochs=args.qat_epochs, progress=False,
                runtimes=["ai_edge_litert"], report=False, seed=args.seed, name=role)
        bundles[role] = work / role
    rows, paths = [], {}
    models = {"teacher": res.teacher_model, "control": res.control_model, "distilled": res.student_model}
    for role in ("teacher", "control", "distilled"):
        fpath = work / f"{role}-float.tflite"
        fpath.write_bytes(to_tflite_float(models[role]))
        ipath = bundles[role] / "model.tflite"
        paths[f"{role}/float"], paths[f"{role}/int8"] = fpath, ipath
        raw = ipath.read_bytes()
        rows.append({"role": role, "params": int(models[role].count_params()),
                     "float_top1": _accuracy(fpath, data), "int8_top1": _accuracy(ipath, data),
                     "float_bytes": fpath.stat().st_size, "int8_bytes": len(raw), "int8_gzip": _gzip(raw),
                     "download": len(pack_bundle(bundles[role]))})
    x = data.model_inputs(data.x_test[:1])[0]
    lat = _latency(paths, x, args.runs)
    by = {r["role"]: r for r in rows}
    t = by["teacher"]
    print(f"\n== distillation on {data.name}: teacher {res.teacher_model.name} ({t['params']:,} params, "
          f"{'from ' + args.teacher if args.teacher else f'{args.teacher_epochs} epochs'}) -> tiny student {res.student_model.name}, {args.epochs} epochs, "
          f"T={args.temperature:g} alpha={args.alpha:g}, int8 by {args.mode}; {seconds:.0f}s")
    print(f"{'model':10} {'params':>8} {'ratio':>6} {'float top-1':>11} {'int8 top-1':>10} {'vs teacher':>10} "
          f"{'float B':>9} {'int8 B':>8} {'gzip B':>8} {'download':>9}")
    for r in rows:
        print(f"{r['role']:10} {r['params']:>8,} {t['params'] / r['params']:>5.1f}x {100 * r['float_top1']:>10.2f}% "
              f"{100 * r['int8_top1']:>9.2f}% {100 * (r['int8_top1'] - t['float_top1']):>+9.2f}p "
              f"{r['float_bytes']:>9,} {r['int8_bytes']:>8,} {r['int8_gzip']:>8,} {r['download']:>9,}")
    d, c = by["distilled"], by["control"]
    print(f"distilled minus control: float {100 * (d['float_top1'] - c['float_top1']):+.2f} points, "
          f"int8 {100 * (d['int8_top1'] - c['int8_top1']):+.2f} points; distilled int8 minus teacher float: "
          f"{100 * (d['int8_top1'] - t['float_top1']):+.2f} points at 1/{t['params'] / d['params']:.1f} of the parameters "
          f"(goal: within 1 point at <= 1/4: {'met' if d['int8_top1'] - t['float_top1'] >= -0.01 and d['params'] * 4 <= t['params'] else 'NOT met'})")
    print("\nlatency, median ms per inference (x = / teacher float)")
    _print_latency(lat, list(paths), ref="teacher/float")
    return {"seconds": seconds, "rows": rows, "latency_ms": lat, "temperature": args.temperature, "alpha": args.alpha,
            "epochs": args.epochs, "teacher_epochs": args.teacher_epochs}, res.teacher_model


def pruning(data, model, args, work: Path) -> dict:
    from device_agent.delivery.protocol import pack_bundle
    from edgekit._keras import tf
    from edgekit.convert import convert
    from edgekit.convert.load import load_model
    from edgekit.convert.prune import PruneSpec
    from edgekit.convert.prune_measure import tflite_weights

    variants = {"unpruned": None, "prune 50%": PruneSpec(0.5, epochs=args.prune_epochs),
                "prune 75%": PruneSpec(0.75, epochs=args.prune_epochs),
                "prune 2x4": PruneSpec(structure="2x4", epochs=args.prune_epochs)}
    rows, paths = [], {}
    for name, spec in variants.items():
        out = work / name.replace(" ", "-").replace("%", "")
        t0 = time.perf_counter()
        r = convert(model, data, mode=args.mode, output=out, epochs=args.qat_epochs, progress=False, prune=spec,
                    runtimes=["ai_edge_litert"], report=False, seed=args.seed, name=out.name)
        raw = (out / "model.tflite").read_bytes()
        ws = tflite_weights(raw)
        total = sum(w.size for w in ws)
        rows.append({"variant": name, "int8_top1": r.report.int8.accuracy, "float_top1": r.report.float.accuracy,
                     "sparsity_int8": sum(w.zeros * w.size for w in ws) / max(1, total), "tflite": len(raw),
                     "gzip": _gzip(raw), "download": len(pack_bundle(out)), "seconds": time.perf_counter() - t0})
        paths[name] = out / "model.tflite"
    # the only compact storage of zeros TFLite has: the converter's sparse encoding, for float models
    pruned_float = load_model(work / "prune-75" / "float_model.keras")
    conv = tf.lite.TFLiteConverter.from_keras_model(pruned_float)
    conv.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
    sparse = bytes(conv.convert())
    dense = bytes(tf.lite.TFLiteConverter.from_keras_model(pruned_float).convert())
    (work / "float75-sparse.tflite").write_bytes(sparse)
    (work / "float75-dense.tflite").write_bytes(dense)
    paths["float 75% dense"] = work / "float75-dense.tflite"
    paths["float 75% sparse-enc"] = work / "float75-sparse.tflite"
    floats = [{"variant": "float 75% dense", "tflite": len(dense), "gzip": _gzip(dense),
               "top1": _accuracy(paths["float 75% dense"], data)},
              {"variant": "float 75% sparse-enc", "tflite": len(sparse), "gzip": _gzip(sparse),
               "top1": _accuracy(paths["float 75% sparse-enc"], data)}]
    x = data.model_inputs(data.x_test[:1])[0]
    lat = _latency(paths, x, args.runs)
    base = rows[0]
    print(f"\n== pruning on {data.name}: {model.name} ({model.count_params():,} params), int8 by {args.mode}, "
          f"{args.prune_epochs} pruning epochs")
    print(f"{'variant':11} {'int8 top-1':>10} {'change':>8} {'zeros':>6} {'tflite B':>9} {'gzip B':>8} {'download':>9} "
          f"{'download/unpruned':>17} {'convert s':>9}")
    for r in rows:
        print(f"{r['variant']:11} {100 * r['int8_top1']:>9.2f}% {100 * (r['int8_top1'] - base['int8_top1']):>+7.2f}p "
              f"{100 * r['sparsity_int8']:>5.1f}% {r['tflite']:>9,} {r['gzip']:>8,} {r['download']:>9,} "
              f"{r['download'] / base['download']:>16.2f}x {r['seconds']:>9.0f}")
    for f in floats:
        print(f"{f['variant']:21} float top-1 {100 * f['top1']:.2f}%  tflite {f['tflite']:,} B  gzip {f['gzip']:,} B")
    print("\nlatency, median ms per inference (x = / unpruned int8)")
    _print_latency(lat, list(paths), ref="unpruned")
    return {"rows": rows, "float_sparse_encoding": floats, "latency_ms": lat, "prune_epochs": args.prune_epochs}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="distillation and pruning: accuracy, bytes a board downloads, latency")
    parser.add_argument("--data", default="digits", help="'digits', an .npz or an image folder (default digits)")
    parser.add_argument("--teacher", metavar="MODEL", help="a Keras model file as the teacher (default: the example model, "
                                                             "trained --teacher-epochs)")
    parser.add_argument("--mode", choices=("qat", "ptq"), default="qat")
    parser.add_argument("--teacher-epochs", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=60, help="student epochs (distilled and alone)")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--qat-epochs", type=int, default=3)
    parser.add_argument("--prune-epochs", type=int, default=4)
    parser.add_argument("--runs", type=int, default=1000, help="invokes per latency measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-distill", action="store_true")
    parser.add_argument("--skip-prune", action="store_true")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "bench_shrink.json")
    args = parser.parse_args(argv)

    from edgekit.data import load_dataset
    from edgekit.models import digits_cnn, train

    data = load_dataset(args.data, seed=args.seed)
    print(f"{data.name}: {len(data.x_train)} train / {len(data.x_test)} test inputs of shape {list(data.input_shape)}, "
          f"{data.num_classes} classes (one test input = {100 / len(data.x_test):.2f} points)")
    work = Path(tempfile.mkdtemp(prefix="bench-shrink-"))
    result: Dict[str, object] = {"data": data.name, "test_size": len(data.x_test), "mode": args.mode}
    teacher = None
    if not args.skip_distill:
        result["distillation"], teacher = distillation(data, args, work)
    if not args.skip_prune:
        if teacher is None and args.teacher:
            from edgekit.convert.load import load_model

            teacher = load_model(args.teacher)
        if teacher is None:
            from edgekit.convert.distill import _mobilenet

            image = len(data.input_shape) == 3 and min(data.input_shape[:2]) >= 32
            teacher = _mobilenet(data, 0.35, args.seed) if image else digits_cnn(data.num_classes, data.input_shape, args.seed)
            train(teacher, data, args.teacher_epochs, seed=args.seed, progress=False)
        result["pruning"] = pruning(data, teacher, args, work)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\nwritten: {args.json}  (bundles in {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
