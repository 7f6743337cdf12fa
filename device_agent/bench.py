"""``edgekit-agent bench``: time a bundle on every installed runtime and thread count, keep the fastest.

int8 is not always fast: tflite-runtime 2.14 ran an int8 MobileNetV2 10x
slower than ai-edge-litert on x86, so the board measures for itself. The
choice is stored as JSON next to the outbox (``AgentConfig.bench_path``);
``[runtime] name = "auto"`` then uses it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from .inference.interpreter import TFLiteModel, available_runtimes

__all__ = ["Timing", "bench_bundle", "save_choice", "load_choice", "choose_runtime"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Timing:
    runtime: str
    threads: int
    mean_ms: float
    p50_ms: float
    p95_ms: float
    runs: int


def bench_bundle(bundle, runs: int = 50, threads: Optional[List[int]] = None,
                 runtimes: Optional[List[str]] = None) -> List[Timing]:
    """One :class:`Timing` per (runtime, threads), fastest first. Input: random values in the model's range."""
    spec_shape = bundle.manifest.input.shape
    rng = np.random.default_rng(0)
    x = rng.uniform(0.0, 1.0, size=spec_shape).astype(np.float32)
    counts = threads or list(range(1, (os.cpu_count() or 1) + 1))
    out: List[Timing] = []
    for runtime in runtimes or available_runtimes():
        for n in counts:
            with TFLiteModel.open(bundle.model_path, runtime, n) as model:
                t = model.time_invoke(x, runs=runs, warmup=max(3, runs // 10)) * 1000.0
            out.append(Timing(runtime, n, round(float(t.mean()), 4), round(float(np.median(t)), 4),
                              round(float(np.percentile(t, 95)), 4), runs))
            log.info("%s threads=%d: %.3f ms", runtime, n, out[-1].p50_ms)
    return sorted(out, key=lambda t: t.p50_ms)


def save_choice(path: os.PathLike | str, best: Timing, sha256: str, all_timings: List[Timing]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({
        "runtime": best.runtime,
        "threads": best.threads,
        "model_sha256": sha256,
        "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "timings": [asdict(t) for t in all_timings],
    }, indent=2) + "\n")
    os.replace(tmp, path)  # never half-written
    return path


def load_choice(path: os.PathLike | str) -> Optional[dict]:
    try:
        data = json.loads(Path(path).read_text())
        return data if isinstance(data, dict) and "runtime" in data and "threads" in data else None
    except (OSError, ValueError):
        return None


def choose_runtime(config) -> Tuple[str, int]:
    """The (runtime, threads) to open: the config's, or for ``auto`` the stored benchmark's choice."""
    rt = config.runtime
    if rt.name != "auto":
        return rt.name, rt.threads
    choice = load_choice(config.bench_path)
    if choice and choice["runtime"] in available_runtimes():
        log.info("runtime auto: %s with %d threads, as measured by `edgekit-agent bench` (%s)",
                 choice["runtime"], choice["threads"], config.bench_path)
        return str(choice["runtime"]), int(choice["threads"])
    return "auto", rt.threads
