"""The fleet from the host: what the store knows of each board (``edgekit fleet status``)."""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional

from ..loop.store import Store

__all__ = ["fleet_status", "format_table", "DEFAULT_STALE_AFTER_S"]

DEFAULT_STALE_AFTER_S = 300.0
"""A board whose status says online but that sent nothing for this long counts as offline."""


def fleet_status(store: Store, *, fleet: Optional[str] = None, stale_after_s: float = DEFAULT_STALE_AFTER_S,
                 now: Optional[float] = None) -> List[Dict[str, Any]]:
    """One dict per device: online, last seen, model version, inferences, low-confidence rate,
    outbox depth, dropped samples, temperature, ``drift_psi`` (the confidence PSI of the board's
    latest telemetry ``drift``, docs/agent.md) and ``drift`` (that whole object) — ``None`` where the
    board did not say."""
    now = time.time() if now is None else now
    rows = []
    for d in store.devices():
        if fleet is None or d.fleet == fleet:
            row = d.to_dict(now, stale_after_s)
            drift = d.telemetry.get("drift")
            row["drift"] = drift if isinstance(drift, dict) else None
            psi = row["drift"].get("confidence_psi") if row["drift"] else None
            row["drift_psi"] = psi if isinstance(psi, (int, float)) else None
            rows.append(row)
    return rows


def _age(seconds: Optional[float]) -> str:
    if seconds is None:
        return "never"
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s ago"
    if s < 7200:
        return f"{s // 60}m ago"
    if s < 172800:
        return f"{s // 3600}h ago"
    return f"{s // 86400}d ago"


def _fmt(value: Any, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: List[Dict[str, Any]], now: Optional[float] = None) -> str:
    now = time.time() if now is None else now
    head = ("fleet", "device", "last seen", "state", "model", "inferences", "low-conf", "outbox", "dropped", "temp C",
            "samples", "drift")
    body = [
        (
            r["fleet"], r["device"], _age(None if r["last_seen"] is None else now - r["last_seen"]),
            "online" if r["online"] else "offline", _fmt(r["model_version"]), _fmt(r["inferences"]),
            "-" if r["low_confidence_rate"] is None else f"{100 * r['low_confidence_rate']:.1f}%",
            _fmt(r["outbox_depth"]), _fmt(r["dropped"]), _fmt(r["temperature_c"], ".1f"), str(r["samples"]),
            _fmt(r.get("drift_psi"), ".2f"),
        )
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in (head, *body)]
    return "\n".join(lines)
