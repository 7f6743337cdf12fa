"""Measure the converter on the digits example CNN: size, accuracy cost, latency, int8 vs float.

Goals (issue 3): int8 size <= 0.30x the float TFLite size; QAT int8 top-1 within
0.5 points of float; PTQ within 1.5 points; int8 vs float latency per runtime
installed, the ratio printed whichever way it goes. Latency is measured side by
side in one run, through device_agent's TFLiteModel (one thread), on every
runtime in this environment, plus tflite_runtime from .venv-tflite when that
environment exists (a subprocess, since tflite-runtime needs numpy < 2).

    .venv/bin/python bench/bench_convert.py [--epochs 20] [--runs 2000] [--json bench/out/bench_convert.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TFLITE_VENV = ROOT / ".venv-tflite" / "bin" / "python"

_TIMER = """
import json, sys, numpy as np
from device_agent.inference.interpreter import TFLiteModel
x = np.load(sys.argv[1]); out = {}
for name, path in (("float", sys.argv[2]), ("int8", sys.argv[3])):
    with TFLiteModel.open(path, runtime="tflite_runtime") as m:
        t = m.time_invoke(x, runs=int(sys.argv[4]), warmup=50)
    out[name] = [float(np.median(t)), float(np.percentile(t, 95))]
print(json.dumps(out))
"""


def _time(path: Path, runtime: str, x: np.ndarray, runs: int) -> tuple[float, float]:
    from device_agent.inference.interpreter import TFLiteModel

    with TFLiteModel.open(path, runtime=runtime) as m:
        t = m.time_invoke(x, runs=runs, warmup=50)
    return float(np.median(t)), float(np.percentile(t, 95))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="int8 converter benchmark on the digits example CNN")
    parser.add_argument("--epochs", type=int, default=20, help="float training epochs")
    parser.add_argument("--qat-epochs", type=int, default=3)
    parser.add_argument("--runs", type=int, default=2000, help="invokes per latency measurement")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "bench_convert.json")
    args = parser.parse_args(argv)

    from device_agent.inference.interpreter import available_runtimes
    from edgekit.convert import convert
    from edgekit.data import load_dataset
    from edgekit.models import digits_cnn, train
    from edgekit.convert.quantize import to_tflite_float

    data = load_dataset("digits")
    model = digits_cnn()
    t0 = time.perf_counter()
    train(model, data, args.epochs, progress=False)
    train_s = time.perf_counter() - t0
    params = model.count_params()
    work = Path(tempfile.mkdtemp(prefix="bench-convert-"))
    float_path = work / "float.tflite"
    float_path.write_bytes(to_tflite_float(model))
    runtimes = available_runtimes(include_tensorflow=True)
    results = {}
    for mode in ("ptq", "qat"):
        t0 = time.perf_counter()
        r = convert(model, data, mode=mode, output=work / mode, epochs=args.qat_epochs, progress=False,
                    runtimes=runtimes, report=False)
        results[mode] = {"convert_s": time.perf_counter() - t0, "report": r.report, "path": work / mode / "model.tflite"}
    float_acc = results["ptq"]["report"].float.accuracy
    float_size = float_path.stat().st_size
    x = data.model_inputs(data.x_test[:1])[0]

    rows = []
    print(f"\ndigits example CNN: {params:,} parameters, trained {args.epochs} epochs in {train_s:.1f}s; "
          f"test split {len(data.y_test)} inputs; float top-1 {100 * float_acc:.2f}%\n")
    print(f"{'mode':5} {'int8 bytes':>10} {'float bytes':>11} {'size ratio':>10} {'goal':>6} "
          f"{'int8 top-1':>10} {'delta pts':>9} {'goal':>6} {'agreement':>9} {'convert s':>9}")
    for mode, goal in (("ptq", -1.5), ("qat", -0.5)):
        rep = results[mode]["report"]
        size = results[mode]["path"].stat().st_size
        delta = 100 * (rep.int8.accuracy - float_acc)
        ratio = size / float_size
        rows.append({"mode": mode, "int8_bytes": size, "float_tflite_bytes": float_size, "size_ratio": ratio,
                     "int8_top1": rep.int8.accuracy, "float_top1": float_acc, "delta_points": delta,
                     "agreement": rep.agreement, "convert_s": results[mode]["convert_s"],
                     "size_goal_met": ratio <= 0.30, "accuracy_goal_met": delta >= goal})
        print(f"{mode:5} {size:>10,} {float_size:>11,} {ratio:>10.3f} {'<=0.30':>6} {100 * rep.int8.accuracy:>9.2f}% "
              f"{delta:>+9.2f} {f'>={goal}':>6} {100 * rep.agreement:>8.2f}% {results[mode]['convert_s']:>9.1f}")

    latency = []
    print(f"\nlatency per inference, 1 thread, {args.runs} invokes each (median / p95, microseconds)")
    print(f"{'runtime':30} {'model':5} {'float':>16} {'int8':>16} {'int8/float':>10}")
    for mode in ("ptq", "qat"):
        for rt in runtimes:
            f = _time(float_path, rt, x, args.runs)
            q = _time(results[mode]["path"], rt, x, args.runs)
            latency.append({"runtime": rt, "model": mode, "float_s": f, "int8_s": q, "ratio": q[0] / f[0]})
        if TFLITE_VENV.exists():
            np.save(work / "x.npy", x)
            proc = subprocess.run([str(TFLITE_VENV), "-c", _TIMER, str(work / "x.npy"), str(float_path),
                                   str(results[mode]["path"]), str(args.runs)], capture_output=True, text=True, cwd=ROOT)
            if proc.returncode == 0:
                out = json.loads(proc.stdout.strip().splitlines()[-1])
                latency.append({"runtime": "tflite_runtime (.venv-tflite)", "model": mode, "float_s": out["float"],
                                "int8_s": out["int8"], "ratio": out["int8"][0] / out["float"][0]})
            else:
                print(f"tflite_runtime timing failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
    for row in latency:
        f, q = row["float_s"], row["int8_s"]
        print(f"{row['runtime']:30} {row['model']:5} {1e6 * f[0]:>7.1f} / {1e6 * f[1]:>6.1f} "
              f"{1e6 * q[0]:>7.1f} / {1e6 * q[1]:>6.1f} {row['ratio']:>9.2f}x")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"params": params, "float_top1": float_acc, "conversion": rows, "latency": latency,
                                     "runs": args.runs}, indent=2) + "\n")
    print(f"\nwritten: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
