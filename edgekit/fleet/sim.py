"""A simulated fleet: real agents (:class:`device_agent.agent.Agent`, real interpreters) in threads of one
process, each classifying the same images over and over on a real broker. ``edgekit demo --rollout``, the rollout
tests and bench/bench_rollout.py run it."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
from device_agent.sources import Source

__all__ = ["Endless", "Fleet"]


class Endless(Source):
    """The images over and over, one every ``period_s`` (a camera that never stops)."""

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
    """``n`` boards ``pi-0`` ... of ``fleet`` on ``broker_url``, each running ``bundle`` on ``x`` with its own state
    dir under ``root``. ``update`` goes to each board's ``[update]`` config."""

    def __init__(self, broker_url: str, root: Path, n: int, *, bundle: Any, x: np.ndarray, period_s: float = 0.01,
                 fleet: str = "lab", protocol: str = "5", telemetry_s: float = 1.0, **update: Any):
        from device_agent.agent import Agent
        from device_agent.config import load_config

        self.devices = [f"pi-{i}" for i in range(n)]
        self.agents: Dict[str, Agent] = {}
        self.stop = threading.Event()
        self.threads: List[threading.Thread] = []
        self.root = Path(root)
        try:
            for i, dev in enumerate(self.devices):
                home = self.root / dev
                config = load_config(
                    None, bundle=str(bundle), broker=broker_url, device_id=dev, fleet=fleet,
                    mqtt={"ack": "broker", "reconnect_min_s": 0.2, "reconnect_max_s": 1.0, "protocol": protocol},
                    telemetry={"period_s": telemetry_s},
                    outbox={"path": str(home / "outbox.sqlite"), "drain_timeout_s": 5.0},
                    results={"path": ""}, update={"commit_after": 10, **update},
                )
                self.agents[dev] = Agent(config, source=Endless(x, period_s, offset=37 * i))
        except BaseException:
            for agent in self.agents.values():
                agent.close()
            raise
        for agent in self.agents.values():
            t = threading.Thread(target=agent.run, args=(self.stop,), daemon=True)
            t.start()
            self.threads.append(t)

    def running(self, device: str) -> str:
        """The version the board runs."""
        return self.agents[device].manifest.version

    def committed(self, device: str) -> Optional[str]:
        """The version the board committed (past its probation), or None."""
        cur = self.agents[device].updater.state.current
        return self.running(device) if cur is not None and cur.committed else None

    def saw(self, device: str) -> bool:
        """Whether the board ever received a bundle update (its state dir keeps what it staged)."""
        return (self.root / device / "bundles").exists()

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)
        for agent in self.agents.values():
            agent.close()

    def __enter__(self) -> "Fleet":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
