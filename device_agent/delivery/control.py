"""What the fleet sees of an agent and what it may ask of it: status, telemetry, commands.

A mixin of :class:`~device_agent.agent.Agent`: the retained ``status`` (with the last will),
periodic ``telemetry``, and the ``cmd`` topic (queued by the MQTT thread, run by the loop between
two inferences). Payloads are built by :mod:`device_agent.delivery.protocol`; docs/protocol.md.
"""

from __future__ import annotations

import json
import logging
import queue
from typing import Any, Dict

from .. import __version__, limits
from ..errors import ProtocolError
from ..telemetry import machine
from . import protocol

__all__ = ["FleetControl"]

log = logging.getLogger("device_agent.agent")  # the agent's own log, as before this code had a module of its own
_DUMPS = json.JSONEncoder(separators=(",", ":")).encode
_MAX_QUEUED_CMDS = 256


class FleetControl:
    """Status, telemetry and commands of the agent (a mixin: it uses the agent's attributes)."""

    _cmds: "queue.SimpleQueue[bytes]"

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
        self.outbox.commit()  # every sample counted in flagged is in the outbox (and in its depth)
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

    def _offer_cmd(self, topic: str, payload: bytes) -> None:
        """MQTT thread: queue a command for the loop; an oversized one, or one past a full queue, is refused here."""
        if len(payload) > limits.MAX_CMD_BYTES or self._cmds.qsize() >= _MAX_QUEUED_CMDS:
            self.stats.error("command")
            log.warning("command on %s refused unread: %d bytes (limit %d), %d commands waiting (limit %d)",
                        topic, len(payload), limits.MAX_CMD_BYTES, self._cmds.qsize(), _MAX_QUEUED_CMDS)
            return
        self._cmds.put(bytes(payload))

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
                self.outbox.commit()
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
