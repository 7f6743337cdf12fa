"""The simulated fleet of the rollout tests and bench/bench_rollout.py (edgekit.fleet.sim) on the test digits and
bundles: real agents in threads of one process, each classifying the 300 digits over and over on a real broker."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgekit.fleet import sim
from edgekit.fleet.sim import Endless

DATA = Path(__file__).resolve().parents[1] / "device_agent" / "data"
BUNDLE, V2 = DATA / "digits-bundle", DATA / "digits-bundle-v2"

__all__ = ["DATA", "BUNDLE", "V2", "Endless", "Fleet"]


class Fleet(sim.Fleet):
    """``n`` boards ``pi-0`` ... on ``broker_url``, fleet ``lab``, running digits v1 on the 300 test digits."""

    def __init__(self, broker_url: str, root: Path, n: int, *, period_s: float = 0.01, **update):
        with np.load(DATA / "digits-300.npz") as d:
            x = d["x"]
        super().__init__(broker_url, root, n, bundle=BUNDLE, x=x, period_s=period_s, **update)
