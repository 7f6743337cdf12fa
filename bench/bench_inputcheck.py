"""What the input check (device_agent/inference/inputcheck.py) costs a board per inference.

The board's code only (device_agent, no TensorFlow): runs in the device environments.

* ``check``: one call of the check on its own: a well-formed uint8 picture (one dtype comparison), a float32
  picture in 0..1 fed to the same uint8 bundle (min, max), and a 96 x 96 x 3 float32 picture;
* ``step``: :meth:`Agent.step` on the digits test bundle (8 x 8 uint8: the lookup-table fast path, where the
  inference itself costs a few microseconds and any added cost shows most), with the check and with the check
  replaced by a function returning None, in alternating rounds of the same process; the ratio is printed.
  Thresholds 0 (nothing flagged, no outbox writes) and no result file: the loop's own work only.

    .venv-device/bin/python bench/bench_inputcheck.py [--n 3000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from device_agent.agent import Agent  # noqa: E402
from device_agent.config import load_config  # noqa: E402
from device_agent.inference.inputcheck import InputCheck  # noqa: E402
from device_agent.sources import ArraySource  # noqa: E402
from device_agent.update.manifest import load_bundle  # noqa: E402

DATA = ROOT / "tests" / "device_agent" / "data"


def per_call_ns(fn, arg, number=20000, repeat=5) -> float:
    return min(timeit.repeat(lambda: fn(arg), number=number, repeat=repeat)) / number * 1e9


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=3000, help="inputs per round")
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()

    m = load_bundle(DATA / "digits-bundle").manifest
    check = InputCheck(m.preprocessing, m.reference)
    with np.load(DATA / "digits-300.npz") as d:
        x = d["x"]
    print("check alone (best of 5, per call; an empty function's call for scale):")
    print(f"  empty call (lambda raw: None)   {per_call_ns(lambda raw: None, x[0]):8.0f} ns")
    print(f"  uint8 8x8x1 (well-formed)       {per_call_ns(check, x[0]):8.0f} ns")
    print(f"  float32 8x8x1 in 0..1 (scaled)  {per_call_ns(check, x[0] / np.float32(255)):8.0f} ns")
    fits = check.expected
    loop_test = min(timeit.repeat(lambda: None if x[0].dtype is fits else check(x[0]), number=200000, repeat=5))
    empty = min(timeit.repeat(lambda: None, number=200000, repeat=5))
    added = (loop_test - empty) / 200000 * 1e9
    print(f"  the loop's test for uint8 (what Agent.step adds for a well-formed input): {added:.0f} ns")
    big = np.random.default_rng(0).random((96, 96, 3), dtype=np.float32)
    print(f"  float32 96x96x3 in 0..1         {per_call_ns(check, big, number=2000):8.0f} ns")

    inputs = [x[i % len(x)] for i in range(args.n)]
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(None, bundle=str(DATA / "digits-bundle"), broker="", device_id="bench", fleet="bench",
                             outbox={"path": f"{tmp}/outbox.sqlite"}, results={"path": ""},
                             policy={"random_fraction": 0.0, "confidence_threshold": 0.0, "margin_threshold": 0.0})
        with Agent(config, source=ArraySource(inputs)) as agent:
            real = agent._check
            times = {"with check": [], "without": []}
            for r in range(args.rounds):
                for name in (("with check", "without") if r % 2 == 0 else ("without", "with check")):
                    agent._check = real if name == "with check" else (lambda raw: None)
                    agent._fits = real.expected if name == "with check" else None
                    t0 = time.perf_counter()
                    for i, raw in enumerate(inputs):
                        agent.step({"uri": "bench", "index": i}, raw)
                    times[name].append((time.perf_counter() - t0) / len(inputs) * 1e6)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"Agent.step on the digits bundle, uint8 8x8 (median of {args.rounds} rounds of {args.n}):")
    for k, v in med.items():
        print(f"  {k:<11} {v:8.2f} us per inference   rounds: {', '.join(f'{t:.2f}' for t in times[k])}")
    print(f"  ratio with/without: {med['with check'] / med['without']:.3f} (round-to-round spread on this machine: "
          f"{min(min(v) for v in times.values()):.0f}..{max(max(v) for v in times.values()):.0f} us)")
    print(f"  the loop's test is {added / 1e3 / med['without'] * 100:.3f}% of a step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
