"""What the store hands back: frozen records of samples and devices."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import numpy as np

__all__ = ["SampleRecord", "DeviceRecord"]


@dataclass(frozen=True)
class SampleRecord:
    """One flagged input as stored, with its human label once someone gave it."""

    sample_id: str
    device: str
    fleet: str
    seq: int
    ts: float
    received_at: float
    model_name: str
    model_version: str
    model_sha256: str
    label_pred: str
    pred_index: int
    confidence: float
    margin: float
    entropy: float
    reasons: Tuple[str, ...]
    top_k: Tuple[Dict[str, Any], ...]
    source: Dict[str, Any]
    input_dtype: str
    input_shape: Tuple[int, ...]
    input_data: bytes = field(repr=False)
    label: Optional[str] = None
    labeled_by: Optional[str] = None
    labeled_at: Optional[float] = None
    label_version: int = 0  # bumped by every change of the label (see store.labeling)

    def array(self) -> np.ndarray:
        """The input exactly as the board sent it (dtype and shape kept)."""
        return np.frombuffer(self.input_data, dtype=np.dtype(self.input_dtype)).reshape(self.input_shape)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready view without the input bytes (``samples list --json``)."""
        return {
            "sample_id": self.sample_id,
            "device": self.device,
            "fleet": self.fleet,
            "seq": self.seq,
            "ts": self.ts,
            "received_at": self.received_at,
            "model": {"name": self.model_name, "version": self.model_version, "sha256": self.model_sha256},
            "label_pred": self.label_pred,
            "pred_index": self.pred_index,
            "confidence": self.confidence,
            "margin": self.margin,
            "entropy": self.entropy,
            "reasons": list(self.reasons),
            "source": self.source,
            "input": {"dtype": self.input_dtype, "shape": list(self.input_shape)},
            "label": self.label,
            "labeled_by": self.labeled_by,
            "labeled_at": self.labeled_at,
            "label_version": self.label_version,
        }


@dataclass(frozen=True)
class DeviceRecord:
    """The latest that the store knows of one board (``edgekit fleet status``)."""

    fleet: str
    device: str
    last_seen: Optional[float]
    state: Optional[str]
    state_ts: Optional[float]
    model_name: Optional[str]
    model_version: Optional[str]
    samples: int
    telemetry: Dict[str, Any]
    telemetry_ts: Optional[float]

    def online(self, now: float, stale_after_s: float) -> bool:
        """Online when its retained status says so and it was heard from recently."""
        return self.state == "online" and self.last_seen is not None and now - self.last_seen <= stale_after_s

    @property
    def inferences(self) -> Optional[int]:
        return self.telemetry.get("inferences")

    @property
    def low_confidence_rate(self) -> Optional[float]:
        return self.telemetry.get("low_confidence_rate")

    @property
    def outbox_depth(self) -> Optional[int]:
        return (self.telemetry.get("outbox") or {}).get("depth")

    @property
    def dropped(self) -> Optional[int]:
        return (self.telemetry.get("outbox") or {}).get("dropped")

    @property
    def temperature_c(self) -> Optional[float]:
        return self.telemetry.get("temperature_c")

    def to_dict(self, now: float, stale_after_s: float) -> Dict[str, Any]:
        return {
            "fleet": self.fleet,
            "device": self.device,
            "last_seen": self.last_seen,
            "online": self.online(now, stale_after_s),
            "state": self.state,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "samples": self.samples,
            "inferences": self.inferences,
            "low_confidence_rate": self.low_confidence_rate,
            "outbox_depth": self.outbox_depth,
            "dropped": self.dropped,
            "temperature_c": self.temperature_c,
        }


def loads(text: Optional[str], default: Any) -> Any:
    return json.loads(text) if text else default
