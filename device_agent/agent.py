"""The agent loop: source -> preprocess -> interpreter -> policy -> outbox -> MQTT, plus telemetry.

::

    with Agent(load_config("firmware_configs/rpi-4.toml")) as agent:
        stats = agent.run()          # a finite source: returns once classified and drained

A bad input is logged in one line, counted (telemetry ``errors``) and
skipped; a bad bundle or config stops :class:`Agent` before the interpreter
opens anything.

Model updates (docs/agent.md, "Model updates"): a bundle pushed on
``.../<device>/bundle`` is staged by :class:`~device_agent.update.updater.Updater`
off the loop, and swapped in by :meth:`Agent.service` between two inferences.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import numpy as np

from . import __version__, limits
from .delivery import protocol
from .bench import choose_runtime
from .inference.classify import classify
from .config import AgentConfig
from .sampling.drift import DriftMonitor, channel_means, monitor_for
from .errors import BundleError, ConfigError, InputError, ProtocolError
from .inference.inputcheck import InputCheck
from .inference.interpreter import TFLiteModel, quantize
from .update.manifest import Bundle, load_bundle
from .delivery.outbox import Outbox, Publisher
from .sampling.policy import Decision, Policy
from .inference.preprocess import preprocess
from .results import ResultsWriter
from .sources import MqttSource, Source, open_source
from .telemetry import Stats, Watchdog, machine
from .update.probation import Probation, ProbationLimits
from .update.sandbox import trial_run
from .update.shadow import ShadowStats
from .update.signature import Verifier
from .update.updater import Failed, Staged, Unchanged, Updater

__all__ = ["RunStats", "Agent"]

log = logging.getLogger(__name__)
_DUMPS = json.JSONEncoder(separators=(",", ":")).encode
_MAX_QUEUED_CMDS = 256
_SHADOW_LATENCY_EVERY = 100  # shadow inferences between two latency checks (a p95 of fewer is one stall)


@dataclass(frozen=True)
class RunStats:
    """What one :meth:`Agent.run` did."""

    inferences: int
    flagged: int
    published: int  # samples delivered and deleted from the outbox: acknowledged by the collector ([mqtt].ack)
    dropped: int  # samples dropped because the outbox was full
    errors: Mapping[str, int] = field(default_factory=dict)
    pending: int = 0  # samples left in the outbox for the next start
    skipped: Mapping[str, int] = field(default_factory=dict)  # duplicate / rate_limited
    runtime: str = ""
    sent: int = 0  # publishes the broker acknowledged (PUBACK), resends included
    resent: int = 0  # publishes of a sample sent before: no collector ack in time, or a reconnect
    rejected: int = 0  # samples the broker refused (MQTT 5 reason, e.g. an ACL's "Not authorized"); kept
    input_mismatch: Mapping[str, int] = field(default_factory=dict)  # inputs unlike the bundle's raw inputs, by kind


@dataclass
class _Shadow:
    """A candidate running beside the current model (update/shadow.py)."""

    staged: Staged
    table: Optional[np.ndarray]
    shape: Optional[tuple]
    threshold: float
    stats: ShadowStats


def lookup_table(pre: Any, spec: Any):
    """For uint8 images already at the model's size: raw byte -> quantized model input, computed
    once with the very arithmetic of preprocess() + quantize(), so results are identical."""
    shape = tuple(pre.shape)
    if pre.kind != "image" or not spec.quantized or len(shape) != 3 or int(np.prod(shape)) != int(np.prod(spec.shape)):
        return None, None
    values = np.arange(256, dtype=np.uint8).reshape(256, 1, 1)
    table = quantize(preprocess(values, replace(pre, shape=(256, 1, 1), resize="none")), spec)
    return table.reshape(256), shape


def digest(raw: np.ndarray) -> str:
    raw = np.ascontiguousarray(raw)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{raw.dtype.str}{raw.shape}".encode())
    h.update(raw.tobytes())
    return h.hexdigest()


class Agent:
    """One bundle, one source, one outbox, one broker connection. Use as a context manager."""

    def __init__(self, config: AgentConfig, *, source: Optional[Source] = None):
        self.config = config
        if not config.bundle.path:
            raise ConfigError("config [bundle].path is empty; set it or pass --bundle DIR")
        self.device, self.fleet = config.device.id, config.device.fleet
        self.updater: Optional[Updater] = None
        self.last_update_error: Optional[str] = None
        self.last_update_archive: Optional[str] = None  # the archive last_update_error is about, when known
        self.shadow: Optional[_Shadow] = None
        self.verifier = Verifier.from_config(config)  # None: no trusted keys, any bundle runs (one warning)
        installed = fallback = None
        if config.update.enabled:
            self.updater = Updater(
                config.state_dir, device=self.device, open_model=self._open_like_running,
                check=self._check_update, running=lambda: self.bundle, trial=self._trial_run,
                max_bytes=config.update.max_bytes, keep=config.update.keep,
                max_attempts=config.update.max_attempts, verifier=self.verifier,
            )
            # An uncommitted bundle's attempt is written down before any interpreter opens it (boot counting).
            installed, fallback = self.updater.boot()
        if self.verifier is not None:  # signed by a trusted key, checked before any interpreter opens the model
            installed = self.verifier.screen(installed)
        if installed is None and self.verifier is not None:  # the configured bundle, its signature checked first
            self.bundle = self.verifier.load(config.bundle.path, max_total=8 * config.update.max_bytes)
        else:
            self.bundle = installed or load_bundle(config.bundle.path)  # sha256 checked before any interpreter opens it
        self.manifest = m = self.bundle.manifest
        self.topics = {k: protocol.topic(self.fleet, self.device, k) for k in protocol.KINDS}
        self._closers = []
        self.stats = Stats()
        self._mismatch_warned: set = set()  # kinds of input mismatch warned about (once each)
        try:
            runtime, threads = choose_runtime(config)
            self.model = TFLiteModel.open(self.bundle.model_path, runtime, threads)
            self._closers.append(lambda: self.model.close())
            self.outbox = Outbox(config.outbox_path, max_bytes=config.outbox.max_bytes, sync=config.outbox.sync)
            self._closers.append(self.outbox.close)
            self.policy = Policy(
                config.policy,
                confidence_threshold=m.confidence_threshold,
                margin_threshold=m.margin_threshold,
                seen=self.outbox.seen,
            )
            self.source = source or open_source(
                config.source, m.preprocessing.color, m.preprocessing.raw_dtype, m.preprocessing.shape,
                exact=m.preprocessing.kind == "array" or m.preprocessing.resize == "none",
            )
            self._closers.append(self.source.close)
            self.results = ResultsWriter(config.results.path, on_error=lambda: self.stats.error("results"))
            self._closers.append(self.results.close)
        except BaseException:
            self.close()
            raise
        self._prepare_fast_path()
        self._prepare_drift()
        if fallback:
            self.last_update_error = fallback
            self.stats.error("update")
        self.rollbacks = 0  # bundles that failed their probation in this run
        self.probation: Optional[Probation] = self._probation_for_current(baseline_p95_ms=None)
        self.watchdog = Watchdog()
        self._cmds: "queue.SimpleQueue[bytes]" = queue.SimpleQueue()
        self._telemetry_due = 0.0
        self._dropped_at_start = self.outbox.dropped
        self.link = self.publisher = None
        if config.mqtt.broker:
            from .delivery.mqtt import Link

            self.link = Link(
                config.mqtt,
                client_id=f"edgekit-{self.fleet}-{self.device}",
                will=(self.topics["status"], self._status("offline")),
                on_connect=self._on_connect,
                max_packet_bytes=max(limits.MAX_SENSOR_BYTES, limits.MAX_CMD_BYTES,
                                     protocol.max_bundle_message_bytes(config.update.max_bytes)
                                     if config.update.enabled else 0) + 65536,
                on_error=lambda: self.stats.error("mqtt"),
            )
            self.link.subscribe(self.topics["cmd"], self._offer_cmd)
            if self.updater is not None:
                self.link.subscribe(self.topics["bundle"], self.updater.offer)
            if isinstance(self.source, MqttSource):
                self.link.subscribe(self.source.topic, self.source.offer)
            mq = config.mqtt
            self.publisher = Publisher(self.outbox, self.link, window=mq.max_inflight, ack=mq.ack,
                                       ack_timeout_s=mq.ack_timeout_s, max_unacked=mq.max_unacked,
                                       on_error=self.stats.error)
            if mq.ack == "collector":  # samples leave the outbox when the collector says it has them
                self.link.subscribe(self.topics["ack"], self.publisher.offer_ack)
        if self.updater is not None:
            self._closers.append(self.updater.close)
            self.updater.start()  # first chore: staging directories a crash left behind
        log.info(
            "agent %s/%s: model %s v%s on %s (%d threads), outbox %s holds %d samples",
            self.fleet, self.device, m.name, m.version, self.model.runtime, self.model.num_threads,
            self.outbox.path, self.outbox.depth,
        )

    def _prepare_fast_path(self) -> None:
        self._check = InputCheck(self.manifest.preprocessing, self.manifest.reference)
        self._fits = self._check.expected if self._check.integer else None  # a dtype that needs no look at the values
        self._lut, self._lut_shape = self._lookup_table()
        self._lut_kind = "take"
        if self._lut is not None:
            every = np.arange(256, dtype=np.uint8)
            if self._lut.dtype == np.uint8 and np.array_equal(self._lut, every):
                self._lut_kind = "identity"
            elif self._lut.dtype == np.int8 and np.array_equal(self._lut, (every ^ np.uint8(128)).view(np.int8)):
                self._lut_kind = "xor"

    def _prepare_drift(self) -> None:
        """A fresh drift window against this bundle's ``reference`` (None for bundles without one)."""
        self.drift: Optional[DriftMonitor] = monitor_for(self.manifest.reference)
        c = self.drift.channels if self.drift is not None else None
        last = int(self.model.input_spec.shape[-1]) if len(self.model.input_spec.shape) else 1
        if c is not None and c != 1 and c != last:
            log.warning("bundle %s v%s: reference has %d input channels but the model input %s; drift is off",
                        self.manifest.name, self.manifest.version, c, list(self.model.input_spec.shape))
            self.drift = None
        self._drift_k = self._drift_offset = 0.0
        self._drift_step = 1
        if self._lut is not None:  # the fast path: model input = raw * scale + offset, value by value
            pre, (h, w, _) = self.manifest.preprocessing, self._lut_shape
            # Big images: the mean of every s-th row and column (<= 1024 pixels) costs a few us, all of them 100+.
            s = self._drift_step = max(1, math.ceil(math.sqrt(h * w / 1024)))
            pixels = len(range(0, h, s)) * len(range(0, w, s))
            self._drift_k, self._drift_offset = float(pre.scale) / pixels, float(pre.offset)

    def _feed_drift(self, raw: np.ndarray, x: Optional[np.ndarray], confidence: float) -> None:
        """Per-channel mean of the model input (from the raw bytes on the fast path) and the confidence."""
        drift = self.drift
        c = drift.channels
        if c is None:
            mean: Any = 0.0
        elif x is not None:
            mean = channel_means(x, c)
        else:
            s, k, offset = self._drift_step, self._drift_k, self._drift_offset
            sub = raw[::s, ::s] if s > 1 else raw
            if c == 1:  # up to 256 bytes, Python's sum over the bytes beats a numpy reduction in the loop
                mean = (sum(sub.tobytes()) if sub.size <= 256 else float(sub.sum())) * k + offset
            else:  # one strided sum per channel: far cheaper than a sum over axis 0 of (pixels, c)
                mean = [float(sub[:, :, j].sum()) * k + offset for j in range(c)]
        drift.update(mean, confidence)

    def _lookup_table(self):
        return lookup_table(self.manifest.preprocessing, self.model.input_spec)

    # -- payloads -----------------------------------------------------------
    def _status(self, state: str) -> bytes:
        return _DUMPS(
            protocol.status_payload(
                device=self.device, fleet=self.fleet, state=state, model=self.manifest.model_ref,
                agent_version=__version__, last_update_error=self.last_update_error,
                last_update_archive=self.last_update_archive,
            )
        ).encode()

    def telemetry(self) -> Dict[str, Any]:
        s = self.stats
        return protocol.telemetry_payload(
            device=self.device,
            fleet=self.fleet,
            model=self.manifest.model_ref,
            uptime_s=s.uptime_s,
            inferences=s.inferences,
            outbox={"depth": self.outbox.depth, "bytes": self.outbox.bytes, "dropped": self.outbox.dropped},
            flagged=s.flagged,
            published=self.publisher.published if self.publisher else 0,
            resent=self.publisher.resent if self.publisher else 0,
            rejected=self.publisher.rejected if self.publisher else 0,
            latency_ms=s.latency(),
            low_confidence_rate=s.low_confidence_rate(),
            errors=dict(s.errors),
            skipped=dict(self.policy.skipped),
            input_mismatch=dict(s.input_mismatch),
            runtime=self.model.runtime,
            threads=self.model.num_threads,
            agent_version=__version__,
            drift=self.drift.snapshot().to_dict() if self.drift is not None else None,
            signature=self.verifier.snapshot(self.manifest.sha256) if self.verifier is not None else None,
            probation=self.probation.snapshot() if self.probation is not None else None,
            rollbacks=self.rollbacks,
            shadow=self.shadow.stats.snapshot() if self.shadow is not None else None,
            **machine(self.outbox.path.parent),
        )

    # -- MQTT thread --------------------------------------------------------
    def _on_connect(self) -> None:
        self.link.publish(self.topics["status"], self._status("online"), qos=1, retain=True)
        self._telemetry_due = 0.0

    # -- the loop -----------------------------------------------------------
    def step(self, info: Dict[str, Any], raw: Any) -> Optional[Dict[str, Any]]:
        """Classify one input; flag it into the outbox if the policy says so. Returns the result line."""
        if isinstance(raw, InputError):
            self.stats.error("input")
            log.warning("input %s skipped: %s", info.get("uri"), raw)
            return None
        # A shadow candidate runs before the current model on every other input and after it on the others:
        # neither pays alone for what running second costs (caches, the GIL, a time slice running out).
        ran_early = self.shadow is not None and self.stats.inferences % 2 == 1
        early = self._shadow_run(raw) if ran_early else None
        t0 = time.perf_counter()
        x = None
        # None for well-formed input: for uint8 pictures one identity test, the check itself is not even called
        mismatch = None if raw.dtype is self._fits else self._check(raw)
        try:
            lut = self._lut
            if lut is not None and raw.dtype == np.uint8 and raw.shape == self._lut_shape:
                # Same values as preprocess + quantize, in one lookup (or a bit flip / nothing at all).
                if self._lut_kind == "xor":
                    q = (raw ^ np.uint8(128)).view(np.int8)
                elif self._lut_kind == "identity":
                    q = raw
                else:
                    q = np.take(lut, raw)
                self.model.set_raw_input(q)
                self.model.invoke()
                scores = self.model.output()
            else:
                x = preprocess(raw, self.manifest.preprocessing)
                scores = self.model(x)
        except InputError as exc:  # the bundle's preprocessing refused what the source produced
            self.stats.error("input")
            log.warning("input %s#%s skipped: %s", info.get("uri"), info.get("index"), exc)
            self._probation_error()
            return None
        except (RuntimeError, ValueError) as exc:  # the interpreter refused this input
            self.stats.error("inference")
            log.warning("input %s#%s failed in the interpreter (%s); skipped", info.get("uri"), info.get("index"), exc)
            self._probation_error()
            return None
        except MemoryError:  # one input too big for this board's memory: skip it, the loop goes on
            self.stats.error("input")
            log.warning("input %s#%s needs more memory than this board has; skipped", info.get("uri"),
                        info.get("index"))
            self._probation_error()
            return None
        latency = time.perf_counter() - t0
        if self.probation is not None:
            self.probation.record(latency)
        if mismatch is not None:  # counted once it ran: an input refused above counts in errors.input only
            self._mismatched(mismatch, raw, info)
        m = self.manifest
        pred = classify(scores, m.labels, m.output_activation)
        if self.drift is not None:
            self._feed_drift(raw, x, pred.confidence)
        digests: list = []

        def dig() -> str:  # only hashed when the prediction is a candidate to send
            if not digests:
                digests.append(digest(raw))
            return digests[0]

        if mismatch is None:
            decision = self.policy.decide(pred, dig, time.time())
        else:  # a prediction on an input in the wrong units is not worth a person's label: kept out of the outbox
            reasons = self.policy.reasons(pred)
            decision = Decision(False, reasons, "input_mismatch" if reasons else "")
        self.stats.record(latency, decision.low_confidence)
        if self.shadow is not None:
            self._shadow_record(early if ran_early else self._shadow_run(raw), pred, decision.low_confidence, latency)
        ts = protocol.now()
        sample_id = None
        if decision.flagged:
            sample_id = str(uuid.uuid4())
            seq = self.outbox.next_seq()
            payload = protocol.sample_payload(
                device=self.device, fleet=self.fleet, seq=seq, model=m.model_ref, prediction=pred.to_dict(),
                reasons=decision.reasons, raw=np.asarray(raw), source=info, sample_id=sample_id, ts=ts,
            )
            self.outbox.put(self.topics["samples"], _DUMPS(payload).encode(), sample_id,
                            dig() if self.config.policy.dedupe else None, seq)
            self.stats.flagged += 1
        line = {
            "seq": self.stats.inferences - 1,
            "ts": ts,
            "source": info,
            "label": pred.label,
            "confidence": round(pred.confidence, 6),
            "margin": round(pred.margin, 6),
            "entropy": round(pred.entropy, 6) + 0.0,
            "flagged": decision.flagged,
            "reasons": list(decision.reasons),
            "sample_id": sample_id,
            "model_version": m.version,
        }
        if decision.skipped:
            line["skipped"] = decision.skipped
        if mismatch is not None:
            line["input_mismatch"] = mismatch
        self.results.write(line)
        if self.config.mqtt.publish_predictions and self.link is not None:
            p = protocol.prediction_payload(device=self.device, seq=line["seq"], label=pred.label,
                                            confidence=pred.confidence, sample_id=sample_id, ts=ts)
            self.link.publish(self.topics["predictions"], _DUMPS(p).encode(), qos=0)
        return line

    def _mismatched(self, kind: str, raw: np.ndarray, info: Dict[str, Any]) -> None:
        """Count an input whose dtype or range does not fit the bundle; the first of each kind gets a warning."""
        self.stats.input_mismatch[kind] += 1
        if kind not in self._mismatch_warned:
            self._mismatch_warned.add(kind)
            log.warning("%s", self._check.message(kind, raw, info.get("uri"),
                                                  f"{self.manifest.name} v{self.manifest.version}"))

    def service(self) -> None:
        """Between inferences: publish from the outbox, run commands, send telemetry, feed the watchdog.

        Nothing here ends the loop: an exception is logged in one line and counted (telemetry ``errors``).
        """
        if self.publisher is not None:
            try:
                self.publisher.pump()
            except Exception as exc:  # noqa: BLE001 - e.g. the outbox's disk; the samples stay and go later
                self._failed("outbox", "publishing from the outbox", exc)
            if self.updater is not None and not self.updater.ready.empty():
                try:
                    self._apply_updates()
                except Exception as exc:  # noqa: BLE001
                    self._failed("update", "applying an update", exc)
            while not self._cmds.empty():
                self._command(self._cmds.get_nowait())
            now = time.monotonic()
            if now >= self._telemetry_due and self.link.connected.is_set():
                self._telemetry_due = now + self.config.telemetry.period_s
                try:
                    self.send_telemetry()
                except Exception as exc:  # noqa: BLE001
                    self._failed("telemetry", "sending telemetry", exc)
        if self.probation is not None:
            try:
                self._check_probation()
            except Exception as exc:  # noqa: BLE001
                self._failed("update", "checking the probation of the new bundle", exc)
        self.results.tick()
        self.watchdog.feed()

    def _failed(self, kind: str, doing: str, exc: BaseException) -> None:
        self.stats.error(kind)
        log.warning("%s failed (%s: %s); counted in errors.%s, the loop goes on", doing, exc.__class__.__name__,
                    str(exc)[:300], kind)

    # -- probation (update/probation.py) ------------------------------------
    def _probation_for_current(self, baseline_p95_ms: Optional[float]) -> Optional[Probation]:
        """A probation for the running bundle if it is an uncommitted update (None: nothing to prove)."""
        if self.updater is None:
            return None
        cur = self.updater.state.current
        if cur is None or cur.committed or cur.sha256 != self.manifest.sha256:
            return None
        return Probation(cur.label, ProbationLimits.from_config(self.config.update), baseline_p95_ms=baseline_p95_ms)

    def _probation_error(self) -> None:
        if self.probation is not None:
            self.probation.error()
            self._check_probation()  # errors end a probation at once, not at the next service()

    def _check_probation(self) -> None:
        state, why = self.probation.verdict()
        if state == "passed":
            self.probation = None
            self.updater.commit()
            log.info("bundle %s v%s passed its probation: %s", self.manifest.name, self.manifest.version, why)
        elif state == "failed":
            self._revert(why)

    def _revert(self, why: str) -> None:
        """The running bundle failed its probation: refuse it, and run the previous bundle again (kept on disk)."""
        failed, self.probation = self.manifest, None
        target = self.updater.revert(f"failed its probation: {why}")  # written before anything else happens
        try:
            if target is not None:
                bundle = load_bundle(target.path)
                if bundle.manifest.sha256 != target.sha256:
                    raise BundleError(f"its model sha256={bundle.manifest.sha256[:12]}... is not the installed "
                                      f"{target.sha256[:12]}...")
            elif self.verifier is not None:
                bundle = self.verifier.load(self.config.bundle.path, max_total=8 * self.config.update.max_bytes)
            else:
                bundle = load_bundle(self.config.bundle.path)
            model = self._open_like_running(bundle.model_path)
        except Exception as exc:  # noqa: BLE001 - the state already says what a restart runs
            self.rollbacks += 1
            self.last_update_error = (f"bundle {failed.name} v{failed.version} failed its probation ({why}), but the "
                                      f"previous bundle cannot be opened ({exc}); a restart runs it")
            self.stats.error("update")
            log.error("%s", self.last_update_error)
            self._publish_status()
            return
        self._install(bundle, model)
        self.rollbacks += 1
        self.last_update_archive = (self.updater.state.refused[-1].archive_sha256 if self.updater.state.refused
                                    else None)
        self.last_update_error = (f"bundle {failed.name} v{failed.version} (sha256 {failed.sha256[:12]}...) failed its "
                                  f"probation: {why}; back to {bundle.manifest.name} v{bundle.manifest.version}")
        self.stats.error("update")
        log.warning("%s", self.last_update_error)
        self._announce()

    def _offer_cmd(self, topic: str, payload: bytes) -> None:
        """MQTT thread: queue a command for the loop; an oversized one, or one past a full queue, is refused here."""
        if len(payload) > limits.MAX_CMD_BYTES or self._cmds.qsize() >= _MAX_QUEUED_CMDS:
            self.stats.error("command")
            log.warning("command on %s refused unread: %d bytes (limit %d), %d commands waiting (limit %d)",
                        topic, len(payload), limits.MAX_CMD_BYTES, self._cmds.qsize(), _MAX_QUEUED_CMDS)
            return
        self._cmds.put(bytes(payload))

    def _trial_run(self, path, cancel):
        """The updater's trial run of a pushed model: a child process on the running runtime (update/sandbox.py)."""
        u = self.config.update
        return trial_run(path, runtime=self.model.runtime, threads=self.model.num_threads,
                         memory_bytes=u.trial_memory_mb << 20, timeout_s=u.trial_timeout_s, cancel=cancel)

    # -- model updates (staged by the Updater's thread, swapped here) --------
    def _open_like_running(self, path) -> TFLiteModel:
        """The new model on the runtime and thread count the running one uses (called off the loop)."""
        return TFLiteModel.open(path, self.model.runtime, self.model.num_threads)

    def _check_update(self, bundle: Bundle, model: TFLiteModel) -> None:
        """Refuse a bundle the running source cannot feed, or whose model refuses its own preprocessing."""
        new, old = bundle.manifest.preprocessing, self.manifest.preprocessing
        fixed = ("kind", "color", "raw_dtype") + (("shape",) if isinstance(self.source, MqttSource) else ())
        for key in fixed:
            if getattr(new, key) != getattr(old, key):
                raise ConfigError(  # about this board's source, not the bundle: not remembered as refused
                    f"bundle {bundle.manifest.name} v{bundle.manifest.version} has preprocessing.{key}="
                    f"{getattr(new, key)!r} but the source was opened for {getattr(old, key)!r}; "
                    "restart the agent with --bundle to change it"
                )
        if len(model.output_spec.shape) and int(model.output_spec.shape[-1]) != len(bundle.manifest.labels):
            raise BundleError(f"bundle {bundle.manifest.name} v{bundle.manifest.version}: the model has "
                              f"{model.output_spec.shape[-1]} outputs but the manifest {len(bundle.manifest.labels)} labels")
        raw_shape = tuple(new.shape) if new.shape else tuple(model.input_spec.shape[1:])
        try:
            model(preprocess(np.zeros(raw_shape, dtype=new.raw_dtype), new))
        except (InputError, RuntimeError, ValueError) as exc:
            raise BundleError(f"bundle {bundle.manifest.name} v{bundle.manifest.version} cannot run its own "
                              f"preprocessing output ({exc}); re-create it with `edgekit convert`") from exc

    def _apply_updates(self) -> None:
        while not self.updater.ready.empty():
            item = self.updater.ready.get_nowait()
            if self.shadow is not None:  # a newer desired state: the shadow run ends (promoted, replaced, aborted)
                self._end_shadow(item)
            if isinstance(item, Staged) and Path(item.bundle.path).resolve() == Path(self.bundle.path).resolve():
                item.model.close()  # the same archive was staged twice; it already runs
            elif isinstance(item, Staged) and item.meta.get("shadow"):
                self._start_shadow(item)
            elif isinstance(item, Staged):
                self._swap(item)
            elif isinstance(item, Failed):
                self.last_update_error = item.reason  # before the count: whoever sees the count sees why
                self.last_update_archive = item.meta.get("archive_sha256") or item.meta.get("refused_archive")
                self.stats.error("update")
                log.warning("update refused: %s; still running %s v%s", item.reason, self.manifest.name,
                            self.manifest.version)
                self._publish_status()

    def _swap(self, staged: Staged) -> None:
        old = self.manifest
        baseline = self.stats.latency()["p95"]  # the model being replaced, on this board, just now
        self._install(staged.bundle, staged.model)
        self.last_update_error = self.last_update_archive = None
        self.updater.installed(staged)  # a restart runs it; uncommitted until its probation passes
        self.probation = self._probation_for_current(baseline_p95_ms=baseline)
        m = self.manifest
        log.info("model updated: %s v%s -> %s v%s (sha256 %s...) from %s; on probation", old.name, old.version, m.name,
                 m.version, m.sha256[:12], self.bundle.path)
        self._announce()

    def _install(self, bundle: Bundle, model: TFLiteModel) -> None:
        """Run ``model`` of ``bundle`` from the next inference on (the one running is closed)."""
        old_model = self.model
        self.model, self.bundle, self.manifest = model, bundle, bundle.manifest
        old_model.close()
        self.stats.latencies_ms.clear()  # telemetry latency_ms describes the model that runs
        self._prepare_fast_path()
        self._prepare_drift()  # the window describes one model: start afresh against the new reference
        m, cfg = self.manifest, self.config.policy
        self.policy.set_thresholds(
            cfg.confidence_threshold if cfg.confidence_threshold is not None else m.confidence_threshold,
            cfg.margin_threshold if cfg.margin_threshold is not None else m.margin_threshold,
        )

    # -- shadow runs (update/shadow.py) -------------------------------------
    def _start_shadow(self, staged: Staged) -> None:
        m = staged.bundle.manifest
        table, shape = lookup_table(m.preprocessing, staged.model.input_spec)
        cfg = self.config.policy
        threshold = cfg.confidence_threshold if cfg.confidence_threshold is not None else m.confidence_threshold
        self.shadow = _Shadow(staged, table, shape, threshold,
                              ShadowStats(m.model_ref, staged.slot.archive_sha256 if staged.slot else ""))
        log.info("shadow run: %s v%s (sha256 %s...) classifies every input beside %s v%s, which still decides",
                 m.name, m.version, m.sha256[:12], self.manifest.name, self.manifest.version)
        self._telemetry_due = 0.0

    def _shadow_run(self, raw: np.ndarray) -> Optional[tuple]:
        """The candidate on one input: ``(prediction, latency_s)``, or None when it failed (counted; dropped past
        the limit)."""
        sh = self.shadow
        model, m = sh.staged.model, sh.staged.bundle.manifest
        t0 = time.perf_counter()
        try:
            if sh.table is not None and raw.dtype == np.uint8 and raw.shape == sh.shape:
                model.set_raw_input(np.take(sh.table, raw))
                model.invoke()
                scores = model.output()
            else:
                scores = model(preprocess(raw, m.preprocessing))
            shadow_latency = time.perf_counter() - t0  # the span the current model's latency covers, no more
            cand = classify(scores, m.labels, m.output_activation)
        except (InputError, RuntimeError, ValueError, MemoryError) as exc:
            sh.stats.error()
            log.warning("shadow %s v%s failed an input (%s: %s)", m.name, m.version, exc.__class__.__name__,
                        str(exc)[:200])
            if sh.stats.errors > self.config.update.probation_max_errors:
                self._drop_shadow(f"{sh.stats.errors} inputs failed under it (probation_max_errors="
                                  f"{self.config.update.probation_max_errors})")
            return None
        return cand, shadow_latency

    def _shadow_record(self, result: Optional[tuple], pred: Any, low: bool, latency: float) -> None:
        sh = self.shadow
        if result is None or sh is None:
            return
        cand, shadow_latency = result
        sh.stats.record(label=cand.label, confidence=cand.confidence, low=cand.confidence < sh.threshold,
                        latency_s=shadow_latency, current_label=pred.label,
                        current_confidence=pred.confidence, current_low=low, current_latency_s=latency)
        u = self.config.update
        if sh.stats.inferences % _SHADOW_LATENCY_EVERY == 0:  # a candidate too slow for this board slows the loop
            snap = sh.stats.snapshot()
            p95, cur = snap["latency_ms"]["p95"], snap["current_latency_ms"]["p95"]
            if u.probation_latency_ms > 0 and p95 > u.probation_latency_ms:
                self._drop_shadow(f"its p95 latency {p95:.3f} ms is above probation_latency_ms="
                                  f"{u.probation_latency_ms:g}")
            elif u.probation_latency_ratio > 0 and p95 > u.probation_latency_ratio * max(cur, u.probation_latency_floor_ms):
                self._drop_shadow(f"its p95 latency {p95:.3f} ms is {p95 / cur:.1f}x the current model's {cur:.3f} ms "
                                  f"(probation_latency_ratio={u.probation_latency_ratio:g}, "
                                  f"probation_latency_floor_ms={u.probation_latency_floor_ms:g})")

    def _end_shadow(self, why: Any) -> None:
        sh, self.shadow = self.shadow, None
        sh.staged.model.close()
        promoted = isinstance(why, Staged) and sh.staged.slot is not None and why.slot is not None \
            and why.slot.archive_sha256 == sh.staged.slot.archive_sha256
        if not isinstance(why, Staged):  # a Staged one counts its own attempt; the shadow's is forgotten
            self.updater.shadow_ended()
        m = sh.staged.bundle.manifest
        log.info("shadow run of %s v%s ended after %d inferences (agreement %s): %s", m.name, m.version,
                 sh.stats.inferences, sh.stats.snapshot()["agreement"],
                 "promoted" if promoted else "a newer bundle message arrived")
        self._telemetry_due = 0.0

    def _drop_shadow(self, why: str) -> None:
        sh, self.shadow = self.shadow, None
        sh.staged.model.close()
        m = sh.staged.bundle.manifest
        self.updater.shadow_failed(sh.staged.slot, f"failed its shadow run: {why}")
        self.last_update_archive = sh.staged.slot.archive_sha256 if sh.staged.slot else None
        self.last_update_error = (f"shadow candidate {m.name} v{m.version} (sha256 {m.sha256[:12]}...) dropped: {why}; "
                                  f"{self.manifest.name} v{self.manifest.version} runs as before")
        self.stats.error("update")
        log.warning("%s", self.last_update_error)
        self._announce()

    def _announce(self) -> None:
        """The fleet learns what runs now: the last will, the retained status, telemetry soon."""
        if self.link is not None:
            self.link.client.will_set(self.topics["status"], self._status("offline"), qos=1, retain=True)
        self._publish_status()
        self._telemetry_due = 0.0

    def _publish_status(self) -> None:
        if self.link is not None:
            self.link.publish(self.topics["status"], self._status("online"), qos=1, retain=True)

    def send_telemetry(self) -> None:
        if self.link is not None:
            self.link.publish(self.topics["telemetry"], _DUMPS(self.telemetry()).encode(), qos=0)

    def _command(self, payload: bytes) -> None:
        try:
            cmd = protocol.parse_cmd(payload)
            args = cmd["args"]
            if cmd["cmd"] == "set_thresholds":
                try:
                    self.policy.set_thresholds(args.get("confidence"), args.get("margin"))
                except (TypeError, ValueError) as exc:
                    raise ProtocolError(f"set_thresholds args={args} rejected: {exc}") from exc
            elif cmd["cmd"] == "ping":
                self.link.publish(self.topics["status"], self._status("online"), qos=1, retain=True)
            elif cmd["cmd"] == "send_telemetry":
                self.send_telemetry()
            elif cmd["cmd"] == "flush":
                self.publisher.pump()
            elif cmd["cmd"] == "reload_bundle":
                raise ProtocolError("reload_bundle is not supported; push the bundle with `edgekit fleet push` "
                                    "(the agent installs it from its bundle topic)")
            log.info("command %s %s done", cmd["cmd"], cmd["id"])
        except ProtocolError as exc:
            self.stats.error("command")
            log.warning("command on %s ignored: %s", self.topics["cmd"], exc)
        except Exception as exc:  # noqa: BLE001 - RecursionError, MemoryError, ...: no command ends the loop
            self._failed("command", f"command on {self.topics['cmd']}", exc)

    def run(self, stop_event: Optional[threading.Event] = None) -> RunStats:
        """Classify until the source ends (then drain the outbox) or ``stop_event`` is set."""
        stop = stop_event or threading.Event()
        if self.link is not None:
            self.link.start()
        self.watchdog.ready()
        for item in self.source.items(stop):
            if item is not None:
                self.step(*item)
            self.service()
            if stop.is_set():
                break
        if self.link is not None and self.link.generation == 0:
            # A run shorter than the first connection: wait for it (within the drain time) so that the
            # fleet sees what this run ran and refused (its retained status), not nothing.
            self.link.connected.wait(self.config.outbox.drain_timeout_s)
        self.drain(self.config.outbox.drain_timeout_s)
        if self.link is not None and self.link.connected.is_set():
            self.send_telemetry()
        self.results.flush()
        if self.updater is not None:
            self.updater.stopped()  # a clean stop: this start does not count against an uncommitted bundle
        return self.run_stats()

    def drain(self, timeout: float) -> bool:
        """Publish until the outbox is empty or ``timeout`` passes; True when empty."""
        if self.publisher is None:
            return self.outbox.depth == 0
        deadline = time.monotonic() + timeout
        while self.outbox.depth and time.monotonic() < deadline:
            self.publisher.pump(wait_s=0.02)
            self.service()
            if not self.link.connected.is_set():
                time.sleep(0.05)
        if self.outbox.depth:
            log.warning("%d samples still wait in the outbox %s; they go out on the next start",
                        self.outbox.depth, self.outbox.path)
        return self.outbox.depth == 0

    def run_stats(self) -> RunStats:
        return RunStats(
            inferences=self.stats.inferences,
            flagged=self.stats.flagged,
            published=self.publisher.published if self.publisher else 0,
            dropped=self.outbox.dropped - self._dropped_at_start,
            errors=dict(self.stats.errors),
            pending=self.outbox.depth,
            skipped=dict(self.policy.skipped),
            runtime=self.model.runtime,
            sent=self.publisher.sent if self.publisher else 0,
            resent=self.publisher.resent if self.publisher else 0,
            rejected=self.publisher.rejected if self.publisher else 0,
            input_mismatch=dict(self.stats.input_mismatch),
        )

    # -- lifetime -----------------------------------------------------------
    def close(self) -> None:
        shadow = getattr(self, "shadow", None)
        if shadow is not None:
            self.shadow = None
            shadow.staged.model.close()
        watchdog = getattr(self, "watchdog", None)
        if watchdog is not None:
            watchdog.stopping()
            watchdog.close()
        link = getattr(self, "link", None)
        if link is not None:
            link.close(last=(self.topics["status"], self._status("offline")))
            self.link = None
        for closer in reversed(self._closers):
            closer()
        self._closers = []

    def __enter__(self) -> "Agent":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
