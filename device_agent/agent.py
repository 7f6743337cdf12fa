"""The agent loop: source -> preprocess -> interpreter -> policy -> outbox -> MQTT, plus telemetry.

::

    with Agent(load_config("firmware_configs/rpi-4.toml")) as agent:
        stats = agent.run()          # a finite source: returns once classified and drained

A bad input is logged in one line, counted (telemetry ``errors``) and
skipped; a bad bundle or config stops :class:`Agent` before the interpreter
opens anything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Dict, Mapping, Optional

import numpy as np

from . import __version__, protocol
from .bench import choose_runtime
from .classify import classify
from .config import AgentConfig
from .errors import ConfigError, InputError, ProtocolError
from .interpreter import TFLiteModel, quantize
from .manifest import load_bundle
from .outbox import Outbox, Publisher
from .policy import Policy
from .preprocess import preprocess
from .results import ResultsWriter
from .sources import MqttSource, Source, open_source
from .telemetry import Stats, Watchdog, machine

__all__ = ["RunStats", "Agent"]

log = logging.getLogger(__name__)
_DUMPS = json.JSONEncoder(separators=(",", ":")).encode


@dataclass(frozen=True)
class RunStats:
    """What one :meth:`Agent.run` did."""

    inferences: int
    flagged: int
    published: int  # samples acknowledged by the broker (and deleted from the outbox)
    dropped: int  # samples dropped because the outbox was full
    errors: Mapping[str, int] = field(default_factory=dict)
    pending: int = 0  # samples left in the outbox for the next start
    skipped: Mapping[str, int] = field(default_factory=dict)  # duplicate / rate_limited
    runtime: str = ""


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
        self.bundle = load_bundle(config.bundle.path)  # sha256 checked before any interpreter opens it
        self.manifest = m = self.bundle.manifest
        self.device, self.fleet = config.device.id, config.device.fleet
        self.topics = {k: protocol.topic(self.fleet, self.device, k) for k in protocol.KINDS}
        self._closers = []
        try:
            runtime, threads = choose_runtime(config)
            self.model = TFLiteModel.open(self.bundle.model_path, runtime, threads)
            self._closers.append(self.model.close)
            self.outbox = Outbox(config.outbox_path, max_bytes=config.outbox.max_bytes, sync=config.outbox.sync)
            self._closers.append(self.outbox.close)
            self.policy = Policy(
                config.policy,
                confidence_threshold=m.confidence_threshold,
                margin_threshold=m.margin_threshold,
                seen=self.outbox.seen,
            )
            self.source = source or open_source(
                config.source, m.preprocessing.color, m.preprocessing.raw_dtype, m.preprocessing.shape
            )
            self._closers.append(self.source.close)
            self.results = ResultsWriter(config.results.path)
            self._closers.append(self.results.close)
        except BaseException:
            self.close()
            raise
        self._lut, self._lut_shape = self._lookup_table()
        self._lut_kind = "take"
        if self._lut is not None:
            every = np.arange(256, dtype=np.uint8)
            if self._lut.dtype == np.uint8 and np.array_equal(self._lut, every):
                self._lut_kind = "identity"
            elif self._lut.dtype == np.int8 and np.array_equal(self._lut, (every ^ np.uint8(128)).view(np.int8)):
                self._lut_kind = "xor"
        self.stats = Stats()
        self.watchdog = Watchdog()
        self._cmds: "queue.SimpleQueue[bytes]" = queue.SimpleQueue()
        self._telemetry_due = 0.0
        self._dropped_at_start = self.outbox.dropped
        self.link = self.publisher = None
        if config.mqtt.broker:
            from .mqtt import Link

            self.link = Link(
                config.mqtt,
                client_id=f"edgekit-{self.fleet}-{self.device}",
                will=(self.topics["status"], self._status("offline")),
                on_connect=self._on_connect,
            )
            self.link.subscribe(self.topics["cmd"], lambda t, p: self._cmds.put(p))
            if isinstance(self.source, MqttSource):
                self.link.subscribe(self.source.topic, self.source.offer)
            self.publisher = Publisher(self.outbox, self.link, window=config.mqtt.max_inflight)
        log.info(
            "agent %s/%s: model %s v%s on %s (%d threads), outbox %s holds %d samples",
            self.fleet, self.device, m.name, m.version, self.model.runtime, self.model.num_threads,
            self.outbox.path, self.outbox.depth,
        )

    def _lookup_table(self):
        """For uint8 images already at the model's size: raw byte -> quantized model input, computed
        once with the very arithmetic of preprocess() + quantize(), so results are identical."""
        pre, spec = self.manifest.preprocessing, self.model.input_spec
        shape = tuple(pre.shape)
        if pre.kind != "image" or not spec.quantized or len(shape) != 3 or int(np.prod(shape)) != int(np.prod(spec.shape)):
            return None, None
        values = np.arange(256, dtype=np.uint8).reshape(256, 1, 1)
        table = quantize(preprocess(values, replace(pre, shape=(256, 1, 1), resize="none")), spec)
        return table.reshape(256), shape

    # -- payloads -----------------------------------------------------------
    def _status(self, state: str) -> bytes:
        return _DUMPS(
            protocol.status_payload(
                device=self.device, fleet=self.fleet, state=state, model=self.manifest.model_ref,
                agent_version=__version__,
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
            latency_ms=s.latency(),
            low_confidence_rate=s.low_confidence_rate(),
            errors=dict(s.errors),
            skipped=dict(self.policy.skipped),
            runtime=self.model.runtime,
            threads=self.model.num_threads,
            agent_version=__version__,
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
        t0 = time.perf_counter()
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
                scores = self.model(preprocess(raw, self.manifest.preprocessing))
        except InputError as exc:
            self.stats.error("input")
            log.warning("input %s#%s skipped: %s", info.get("uri"), info.get("index"), exc)
            return None
        except (RuntimeError, ValueError) as exc:  # the interpreter refused this input
            self.stats.error("inference")
            log.warning("input %s#%s failed in the interpreter (%s); skipped", info.get("uri"), info.get("index"), exc)
            return None
        latency = time.perf_counter() - t0
        m = self.manifest
        pred = classify(scores, m.labels, m.output_activation)
        digests: list = []

        def dig() -> str:  # only hashed when the prediction is a candidate to send
            if not digests:
                digests.append(digest(raw))
            return digests[0]

        decision = self.policy.decide(pred, dig, time.time())
        self.stats.record(latency, decision.low_confidence)
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
        }
        if decision.skipped:
            line["skipped"] = decision.skipped
        self.results.write(line)
        if self.config.mqtt.publish_predictions and self.link is not None:
            p = protocol.prediction_payload(device=self.device, seq=line["seq"], label=pred.label,
                                            confidence=pred.confidence, sample_id=sample_id, ts=ts)
            self.link.publish(self.topics["predictions"], _DUMPS(p).encode(), qos=0)
        return line

    def service(self) -> None:
        """Between inferences: publish from the outbox, run commands, send telemetry, feed the watchdog."""
        if self.publisher is not None:
            self.publisher.pump()
            while not self._cmds.empty():
                self._command(self._cmds.get_nowait())
            now = time.monotonic()
            if now >= self._telemetry_due and self.link.connected.is_set():
                self._telemetry_due = now + self.config.telemetry.period_s
                self.send_telemetry()
        self.results.tick()
        self.watchdog.feed()

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
                raise ProtocolError("reload_bundle is not supported by this agent; restart the service instead")
            log.info("command %s %s done", cmd["cmd"], cmd["id"])
        except ProtocolError as exc:
            self.stats.error("command")
            log.warning("command on %s ignored: %s", self.topics["cmd"], exc)

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
        self.drain(self.config.outbox.drain_timeout_s)
        if self.link is not None and self.link.connected.is_set():
            self.send_telemetry()
        self.results.flush()
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
        )

    # -- lifetime -----------------------------------------------------------
    def close(self) -> None:
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
