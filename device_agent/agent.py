"""The agent loop: source -> preprocess -> interpreter -> policy -> outbox -> MQTT, plus telemetry.

::

    with Agent(load_config("firmware_configs/rpi-4.toml")) as agent:
        stats = agent.run()          # a finite source: returns once classified and drained

A bad input is logged in one line, counted (telemetry ``errors``) and
skipped; a bad bundle or config stops :class:`Agent` before the interpreter
opens anything.

Model updates (docs/agent.md, "Model updates"): a bundle pushed on
``.../<device>/bundle`` is staged by :class:`~device_agent.update.updater.Updater`
off the loop, and swapped in by :meth:`Agent.service` between two inferences
(:class:`~device_agent.update.live.LiveUpdates`). Status, telemetry and commands:
:class:`~device_agent.delivery.control.FleetControl`.

Bookkeeping in blocks: flagged samples are committed one transaction per block (``[outbox].batch``,
``batch_wait_s``), result lines written every 0.5 s, :meth:`Agent.service` run at most every 2 ms while
inputs flow. Nothing reports a sample (result line, telemetry, publish) before its block is committed;
``kill -9`` loses at most the open block, unreported (docs/agent.md, "Crash safety").
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

import numpy as np

from . import limits
from .bench import choose_runtime
from .config import AgentConfig
from .delivery import protocol
from .delivery.control import FleetControl
from .delivery.outbox import Outbox, Publisher
from .errors import ConfigError, InputError
from .inference.classify import classify
from .inference.fastpath import FastPath, classified
from .inference.interpreter import TFLiteModel, dequantize
from .inference.preprocess import preprocess
from .results import ResultsWriter
from .sampling.policy import Decision, Policy
from .sources import MqttSource, Source, open_source
from .telemetry import Stats, Watchdog
from .update.live import LiveUpdates, _Shadow
from .update.manifest import load_bundle
from .update.probation import Probation
from .update.signature import Verifier
from .update.updater import Updater

__all__ = ["RunStats", "Agent"]

log = logging.getLogger(__name__)
_DUMPS = json.JSONEncoder(separators=(",", ":")).encode
_X80 = np.uint8(128)
_SERVICE_EVERY_S = 0.002  # service() after an inference at most this often (always while the source idles)


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


def digest(raw: np.ndarray) -> str:
    raw = np.ascontiguousarray(raw)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{raw.dtype.str}{raw.shape}".encode())
    h.update(raw.tobytes())
    return h.hexdigest()


class Agent(FleetControl, LiveUpdates, FastPath):
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
            ob = config.outbox
            self.outbox = Outbox(config.outbox_path, max_bytes=ob.max_bytes, sync=ob.sync, batch=ob.batch,
                                 batch_wait_s=ob.batch_wait_s)
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
            # A result line reaches the file only after the sample it names is committed to the outbox.
            self.results = ResultsWriter(config.results.path, on_error=lambda: self.stats.error("results"),
                                         before_flush=self.outbox.commit, keep_free=config.results.keep_free_bytes)
            self._closers.append(self.results.close)
            self._prepare_fast_path()  # and the drift window
        except BaseException:
            self.close()
            raise
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
                if self._lut_kind == "xor":  # into a buffer of its own: set_tensor copies it
                    np.bitwise_xor(raw, _X80, out=self._qbuf_u8)
                    self._set_input(self._qin)
                elif self._lut_kind == "translate":  # tobytes(): the values in C order whatever the layout
                    self._set_input(np.frombuffer(raw.tobytes().translate(self._lut_bytes),
                                                  self._lut.dtype).reshape(self._qin.shape))
                elif self._lut_kind == "identity":
                    self.model.set_raw_input(raw)
                else:  # mode="wrap": no bounds check (a uint8 cannot leave the table) and no hidden copy
                    np.take(lut, raw, out=self._qbuf, mode="wrap")
                    self._set_input(self._qin)
            else:
                x = preprocess(raw, self.manifest.preprocessing)
                self.model.set_input(x)
            self._invoke()
            out = self._output()
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
        if self._scores is not None:  # 8-bit output: each byte's score looked up (the same floats as output())
            pred, confidence, margin, entropy = self._known(out, self._scores, m.labels, m.output_activation)
        else:
            pred, confidence, margin, entropy = classified(
                classify(dequantize(out, self.model.output_spec), m.labels, m.output_activation))
        if self.drift is not None:
            self._feed_drift(raw, x, pred.confidence)
        wall = time.time()
        digests: list = []

        def dig() -> str:  # only hashed when the prediction is a candidate to send
            if not digests:
                digests.append(digest(raw))
            return digests[0]

        if mismatch is None:
            decision = self.policy.decide(pred, dig, wall)
        else:  # a prediction on an input in the wrong units is not worth a person's label: kept out of the outbox
            reasons = self.policy.reasons(pred)
            decision = Decision(False, reasons, "input_mismatch" if reasons else "")
        self.stats.record(latency, decision.low_confidence)
        if self.shadow is not None:
            self._shadow_record(early if ran_early else self._shadow_run(raw), pred, decision.low_confidence, latency)
        ts = round(wall, 3)  # protocol.now()
        sample_id = None
        if decision.flagged:
            sample_id = str(uuid.uuid4())
            seq = self.outbox.next_seq()
            message = protocol.sample_parts(
                device=self.device, fleet=self.fleet, seq=seq, model=m.model_ref, prediction=pred.to_dict(),
                reasons=decision.reasons, raw=raw, source=info, sample_id=sample_id, ts=ts,
            )
            # Gathered, then committed in one transaction per block (before anything reports or publishes it).
            self.outbox.add(self.topics["samples"], message, sample_id,
                            dig() if self.config.policy.dedupe else None, seq)
            self.stats.flagged += 1
        line = {
            "seq": self.stats.inferences - 1,
            "ts": ts,
            "source": info,
            "label": pred.label,
            "confidence": confidence,
            "margin": margin,
            "entropy": entropy,
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
        if self.outbox.commit_due():
            self.outbox.commit()
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

    def run(self, stop_event: Optional[threading.Event] = None) -> RunStats:
        """Classify until the source ends (then drain the outbox) or ``stop_event`` is set."""
        stop = stop_event or threading.Event()
        if self.link is not None:
            self.link.start()
        self.watchdog.ready()
        service_at = 0.0
        for item in self.source.items(stop):
            if item is not None:
                self.step(*item)
                now = time.monotonic()
                if now < service_at and not stop.is_set():
                    continue  # a fast model: the chores between inferences at most every _SERVICE_EVERY_S
                service_at = now + _SERVICE_EVERY_S
            self.service()
            if stop.is_set():
                break
        self.outbox.commit()
        if self.link is not None and self.link.generation == 0:
            # A run shorter than the first connection: wait for it (within the drain time) so that the
            # fleet sees what this run ran and refused (its retained status), not nothing.
            self.link.connected.wait(self.config.outbox.drain_timeout_s)
        self.drain(self.config.outbox.drain_timeout_s)
        if self.link is not None and self.link.connected.is_set():
            try:
                self.send_telemetry()
            except Exception as exc:  # noqa: BLE001
                self._failed("telemetry", "sending telemetry", exc)
        self.results.flush()
        if self.updater is not None:
            self.updater.stopped()  # a clean stop: this start does not count against an uncommitted bundle
        return self.run_stats()

    def drain(self, timeout: float) -> bool:
        """Publish until the outbox is empty or ``timeout`` passes; True when empty."""
        self.outbox.commit()
        if self.publisher is None:
            return self.outbox.depth == 0
        deadline = time.monotonic() + timeout
        while self.outbox.depth and time.monotonic() < deadline:
            self.link.ack_now()  # the last PUBACKs: not held up by the broker's Nagle and this kernel's delayed ACK
            try:
                self.publisher.pump(wait_s=0.02)
            except Exception as exc:  # noqa: BLE001 - e.g. deleting what was acknowledged on a full disk: the run
                self._failed("outbox", "publishing from the outbox", exc)  # still ends normally, the rows stay
                time.sleep(0.05)
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
        self._drop_calls()  # the closed model's interpreter is freed even while this Agent object lives on

    def __enter__(self) -> "Agent":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
