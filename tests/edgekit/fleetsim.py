"""A simulated fleet for rollout tests and bench/bench_rollout.py: real agents (device_agent.Agent, real
interpreters) in threads of one process, each classifying the 300 digits over and over on a real broker."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List

import numpy as np

from device_agent.agent import Agent
from device_agent.config import load_config
from device_agent.sources import Source

DATA = Path(__file__).resolve().parents[1] / "device_agent" / "data"
BUNDLE, V2 = DATA / "digits-bundle", DATA / "digits-bundle-v2"


class Endless(Source):
    """The digits over and over, one every ``period_s`` (a camera that never stops)."""

    def __init__(self, x: np.ndarray, period_s: float, offset: int = 0):
        self.x, self.period_s, self.offset = x, period_s, offset

    def items(self, stop: threading.Event) -> Iterator:
        i = self.offset
        while not stop.is_set():
            yield {"uri": "sim", "index": i}, self.x[i % len(self.x)]
            i += 1
            end = time.monotonic() + self.period_s
            while time.monotonic() < end and not stop.is_set():
                yield None
                time.sleep(min(0.01, self.period_s))


class Fleet:
    """``n`` boards ``pi-0`` ... on ``broker_url``, fleet ``lab``, each its own state dir under ``root``."""

    def __init__(self, broker_url: str, root: Path, n: int, *, period_s: float = 0.01, **update):
        with np.load(DATA / "digits-300.npz") as d:
            x = d["x"]
        self.devices = [f"pi-{i}" for i in range(n)]
        self.agents: Dict[str, Agent] = {}
        self.stop = threading.Event()
        self.threads: List[threading.Thread] = []
        for i, dev in enumerate(self.devices):
            home = root / dev
            config = load_config(
                None, bundle=str(BUNDLE), broker=broker_url, device_id=dev, fleet="lab",
                mqtt={"ack": "broker", "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
                telemetry={"period_s": 1.0}, outbox={"path": str(home / "outbox.sqlite"), "drain_timeout_s": 5.0},
                results={"path": ""}, update={"commit_after": 10, **update},
            )
            self.agents[dev] = Agent(config, source=Endless(x, period_s, offset=37 * i))
        for agent in self.agents.values():
            t = threading.Thread(target=agent.run, args=(self.stop,), daemon=True)
            t.start()
            self.threads.append(t)

    def running(self, device: str) -> str:
        m = self.agents[device].manifest
        return m.version

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)
        for agent in self.agents.values():
            agent.close()
