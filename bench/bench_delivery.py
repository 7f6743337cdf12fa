"""End-to-end acknowledgement: what it costs the board, and what it saves in a flood. One run, side by side.

1. The board's cost. The agent (in .venv-device, no TensorFlow) classifies --n digits and sends the
   flagged ones through a private Mosquitto to a real collector writing into SQLite, once with
   ``[mqtt].ack = "broker"`` (a sample leaves the outbox on its PUBACK) and once with ``"collector"``
   (it leaves on the collector's edgekit.ack/1, after its commit), alternating, best of --rounds.
   inputs/s = inputs / seconds from the agent's start to an empty outbox (every flagged sample
   delivered; with acks that includes the collector's commit); with every input flagged (the worst
   case for acks) that is samples/s. Also the loop's own rate (until the last input is classified),
   the drain after it, and the agent process's CPU time per input. Two policies: every input
   flagged, and the bundle's own thresholds (a few per thousand on these digits).
2. The flood ledger. --boards agents flag --flood-n inputs each into a Mosquitto with its default
   queue limits (max_queued_messages 1000) while another connection holds the collector's SQLite store
   write-locked until every board has sent everything once, then 0.1 s in every 0.15 s. Both modes:
   flagged, sent (PUBACKs, resends included), resent, acknowledged, stored, dropped for room, lost.

    .venv/bin/python bench/bench_delivery.py [--n 5000] [--rounds 3] [--boards 3] [--flood-n 2000]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
DIGITS = ROOT / "tests" / "device_agent" / "data" / "digits-bundle"
DIGITS_X = ROOT / "tests" / "device_agent" / "data" / "digits-300.npz"
DEVICE_PY = ROOT / ".venv-device" / "bin" / "python"
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "tests"))  # tests/broker.py: a private Mosquitto on a free port

FLAG_ALL = {"random_fraction": 1.0, "dedupe": False}


def inputs(path: Path, n: int) -> Path:
    import numpy as np

    with np.load(DIGITS_X) as d:
        x = d["x"]
    np.savez(path, x=np.concatenate([x] * (n // len(x) + 1))[:n])
    return path


def agent_config(tmp: Path, name: str, broker: str, source: Path, ack: str, policy: dict, **mqtt):
    from device_agent.config import load_config

    return load_config(
        None, bundle=str(DIGITS), source=str(source), broker=broker, device_id=name, fleet="bench",
        results="", runtime="ai_edge_litert", outbox={"path": str(tmp / f"{name}.sqlite"), "drain_timeout_s": 600.0},
        policy=policy, telemetry={"period_s": 30.0}, mqtt={"ack": ack, "ack_timeout_s": 5.0, **mqtt},
    )


# ---------------------------------------------------------------------------
# 1. The board's cost (worker: runs in .venv-device)
def worker_cost(broker: str, tmp: str, name: str, ack: str, policy: str, source: str) -> dict:
    from device_agent.agent import Agent

    config = agent_config(Path(tmp), name, broker, Path(source), ack, FLAG_ALL if policy == "all" else {})
    wall0, cpu0 = time.perf_counter(), time.process_time()
    marks = {}
    with Agent(config) as agent:
        drain = agent.drain

        def timed_drain(timeout):  # the loop has classified every input; now only delivery is left
            marks["loop_s"] = time.perf_counter() - wall0
            return drain(timeout)

        agent.drain = timed_drain
        stats = agent.run()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {"flagged": stats.flagged, "published": stats.published, "pending": stats.pending,
            "resent": stats.resent, "wall_s": wall, "loop_s": marks["loop_s"], "cpu_s": cpu}


def cost(n: int, rounds: int) -> list:
    from broker import Mosquitto
    from edgekit.loop.collect import Collector
    from edgekit.loop.store import open_store

    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        source = inputs(tmp / "inputs.npz", n)
        broker = Mosquitto(tmp / "mosquitto").start()
        try:
            with open_store(f"sqlite:///{tmp}/samples.db") as store:
                collector = Collector(broker.url, store, fleet="bench", client_id="bench-collector").start()
                try:
                    for policy in ("all", "manifest"):
                        best = {}
                        for r in range(rounds):
                            for ack in ("broker", "collector"):  # alternate: the machine's noise hits both
                                name = f"{policy}-{ack}-{r}"
                                out = subprocess.run(
                                    [str(DEVICE_PY), __file__, "--worker", broker.url, str(tmp), name, ack, policy,
                                     str(source)], capture_output=True, text=True, cwd=ROOT, timeout=1800)
                                if out.returncode != 0:
                                    raise RuntimeError(f"worker {name} failed:\n{out.stderr[-3000:]}")
                                res = json.loads(out.stdout.strip().splitlines()[-1])
                                if res["pending"] or res["published"] != res["flagged"]:
                                    raise RuntimeError(f"worker {name} did not deliver everything: {res}")
                                collector.wait_idle(0.5, timeout=60)
                                stored = sum(1 for s in store.list_samples(device=name))
                                if stored != res["flagged"]:
                                    raise RuntimeError(f"{name}: {res['flagged']} flagged, {stored} stored")
                                b = best.get(ack)
                                if b is None or res["wall_s"] < b["wall_s"]:
                                    best[ack] = res
                        for ack in ("broker", "collector"):
                            r = best[ack]
                            rows.append({"policy": policy, "ack": ack, "flagged": r["flagged"], "n": n,
                                         "inputs_per_s": n / r["wall_s"],
                                         "loop_inputs_per_s": n / r["loop_s"],
                                         "drain_s": r["wall_s"] - r["loop_s"],
                                         "cpu_us_per_input": r["cpu_s"] / n * 1e6,
                                         "wall_s": r["wall_s"], "cpu_s": r["cpu_s"], "resent": r["resent"]})
                finally:
                    collector.stop()
        finally:
            broker.stop()
    return rows


# ---------------------------------------------------------------------------
# 2. The flood ledger
class StoreLock:
    def __init__(self, path: Path, hold_s: float = 0.1, period_s: float = 0.15):
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("BEGIN IMMEDIATE")
        self.hold_s, self.period_s = hold_s, period_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._on_and_off, daemon=True)

    def release_first_hold(self) -> None:
        self.db.execute("COMMIT")
        self.thread.start()

    def _on_and_off(self) -> None:
        while not self.stop.wait(self.period_s - self.hold_s):
            self.db.execute("BEGIN IMMEDIATE")
            self.stop.wait(self.hold_s)
            self.db.execute("COMMIT")

    def close(self) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(5)
        self.db.close()


def flood(ack: str, boards: int, n: int) -> dict:
    from broker import Mosquitto
    from device_agent.agent import Agent
    from edgekit.loop.collect import Collector
    from edgekit.loop.store import open_store

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        source = inputs(tmp / "inputs.npz", n)
        broker = Mosquitto(tmp / "mosquitto", max_queued=None, extra_conf="log_type notice\n").start()
        t0 = time.monotonic()
        try:
            db = tmp / "samples.db"
            with open_store(f"sqlite:///{db}") as store:
                lock = StoreLock(db)
                collector = Collector(broker.url, store, fleet="bench", client_id="flood-collector").start()
                agents, runs = [], {}
                try:
                    agents = [Agent(agent_config(tmp, f"pi-{i}", broker.url, source, ack, FLAG_ALL, max_unacked=2000))
                              for i in range(boards)]
                    threads = [threading.Thread(target=lambda a=a: runs.setdefault(a.device, a.run())) for a in agents]
                    for t in threads:
                        t.start()
                    deadline = time.monotonic() + 600
                    while not all(a.publisher.sent >= n for a in agents) and time.monotonic() < deadline:
                        time.sleep(0.05)
                    lock.release_first_hold()
                    for t in threads:
                        t.join(1800)
                    if ack == "broker":  # the boards are done at the last PUBACK: let the collector finish
                        collector.wait_idle(3.0, timeout=120)
                finally:
                    for a in agents:
                        a.close()
                    lock.close()
                    collector.stop()
                stored = store.count_samples()
            log = (tmp / "mosquitto" / "mosquitto.log").read_text(errors="replace")
        finally:
            broker.stop()
    stats = list(runs.values())
    flagged = sum(s.flagged for s in stats)
    dropped = sum(s.dropped for s in stats)
    return {"ack": ack, "boards": boards, "flagged": flagged, "sent": sum(s.sent for s in stats),
            "resent": sum(s.resent for s in stats), "acked": sum(s.published for s in stats) if ack == "collector" else 0,
            "stored": stored, "dropped": dropped, "lost": flagged - stored - dropped,
            "broker_dropped": "Outgoing messages are being dropped" in log, "seconds": time.monotonic() - t0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=5000, help="inputs per cost run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--boards", type=int, default=3)
    p.add_argument("--flood-n", type=int, default=2000, help="inputs per board in the flood (all flagged)")
    p.add_argument("--json", default=str(OUT / "bench_delivery.json"))
    p.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker_cost(*args.worker)))
        return 0
    logging.basicConfig(level=logging.ERROR)
    if not DEVICE_PY.exists():
        print(f"{DEVICE_PY} is missing: make device-env", file=sys.stderr)
        return 1
    OUT.mkdir(parents=True, exist_ok=True)
    report = {}

    print(f"== 1. the board's cost of end-to-end acks: digits, {args.n} inputs, ai_edge_litert, a private Mosquitto,"
          f" a collector into SQLite; best of {args.rounds}, alternating")
    print("   inputs/s: from the agent's start until every flagged sample is delivered (policy all: = samples/s);"
          " loop: until the last input is classified; drain: the wait for the last deliveries after that")
    print(f"{'policy':<10}{'ack':<11}{'flagged':>8}{'inputs/s':>10}{'loop inputs/s':>15}{'drain s':>9}"
          f"{'CPU us/input':>14}{'resent':>8}")
    report["cost"] = rows = cost(args.n, args.rounds)
    for r in rows:
        print(f"{r['policy']:<10}{r['ack']:<11}{r['flagged']:>8}{r['inputs_per_s']:>10.0f}{r['loop_inputs_per_s']:>15.0f}"
              f"{r['drain_s']:>9.2f}{r['cpu_us_per_input']:>14.0f}{r['resent']:>8}")
    for policy in ("all", "manifest"):
        b, c = (next(r for r in rows if r["policy"] == policy and r["ack"] == a) for a in ("broker", "collector"))
        print(f"  {policy}: collector / broker: inputs/s {c['inputs_per_s'] / b['inputs_per_s']:.2f}x, "
              f"loop inputs/s {c['loop_inputs_per_s'] / b['loop_inputs_per_s']:.2f}x, "
              f"CPU per input {c['cpu_us_per_input'] / b['cpu_us_per_input']:.2f}x")

    print(f"== 2. flood ledger: {args.boards} boards x {args.flood_n} flagged samples, Mosquitto default queue limits, "
          "collector's store write-locked until every board sent once, then 0.1 s of every 0.15 s")
    print(f"{'ack':<11}{'flagged':>8}{'sent':>7}{'resent':>8}{'acked':>7}{'stored':>8}{'dropped':>8}{'lost':>6}"
          f"{'broker dropped':>16}{'seconds':>9}")
    report["flood"] = []
    for ack in ("broker", "collector"):
        r = flood(ack, args.boards, args.flood_n)
        report["flood"].append(r)
        print(f"{ack:<11}{r['flagged']:>8}{r['sent']:>7}{r['resent']:>8}{r['acked']:>7}{r['stored']:>8}{r['dropped']:>8}"
              f"{r['lost']:>6}{'yes' if r['broker_dropped'] else 'no':>16}{r['seconds']:>9.1f}")

    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
