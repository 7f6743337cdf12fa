"""How long a canary verdict takes on a simulated fleet, for a bad and a good candidate.

--boards real agents (device_agent.Agent, real interpreters, threads of one process) classify the test
digits over and over (one input every --period seconds each) on a private Mosquitto. Then, with the real
CLI (`edgekit fleet push --canary --shadow`, `edgekit fleet rollout status --auto --until-decided`):

1. a bad candidate (digits v1 with its labels permuted: the same model and speed, every answer
   another digit's name) to a --canary cohort: time from the push to the ABORT verdict;
2. a good candidate (digits v2, retrained with another seed) to a new cohort: time from the push to the
   PROMOTE verdict, and then until every board of the fleet runs v2 committed (after its probation).

    .venv/bin/python bench/bench_rollout.py [--boards 50] [--canary 10%] [--period 0.05]

The rule is the default one (docs/rollout.md: max disagreement 0.05, one-sided 95% Wilson bounds, abort
rate 0.2), with --min-inferences / --min-board-inferences as given, and --max-latency-ratio 3 (not 1.5):
50 agents sharing one Python process on two cores wait for the GIL and each other inside their timed
spans, and there the candidate's p95 reads 1.3-1.8x the current model's (median over the cohort) even
when it is the very same model (the bad candidate: same model file, labels permuted). With 10 agents the
same ratio read 1.07.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "tests"))  # tests/broker.py: a private Mosquitto on a free port
sys.path.append(str(ROOT / "tests" / "edgekit"))  # fleetsim.py: agents in threads


def _cli(argv):
    from edgekit.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(argv)
    return rc, out.getvalue()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--boards", type=int, default=50)
    p.add_argument("--canary", default="10%")
    p.add_argument("--period", type=float, default=0.05, help="seconds between two inputs on a board")
    p.add_argument("--min-inferences", type=int, default=300)
    p.add_argument("--min-board-inferences", type=int, default=50)
    p.add_argument("--max-latency-ratio", type=float, default=3.0)
    p.add_argument("--timeout", type=float, default=180.0, help="for a verdict, and then for the fleet to run v2")
    args = p.parse_args()

    import logging

    logging.basicConfig(level=logging.ERROR)
    from broker import Mosquitto
    from fleetsim import BUNDLE, V2, Fleet

    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
        tmp = Path(tmp)
        broker = Mosquitto(tmp / "mosquitto").start()
        t0 = time.perf_counter()
        fleet = Fleet(broker.url, tmp / "boards", args.boards, period_s=args.period)
        print(f"{args.boards} agents started in {time.perf_counter() - t0:.1f} s (one input every {args.period} s "
              f"each), cohort {args.canary}, shadow runs")
        try:
            while not all(a.stats.inferences >= 5 for a in fleet.agents.values()):
                time.sleep(0.1)
            devices = [x for d in fleet.devices for x in ("--device", d)]
            bad = tmp / "permuted"
            import shutil

            shutil.copytree(BUNDLE, bad)
            m = json.loads((bad / "manifest.json").read_text())
            m["version"], m["labels"] = "1-permuted", m["labels"][1:] + m["labels"][:1]
            (bad / "manifest.json").write_text(json.dumps(m))
            rows = []
            for name, bundle, state in (("bad (labels permuted)", bad, tmp / "bad.json"),
                                        ("good (digits v2)", V2, tmp / "good.json")):
                t_push = time.perf_counter()
                rc, _ = _cli(["fleet", "push", str(bundle), "--broker", broker.url, "--fleet", "lab", *devices,
                              "--canary", args.canary, "--shadow", "--allow-unsigned", "--state", str(state)])
                pushed = time.perf_counter() - t_push
                assert rc == 0, "push failed"
                rc, out = _cli(["fleet", "rollout", "status", "--broker", broker.url, "--state", str(state), "--auto",
                                "--until-decided", str(args.timeout), "--max-latency-ratio", str(args.max_latency_ratio),
                                "--min-inferences", str(args.min_inferences),
                                "--min-board-inferences", str(args.min_board_inferences), "--wait", "5"])
                verdict_s = time.perf_counter() - t_push
                verdict = next(line for line in out.splitlines() if line.startswith("verdict:"))
                cohort = next(line for line in out.splitlines() if line.startswith("cohort:"))
                fleet_s, where = None, ""
                if "PROMOTE" in verdict:
                    t_fleet = time.perf_counter()
                    while time.perf_counter() - t_fleet < args.timeout:
                        cur = [a.updater.state.current for a in fleet.agents.values()]
                        if all(c is not None and c.committed and c.version == "2" for c in cur):
                            fleet_s = time.perf_counter() - t_push
                            break
                        time.sleep(0.2)
                    cur = [a.updater.state.current for a in fleet.agents.values()]
                    where = (f"fleet: {sum(bool(c and c.committed and c.version == '2') for c in cur)} of "
                             f"{len(cur)} boards run v2 committed, "
                             f"{sum(bool(c and not c.committed and c.version == '2') for c in cur)} on probation, "
                             f"{sum(a.rollbacks for a in fleet.agents.values())} probation rollbacks: "
                             + "; ".join(a.last_update_error[:120] for a in fleet.agents.values()
                                         if a.last_update_error)[:600])
                rows.append((name, pushed, verdict_s, fleet_s, verdict, cohort, where))
        finally:
            fleet.close()
            broker.stop()
    print(f"{'candidate':24} {'push s':>7} {'verdict s':>10} {'fleet on it s':>14}")
    for name, pushed, verdict_s, fleet_s, verdict, cohort, where in rows:
        print(f"{name:24} {pushed:7.2f} {verdict_s:10.2f} {'-' if fleet_s is None else f'{fleet_s:.2f}':>14}")
        print(f"    {verdict[:200]}")
        print(f"    {cohort}")
        if where:
            print(f"    {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
