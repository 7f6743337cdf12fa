"""Where the agent's loop spends its time: cProfile of one ``Agent.run`` over an array source.

Runs in a device environment (no TensorFlow), against the local Mosquitto, ``[mqtt].ack = "broker"``
(no collector needed), results to a file, as bench/bench_agent.py does:

    .venv-device/bin/python bench/profile_agent.py [--bundle digits|mnv2] [--policy manifest|typical|all]
        [--n 10000] [--top 25] [--out prof.out]

Prints the total, the microseconds per inference, and the top functions by own time (tottime) and by
cumulative time. ``mnv2`` is the bundle bench/bench_agent.py builds in bench/out/ (run it once first).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BUNDLES = {"digits": ROOT / "tests" / "device_agent" / "data" / "digits-bundle",
           "mnv2": ROOT / "bench" / "out" / "mnv2-035-96-bundle"}
POLICIES = {"typical": {"confidence_threshold": 0.0, "margin_threshold": 0.0, "random_fraction": 0.05, "seed": 0},
            "all": {"random_fraction": 1.0}, "manifest": {}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default="digits", choices=sorted(BUNDLES))
    ap.add_argument("--policy", default="manifest", choices=sorted(POLICIES))
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runtime", default="auto")
    ap.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", help="also dump the raw profile here")
    ap.add_argument("--no-cprofile", action="store_true",
                    help="time the run only (to run under a sampling profiler: py-spy record -- python ...)")
    args = ap.parse_args()

    import numpy as np

    from device_agent.agent import Agent
    from device_agent.config import load_config
    from device_agent.inference.interpreter import available_runtimes
    from device_agent.sources import ArraySource
    from device_agent.update.manifest import load_bundle

    bundle = BUNDLES[args.bundle]
    runtime = available_runtimes()[0] if args.runtime == "auto" else args.runtime
    if args.bundle == "digits":
        stream = ROOT / "bench" / "out" / "digits-stream.npz"  # bench_agent.py section 2 writes it: no repeats
        with np.load(stream if stream.exists() else BUNDLES["digits"].parent / "digits-300.npz") as d:
            xs = np.concatenate([d["x"]] * (args.n // len(d["x"]) + 1))[:args.n]
    else:
        shape = load_bundle(bundle).manifest.preprocessing.shape
        xs = np.random.default_rng(1).integers(0, 256, size=(args.n, *shape), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        def run(tag: str, n: int, prof=None) -> tuple:
            config = load_config(None, bundle=str(bundle), broker=args.broker, device_id=f"prof-{tag}", fleet="bench",
                                 runtime={"name": runtime, "threads": args.threads},
                                 outbox={"path": f"{tmp}/outbox-{tag}.sqlite", "drain_timeout_s": 60.0},
                                 mqtt={"ack": "broker"}, results={"path": f"{tmp}/results-{tag}.jsonl"},
                                 policy={"dedupe": False, **POLICIES[args.policy]}, telemetry={"period_s": 5.0})
            with Agent(config, source=ArraySource(xs[:n])) as agent:
                t0 = time.perf_counter()
                if prof is not None:
                    prof.enable()
                stats = agent.run()
                if prof is not None:
                    prof.disable()
                return time.perf_counter() - t0, stats

        run("warm", min(200, args.n))
        prof = None if args.no_cprofile else cProfile.Profile()
        wall, stats = run("prof", args.n, prof)
    print(f"{args.bundle}, policy {args.policy}, {runtime}, {args.threads} thread(s): {stats.inferences} inferences, "
          f"{stats.flagged} flagged, {wall:.2f} s{'' if prof is None else ' under cProfile'} = "
          f"{wall / args.n * 1e6:.1f} us per inference")
    if prof is None:
        return 0
    for key in ("tottime", "cumulative"):
        s = io.StringIO()
        st = pstats.Stats(prof, stream=s).sort_stats(key)
        st.print_stats(args.top)
        print(f"-- by {key}")
        print("\n".join(line for line in s.getvalue().splitlines() if line.strip() and "function calls" not in line
                        and not line.startswith(("Ordered by", "   List reduced"))))
    if args.out:
        prof.dump_stats(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
