"""Canary and shadow rollouts judged by numbers (``edgekit fleet push --canary``, ``edgekit fleet rollout``).

A rollout sends a candidate bundle to a *cohort* first: ``N`` boards or ``P%`` of the fleet, chosen
deterministically (the boards sorted by sha256(candidate archive sha256 + device id): the same
candidate and fleet give the same cohort, another candidate another one), and recorded in a small JSON
file. With ``shadow`` the cohort runs the candidate beside its current model on the same inputs (the
current model still decides) and reports agreement, confidence and latency of both (telemetry
``shadow``); without it the cohort installs the candidate, which goes through the board's probation.

:func:`judge` reads the cohort's latest status and telemetry and gives a verdict (docs/rollout.md):

- a board **failed** when its retained status names the candidate's archive in ``last_update_archive``
  (refused, failed its probation, or dropped from a shadow run), or its shadow error rate is past the
  limit; it **succeeded** when it ran the candidate past its probation (canary) or for
  ``min_board_inferences`` shadow inferences within limits;
- **abort** when, after ``abort_min`` boards tried (succeeded + failed), failed / tried > ``abort_rate``
  (AWS IoT Jobs' abort criteria); or when the Wilson score *lower* bound of the pooled disagreement
  (one-sided, ``confidence``) is above ``max_disagreement``: the candidate is worse for sure; or when the
  median over the boards tried of p95(candidate) / max(p95(current), ``latency_floor_ms``) is above
  ``max_latency_ratio`` (a median: one busy board's stalls are not a slower model);
- **promote** when every cohort board succeeded and, with shadow, at least ``min_inferences`` pooled
  shadow inferences give a one-sided Wilson *upper* bound on disagreement at or below ``max_disagreement``;
- else **wait**, with what is missing.

With labelled samples (``--store``; :mod:`edgekit.fleet.labelled`) both models' accuracy on them is reported, and
the rollout is **aborted** when the one-sided exact McNemar test on the discordant pairs says the candidate is
worse (p < ``mcnemar_alpha``) on at least ``min_labelled`` samples.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from device_agent.delivery import protocol

from ..errors import BrokerError, EdgekitError

__all__ = ["Rule", "BoardReport", "Verdict", "RolloutState", "wilson_bounds", "choose_cohort", "judge", "observe",
           "DEFAULT_STATE", "FORMAT"]

log = logging.getLogger(__name__)

FORMAT = "edgekit-rollout/1"
DEFAULT_STATE = "edgekit-rollout.json"
_MAX_MESSAGE = 1 << 20  # a telemetry or status message above this is ignored unread


# -- statistics --------------------------------------------------------------
def wilson_bounds(k: int, n: int, confidence: float = 0.95, *, one_sided: bool = True) -> Tuple[float, float]:
    """The Wilson score interval of a binomial proportion ``k / n``.

    ``one_sided``: each bound alone holds with probability ``confidence`` (z = Phi^-1(confidence), 1.645 at
    95%); else the two together do (z = Phi^-1(1 - (1 - confidence) / 2), 1.960 at 95%). ``n = 0`` gives (0, 1).
    """
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= k <= n:
        raise ValueError(f"k={k} must be within [0, n={n}]")
    if not 0.5 < confidence < 1:
        raise ValueError(f"confidence={confidence} must be within (0.5, 1)")
    z = statistics.NormalDist().inv_cdf(confidence if one_sided else 1 - (1 - confidence) / 2)
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def choose_cohort(devices: Sequence[str], size: str, seed: str) -> List[str]:
    """``size`` boards (``"N"`` or ``"P%"``, at least one) of ``devices``: those with the smallest
    sha256(seed/device). The same seed and devices give the same cohort, whatever their order."""
    devices = sorted(dict.fromkeys(devices))
    if not devices:
        raise EdgekitError("no devices to choose a canary cohort from; name them with --device or --all-devices")
    text = str(size).strip()
    try:
        if text.endswith("%"):
            pct = float(text[:-1])
            if not 0 < pct <= 100:
                raise ValueError
            k = max(1, math.ceil(pct / 100 * len(devices)))
        else:
            k = int(text)
            if k < 1:
                raise ValueError
    except ValueError:
        raise EdgekitError(f"--canary {size!r} is not a cohort size; use a number of boards (2) or a percentage "
                           "(10%)") from None
    k = min(k, len(devices))
    return sorted(devices, key=lambda d: hashlib.sha256(f"{seed}/{d}".encode()).hexdigest())[:k]


# -- the rule ----------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """The thresholds of the verdict (docs/rollout.md)."""

    max_disagreement: float = 0.05  # shadow: the candidate may change at most this share of the current answers
    confidence: float = 0.95  # one-sided confidence of the Wilson bounds
    min_inferences: int = 300  # shadow: pooled inferences before a promotion
    min_board_inferences: int = 50  # shadow: inferences before a board counts as tried
    max_latency_ratio: float = 1.5  # candidate p95 / current p95 (shadow: both on the board, same inputs)
    latency_floor_ms: float = 1.0  # ... taken against at least this p95 (sub-millisecond noise is not a regression)
    max_error_rate: float = 0.01  # shadow: inputs the candidate failed / inputs it saw
    abort_rate: float = 0.2  # failed boards / boards tried above this: abort
    abort_min: int = 1  # ... once this many boards tried
    mcnemar_alpha: float = 0.05  # labelled samples: abort when the one-sided exact McNemar p is below this
    min_labelled: int = 30  # ... on at least this many labelled samples (also: fewer from the cohort -> all of them)

    def __post_init__(self) -> None:
        for name, lo, hi in (("max_disagreement", 0, 1), ("confidence", 0.5, 0.9999), ("max_error_rate", 0, 1),
                             ("abort_rate", 0, 1), ("mcnemar_alpha", 0, 1)):
            v = getattr(self, name)
            if not lo <= v <= hi:
                raise EdgekitError(f"rollout rule {name}={v} must be within [{lo}, {hi}]")
        for name in ("min_inferences", "min_board_inferences", "abort_min", "min_labelled"):
            if getattr(self, name) < 0:
                raise EdgekitError(f"rollout rule {name}={getattr(self, name)} must be >= 0")
        if self.max_latency_ratio <= 0 or self.latency_floor_ms < 0:
            raise EdgekitError("rollout rule max_latency_ratio must be > 0 and latency_floor_ms >= 0")

    def describe(self) -> str:
        return (f"abort if failed/tried > {self.abort_rate:g} after {self.abort_min} tried, or the Wilson lower bound "
                f"on disagreement > {self.max_disagreement:g}; promote when every cohort board succeeded"
                f" and, in shadow runs, the one-sided {100 * self.confidence:g}% Wilson upper bound on disagreement "
                f"<= {self.max_disagreement:g} over >= {self.min_inferences} inferences; abort if the median p95 "
                f"ratio over boards > {self.max_latency_ratio:g} (floor {self.latency_floor_ms:g} ms); a board fails "
                f"past error rate {self.max_error_rate:g}; with labelled samples (--store), abort if the one-sided "
                f"exact McNemar p < {self.mcnemar_alpha:g} on >= {self.min_labelled} of them")


# -- the rollout's state file ------------------------------------------------
@dataclass
class RolloutState:
    fleet: str
    candidate: Dict[str, Any]  # name, version, sha256, archive_sha256, path
    cohort: List[str]
    rest: List[str]
    shadow: bool = False
    canary: str = ""
    previous: Optional[str] = None  # the bundle directory an abort pushes back (canary without shadow)
    phase: str = "canary"  # canary | promoted | aborted
    started: float = 0.0
    history: List[Dict[str, Any]] = field(default_factory=list)

    def note(self, action: str, why: str) -> None:
        self.history.append({"ts": protocol.now(), "action": action, "why": why})

    def save(self, path: Any) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps({"format": FORMAT, **asdict(self)}, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, p)
        return p

    @classmethod
    def load(cls, path: Any) -> "RolloutState":
        p = Path(path)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise EdgekitError(f"no rollout at {p}; start one with `edgekit fleet push BUNDLE --canary N` "
                               "(or pass --state PATH)") from None
        except (OSError, ValueError) as exc:
            raise EdgekitError(f"rollout state {p} cannot be read ({exc}); fix or remove it") from exc
        if not isinstance(data, dict) or data.pop("format", None) != FORMAT:
            raise EdgekitError(f"rollout state {p} is not an {FORMAT} file")
        try:
            return cls(**data)
        except TypeError as exc:
            raise EdgekitError(f"rollout state {p} is malformed ({exc})") from exc


# -- what the boards say -----------------------------------------------------
def _num(v: Any) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _count(v: Any) -> int:
    return int(v) if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 53 else 0


def _model_is(model: Any, candidate: Mapping[str, Any]) -> bool:
    return isinstance(model, dict) and all(model.get(k) == candidate.get(k) for k in ("name", "version", "sha256"))


@dataclass
class BoardReport:
    device: str
    outcome: str  # silent | waiting | running | succeeded | failed
    why: str = ""
    inferences: int = 0  # shadow: candidate inferences; canary: inferences on the candidate's probation
    disagree: int = 0
    errors: int = 0
    latency_p95_ms: Optional[float] = None
    current_p95_ms: Optional[float] = None
    low_confidence_rate: Optional[float] = None
    current_low_confidence_rate: Optional[float] = None
    confidence_mean: Optional[float] = None
    current_confidence_mean: Optional[float] = None

    @property
    def latency_ratio(self) -> Optional[float]:
        if self.latency_p95_ms is None or not self.current_p95_ms:
            return None
        return self.latency_p95_ms / self.current_p95_ms


def board_report(device: str, status: Optional[Mapping[str, Any]], telemetry: Optional[Mapping[str, Any]],
                 rollout: RolloutState, rule: Rule) -> BoardReport:
    """One board's outcome with the candidate, from its latest retained status and telemetry (untrusted: every
    field is type-checked; anything odd reads as missing)."""
    cand = rollout.candidate
    status = status if isinstance(status, dict) else {}
    telemetry = telemetry if isinstance(telemetry, dict) else {}
    if status.get("last_update_archive") == cand["archive_sha256"]:
        return BoardReport(device, "failed", str(status.get("last_update_error", ""))[:300])
    if not status and not telemetry:
        return BoardReport(device, "silent", "no status or telemetry yet")
    if rollout.shadow:
        sh = telemetry.get("shadow")
        if not isinstance(sh, dict) or sh.get("archive_sha256") != cand["archive_sha256"]:
            return BoardReport(device, "waiting", "not running the candidate as a shadow yet")
        n, agree, errors = _count(sh.get("inferences")), _count(sh.get("agree")), _count(sh.get("errors"))
        agree = min(agree, n)
        lat, cur = sh.get("latency_ms"), sh.get("current_latency_ms")
        r = BoardReport(device, "running", "", n, n - agree, errors,
                        _num(lat.get("p95")) if isinstance(lat, dict) else None,
                        _num(cur.get("p95")) if isinstance(cur, dict) else None,
                        _num(sh.get("low_confidence_rate")), _num(sh.get("current_low_confidence_rate")),
                        _num(sh.get("confidence_mean")), _num(sh.get("current_confidence_mean")))
        if n + errors and errors / (n + errors) > rule.max_error_rate and errors >= 2:
            r.outcome, r.why = "failed", f"error rate {errors}/{n + errors} above {rule.max_error_rate:g}"
        elif n < rule.min_board_inferences:
            r.why = f"{n} of {rule.min_board_inferences} shadow inferences"
        else:
            r.outcome = "succeeded"
        return r
    if not _model_is(telemetry.get("model") or status.get("model"), cand):
        return BoardReport(device, "waiting", "not running the candidate yet")
    prob = telemetry.get("probation")
    if isinstance(prob, dict):
        return BoardReport(device, "running", "on probation", _count(prob.get("inferences")), 0,
                           _count(prob.get("errors")), _num(prob.get("latency_p95_ms")),
                           _num(prob.get("baseline_p95_ms")))
    if not telemetry or not _model_is(telemetry.get("model"), cand):
        return BoardReport(device, "running", "no telemetry from the candidate yet")
    lat = telemetry.get("latency_ms")
    return BoardReport(device, "succeeded", "passed its probation", _count(telemetry.get("inferences")), 0, 0,
                       _num(lat.get("p95")) if isinstance(lat, dict) else None, None,
                       _num(telemetry.get("low_confidence_rate")))


@dataclass
class Verdict:
    decision: str  # promote | abort | wait
    reasons: List[str]
    boards: List[BoardReport]
    figures: Dict[str, Any]

    def to_dict(self) -> Dict[str, Any]:
        return {"decision": self.decision, "reasons": self.reasons, "figures": self.figures,
                "boards": [dict(asdict(b), latency_ratio=b.latency_ratio) for b in self.boards]}


def judge(rollout: RolloutState, statuses: Mapping[str, Any], telemetry: Mapping[str, Any], rule: Rule,
          labelled: Any = None) -> Verdict:
    """The verdict on the cohort (module docstring: the rule). ``labelled``: a
    :class:`edgekit.fleet.labelled.Labelled` (both models on labelled samples), or None."""
    boards = [board_report(d, statuses.get(d), telemetry.get(d), rollout, rule) for d in rollout.cohort]
    failed = [b for b in boards if b.outcome == "failed"]
    ok = [b for b in boards if b.outcome == "succeeded"]
    tried = len(failed) + len(ok)
    n = sum(b.inferences for b in boards if b.outcome in ("succeeded", "running", "failed")) if rollout.shadow else 0
    d = sum(b.disagree for b in boards) if rollout.shadow else 0
    lo, hi = wilson_bounds(d, n, rule.confidence)
    ratios = [b.latency_p95_ms / max(b.current_p95_ms, rule.latency_floor_ms) for b in ok
              if b.latency_p95_ms is not None and b.current_p95_ms is not None
              and max(b.current_p95_ms, rule.latency_floor_ms) > 0]
    median_ratio = statistics.median(ratios) if ratios else None
    figures: Dict[str, Any] = {
        "cohort": len(boards), "tried": tried, "succeeded": len(ok), "failed": len(failed),
        "failed_rate": round(len(failed) / tried, 4) if tried else None,
        "inferences": n, "disagree": d, "disagreement": round(d / n, 6) if n else None,
        "disagreement_lower": round(lo, 6) if n else None, "disagreement_upper": round(hi, 6) if n else None,
        "latency_ratio_median": round(median_ratio, 3) if median_ratio is not None else None,
        "errors": sum(b.errors for b in boards), "rule": rule.describe(),
        "labelled": labelled.to_dict() if labelled is not None else None,
    }
    reasons: List[str] = []
    seen = [labelled.describe()] if labelled is not None else []
    if labelled is not None and labelled.n >= max(1, rule.min_labelled) and labelled.p_worse < rule.mcnemar_alpha:
        reasons.append(f"the candidate is worse on labelled samples: {labelled.describe()} < {rule.mcnemar_alpha:g}")
        seen = []
    if tried >= max(1, rule.abort_min) and len(failed) / tried > rule.abort_rate:
        reasons.append(f"{len(failed)} of {tried} boards tried failed ({100 * len(failed) / tried:.0f}% > "
                       f"{100 * rule.abort_rate:g}%): " + "; ".join(f"{b.device}: {b.why}" for b in failed))
    if median_ratio is not None and len(ratios) >= max(1, rule.abort_min) and median_ratio > rule.max_latency_ratio:
        reasons.append(f"the median p95 latency ratio over {len(ratios)} boards, {median_ratio:.2f} (candidate / "
                       f"max(current, {rule.latency_floor_ms:g} ms)), is above {rule.max_latency_ratio:g}")
    if rollout.shadow and n and lo > rule.max_disagreement:
        reasons.append(f"disagreement {d}/{n} = {d / n:.3f}: its {100 * rule.confidence:g}% Wilson lower bound "
                       f"{lo:.3f} is above the limit {rule.max_disagreement:g}")
    if reasons:
        return Verdict("abort", reasons + seen, boards, figures)
    if labelled is not None and labelled.n < max(1, rule.min_labelled):
        seen = [labelled.describe() + f" (fewer than {rule.min_labelled}: not judged)"]
    waiting = [b for b in boards if b.outcome != "succeeded"]
    if waiting:
        reasons.append(f"{len(waiting)} of {len(boards)} cohort boards not through yet: "
                       + "; ".join(f"{b.device}: {b.outcome} ({b.why})" for b in waiting[:10]))
    if rollout.shadow:
        if n < rule.min_inferences:
            reasons.append(f"{n} of {rule.min_inferences} shadow inferences pooled")
        elif hi > rule.max_disagreement:
            reasons.append(f"disagreement {d}/{n}: its Wilson upper bound {hi:.3f} is still above "
                           f"{rule.max_disagreement:g}; more inferences will tell")
    if reasons:
        return Verdict("wait", reasons + seen, boards, figures)
    why = f"all {len(boards)} cohort boards succeeded"
    if rollout.shadow:
        why += (f"; disagreement {d}/{n} = {d / n:.4f}, {100 * rule.confidence:g}% Wilson upper bound {hi:.4f} <= "
                f"{rule.max_disagreement:g}")
    return Verdict("promote", [why] + seen, boards, figures)


# -- the broker --------------------------------------------------------------
def observe(broker_url: str, fleet: str, devices: Sequence[str], *, wait_s: float = 10.0, ask: bool = True,
            protocol_version: str = "5", ca_file: Optional[str] = None, cert_file: Optional[str] = None,
            key_file: Optional[str] = None, timeout: float = 30.0) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """The latest retained status and telemetry of ``devices``: ``(statuses, telemetry)`` by device.

    With ``ask``, each board is sent ``send_telemetry`` first; returns once every device has answered
    with telemetry (and its status is in) or after ``wait_s``.
    """
    from .client import start_client

    wanted = set(devices)
    topics = {k: protocol.subscription(fleet, k) for k in ("status", "telemetry")}
    statuses: Dict[str, Any] = {}
    tele: Dict[str, Any] = {}
    lock = threading.Lock()
    subscribed = threading.Event()
    refused: List[str] = []

    def on_connect(client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            refused.append(str(reason_code))
            subscribed.set()
            return
        client.subscribe([(topics["status"], 1), (topics["telemetry"], 0)])

    def on_message(client, userdata, msg):
        if len(msg.payload) > _MAX_MESSAGE:
            return
        try:
            where = protocol.parse_topic(msg.topic)
            obj = json.loads(msg.payload)
        except (ValueError, protocol.ProtocolError, RecursionError):
            return
        if where["device"] not in wanted or not isinstance(obj, dict) or obj.get("device") != where["device"]:
            return
        with lock:
            (statuses if where["kind"] == "status" else tele)[where["device"]] = obj

    client, broker = start_client(broker_url, "rollout", protocol_version=protocol_version, ca_file=ca_file,
                                  cert_file=cert_file, key_file=key_file, on_connect=on_connect,
                                  on_message=on_message, on_subscribe=lambda *a: subscribed.set())
    try:
        if not subscribed.wait(timeout) or refused:
            raise BrokerError(f"broker {broker.redacted()} refused the rollout's subscription: "
                              f"{refused[0] if refused else 'no answer'}; check the URL and credentials")
        if ask:
            cmd = json.dumps({"schema": "edgekit.cmd/1", "cmd": "send_telemetry", "id": "rollout"}).encode()
            for d in wanted:
                client.publish(protocol.topic(fleet, d, "cmd"), cmd, qos=1)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            with lock:
                if wanted <= set(tele) and wanted <= set(statuses):
                    break
            time.sleep(0.05)
        with lock:
            return dict(statuses), dict(tele)
    finally:
        client.disconnect()
        client.loop_stop()
