"""What the hardening costs: the trial run of a pushed model, and the limit checks, next to what they guard.

1. Per update: ``Updater.stage`` (unpack, verify, open, run once) with the child-process trial run and
   without it, the trial run alone, and opening the model in-process (what the agent did before).
2. Per message: each limit check next to the parse it guards (the same payload, the same run):
   a command (``parse_cmd`` vs ``json.loads``), a sensor reading as JSON and as ``.npy`` (``decode_reading``
   vs ``json.loads`` + ``np.asarray`` / ``np.load``), a bundle message (``json_depth`` vs ``json.loads``),
   a bundle archive (the checked stream into a directory vs ``tarfile.extractall``) and a manifest.

    .venv/bin/python bench/bench_update.py [--n 10] [--json bench/out/bench_update.json]

Every figure is measured in a device environment (.venv-device: ai-edge-litert, .venv-tflite:
tflite-runtime), in a subprocess, on the digits bundle of the tests (and the MobileNetV2 bundle
bench_agent.py builds, when bench/out/ has it). Medians; on a shared machine, read the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "tests" / "device_agent" / "data" / "digits-bundle"
DIGITS_V2 = ROOT / "tests" / "device_agent" / "data" / "digits-bundle-v2"
MNV2 = ROOT / "bench" / "out" / "mnv2-035-96-bundle"
VENVS = {"ai_edge_litert": ROOT / ".venv-device" / "bin" / "python",
         "tflite_runtime": ROOT / ".venv-tflite" / "bin" / "python"}


def median_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def child(runtime: str, n: int) -> dict:
    """Runs in a device venv: no TensorFlow, no edgekit."""
    sys.path.insert(0, str(ROOT))
    import io
    import tarfile

    import numpy as np

    from device_agent import limits
    from device_agent.delivery import protocol
    from device_agent.inference.interpreter import TFLiteModel
    from device_agent.inference.npy import read_npy
    from device_agent.sources import decode_reading
    from device_agent.update.archive import unpack
    from device_agent.update.manifest import load_bundle
    from device_agent.update.sandbox import trial_run
    from device_agent.update.updater import Updater

    out: dict = {"runtime": runtime, "update": {}, "limits": {}}
    bundles = {"digits": DIGITS_V2}
    if (MNV2 / "manifest.json").exists():
        bundles["mnv2-035-96"] = MNV2
    for name, bundle_dir in bundles.items():
        bundle = load_bundle(bundle_dir)
        payload = json.dumps(protocol.bundle_payload(bundle_dir)).encode()

        def stage(trial: bool) -> None:
            with tempfile.TemporaryDirectory() as tmp:
                updater = Updater(tmp, device="bench", open_model=lambda p: TFLiteModel.open(p, runtime, 1),
                                  check=lambda b, m: m(np.zeros(m.input_spec.shape[1:], np.float32)),
                                  trial=(lambda p, c: trial_run(p, runtime=runtime)) if trial else None)
                result = updater.stage(payload)
                result.model.close()

        def open_in_process() -> None:
            with TFLiteModel.open(bundle.model_path, runtime, 1) as m:
                m(np.zeros(m.input_spec.shape[1:], np.float32))

        out["update"][name] = {
            "stage_with_trial_ms": median_ms(lambda: stage(True), n),
            "stage_without_trial_ms": median_ms(lambda: stage(False), n),
            "trial_run_ms": median_ms(lambda: trial_run(bundle.model_path, runtime=runtime), n),
            "open_in_process_ms": median_ms(open_in_process, n),
        }

    reps = 200
    cmd = json.dumps({"schema": "edgekit.cmd/1", "cmd": "set_thresholds", "args": {"confidence": 0.6}, "id": "c1"}).encode()
    x8 = np.arange(64, dtype=np.uint8).reshape(8, 8, 1)
    reading = json.dumps({"values": x8.reshape(-1).tolist()}).encode()
    big = np.zeros((224, 224, 3), np.uint8)
    buf = io.BytesIO()
    np.save(buf, big)
    npy = buf.getvalue()
    bundle_msg = json.dumps(protocol.bundle_payload(DIGITS_V2)).encode()
    archive = protocol.pack_bundle(DIGITS_V2)

    def per(fn) -> float:  # microseconds per call
        return median_ms(lambda: [fn() for _ in range(reps)], 5) * 1000.0 / reps

    def extract_plain():
        with tempfile.TemporaryDirectory() as tmp, tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            tar.extractall(tmp, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(tmp)

    def extract_checked():
        with tempfile.TemporaryDirectory() as tmp:
            unpack(archive, tmp, what="a", max_total=1 << 26)

    out["limits"] = {
        "cmd (parse_cmd vs json.loads)": (per(lambda: protocol.parse_cmd(cmd)), per(lambda: json.loads(cmd))),
        "sensor JSON 8x8 (decode_reading vs json.loads+asarray)": (
            per(lambda: decode_reading(reading, "uint8", (8, 8, 1))),
            per(lambda: np.asarray(json.loads(reading)["values"], np.float64))),
        "sensor .npy 224x224x3 (read_npy vs np.load)": (
            per(lambda: read_npy(npy, what="r", expected_size=big.size)),
            per(lambda: np.load(io.BytesIO(npy), allow_pickle=False))),
        f"bundle message {len(bundle_msg) // 1024} KiB (json_depth vs json.loads)": (
            per(lambda: limits.json_depth(bundle_msg)), per(lambda: json.loads(bundle_msg))),
        "manifest (load_bundle, every check incl. sha256)": (per(lambda: load_bundle(DIGITS_V2)), None),
        "archive (checked stream vs tarfile.extractall)": (median_ms(extract_checked, 20) * 1000.0,
                                                           median_ms(extract_plain, 20) * 1000.0),
    }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10, help="repeats per update figure")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.n)))
        return 0
    results = []
    for runtime, python in VENVS.items():
        if not python.exists():
            print(f"{runtime}: {python} missing (make device-env tflite-env); skipped")
            continue
        proc = subprocess.run([str(python), __file__, "--child", runtime, "--n", str(args.n)], capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if proc.returncode != 0:
            print(f"{runtime}: failed\n{proc.stderr[-2000:]}")
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print("\nPer update (median ms; on a shared machine, read the ratios)")
    print(f"{'runtime':<16}{'bundle':<14}{'stage+trial':>12}{'stage':>10}{'trial':>10}{'open':>10}{'trial/stage':>13}")
    for r in results:
        for name, u in r["update"].items():
            print(f"{r['runtime']:<16}{name:<14}{u['stage_with_trial_ms']:>12.1f}{u['stage_without_trial_ms']:>10.1f}"
                  f"{u['trial_run_ms']:>10.1f}{u['open_in_process_ms']:>10.1f}"
                  f"{u['stage_with_trial_ms'] / max(u['stage_without_trial_ms'], 1e-9):>12.1f}x")
    print("\nPer message (median us per call: the check, the parse it guards, check/parse)")
    for r in results:
        print(f"[{r['runtime']}]")
        for what, (check, parse) in r["limits"].items():
            ratio = f"{check / parse:>8.2f}x" if parse else f"{'':>9}"
            print(f"  {what:<62}{check:>10.1f}{parse if parse is not None else float('nan'):>10.1f}{ratio}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
