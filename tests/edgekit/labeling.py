"""Helpers for the labeling tests: a store of real digits as the boards flag them, and a small HTTP client."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np

from collecting import LABELS, sample
from device_agent.delivery import protocol

DIGITS = np.load(Path(__file__).resolve().parents[1] / "device_agent" / "data" / "digits-300.npz")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def fill(store, n: int = 24, wrong_every: int = 4) -> Dict[str, Dict[str, Any]]:
    """n real digits as flagged samples; the prediction is the true class except every wrong_every-th.
    Returns {sample_id: {"truth", "predicted", "confidence"}}."""
    out = {}
    for i in range(n):
        truth = int(DIGITS["y"][i])
        pred = (truth + 1) % 10 if i % wrong_every == wrong_every - 1 else truth
        conf = 0.35 + 0.5 * ((i * 7) % n) / n
        p = sample(i, raw=DIGITS["x"][i], index=pred, confidence=round(conf, 3))
        store.put_sample(p, "t")
        out[p["sample_id"]] = {"truth": str(truth), "predicted": str(pred), "confidence": conf}
    return out


def add_series(store, seq: int = 900) -> str:
    """A 1-D input (an audio-like trace) flagged by a board."""
    raw = np.sin(np.linspace(0, 30, 800)).astype(np.float32) * np.linspace(0.2, 1.0, 800, dtype=np.float32)
    p = protocol.sample_payload(device="mic-1", fleet="lab", seq=seq, model={"name": "kws", "version": "3"},
                                prediction={"label": "2", "index": 2, "confidence": 0.4, "margin": 0.05,
                                            "entropy": 1.9, "top_k": [{"label": "2", "index": 2, "score": 0.4}]},
                                reasons=["low_margin"], raw=raw, source={"file": "clip.npy"})
    store.put_sample(p, "t")
    return p["sample_id"]


def call(url: str, path: str, body: Optional[dict] = None, *, headers: Optional[Dict[str, str]] = None,
         json_headers: bool = True) -> Tuple[int, Any]:
    """(status, decoded JSON or bytes) of one request to the labeling server."""
    h = {"Content-Type": "application/json", "X-Edgekit": "1"} if (body is not None and json_headers) else {}
    h.update(headers or {})
    base = url.split("?")[0].rstrip("/")
    req = urllib.request.Request(base + path, data=None if body is None else json.dumps(body).encode(), headers=h,
                                 method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as res:
            status, data, ctype = res.status, res.read(), res.headers.get("Content-Type", "")
    except urllib.error.HTTPError as err:
        status, data, ctype = err.code, err.read(), err.headers.get("Content-Type", "")
    return status, (json.loads(data) if "json" in ctype else data)


def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


__all__ = ["DIGITS", "LABELS", "CHROMIUM", "CHROMIUM_ARGS", "fill", "add_series", "call", "wait_for"]
