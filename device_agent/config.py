"""The agent's configuration: a TOML file (``firmware_configs/<board>.toml``), one frozen dataclass per table.

Every value is checked when the file is loaded; an error names the key and
the fix, e.g. ``config [policy].random_fraction=1.5 must be within [0, 1]``.
Command-line flags override the file through :meth:`AgentConfig.with_overrides`.
See docs/agent.md for every key.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple
from urllib.parse import urlparse

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.9/3.10 boards
    import tomli as tomllib

__all__ = [
    "DeviceConfig",
    "BundleConfig",
    "RuntimeConfig",
    "SourceConfig",
    "PolicyConfig",
    "MqttConfig",
    "OutboxConfig",
    "TelemetryConfig",
    "ResultsConfig",
    "UpdateConfig",
    "AgentConfig",
    "load_config",
    "default_state_dir",
]

RUNTIME_NAMES = ("auto", "ai_edge_litert", "tflite_runtime", "tensorflow")
SOURCE_KINDS = ("folder", "npy", "npz", "camera", "mqtt")


def default_state_dir() -> Path:
    """Where the outbox and the benchmark choice live unless configured."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "edgekit-agent"


def _hostname() -> str:
    name = "".join(c if c.isalnum() or c in "._-" else "-" for c in socket.gethostname())[:64]
    return name or "device"


def _err(table: str, key: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"config [{table}].{key}={value!r} {why}")


def _within(table: str, key: str, value: float, lo: float, hi: Optional[float] = None) -> None:
    if value < lo or (hi is not None and value > hi):
        rng = f"within [{lo:g}, {hi:g}]" if hi is not None else f">= {lo:g}"
        raise ConfigError(f"config [{table}].{key}={value!r} must be {rng}")


@dataclass(frozen=True)
class DeviceConfig:
    id: str = ""
    fleet: str = "default"

    def __post_init__(self) -> None:
        from .delivery.protocol import check_name
        from .errors import ProtocolError

        if not self.id:
            object.__setattr__(self, "id", _hostname())
        for key in ("id", "fleet"):
            try:
                check_name(getattr(self, key), key)
            except ProtocolError:
                raise _err("device", key, getattr(self, key), "is not a valid name; use 1-64 letters, digits, '.', '_' or '-'") from None


@dataclass(frozen=True)
class BundleConfig:
    path: str = ""


@dataclass(frozen=True)
class RuntimeConfig:
    name: str = "auto"
    threads: int = 1

    def __post_init__(self) -> None:
        if self.name not in RUNTIME_NAMES:
            raise _err("runtime", "name", self.name, f"is unknown; expected one of {RUNTIME_NAMES}")
        _within("runtime", "threads", self.threads, 1, 64)


@dataclass(frozen=True)
class SourceConfig:
    kind: str = "folder"
    path: str = ""
    watch: bool = False
    poll_interval_s: float = 1.0
    camera_index: int = 0
    fps: float = 0.0  # camera: frames per second to classify, 0 = as fast as the model goes
    topic: str = ""
    key: str = "x"

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise _err("source", "kind", self.kind, f"is unknown; expected one of {SOURCE_KINDS}")
        _within("source", "poll_interval_s", self.poll_interval_s, 0.01)
        _within("source", "camera_index", self.camera_index, 0)
        _within("source", "fps", self.fps, 0)


@dataclass(frozen=True)
class PolicyConfig:
    confidence_threshold: Optional[float] = None  # None: the manifest's
    margin_threshold: Optional[float] = None  # None: the manifest's
    random_fraction: float = 0.0
    max_per_minute: int = 0  # 0: no limit
    max_per_hour: int = 0
    max_per_day: int = 0
    max_per_class_per_hour: int = 0
    dedupe: bool = True
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        for key in ("confidence_threshold", "margin_threshold", "random_fraction"):
            value = getattr(self, key)
            if value is not None:
                _within("policy", key, value, 0, 1)
        for key in ("max_per_minute", "max_per_hour", "max_per_day", "max_per_class_per_hour"):
            _within("policy", key, getattr(self, key), 0)


@dataclass(frozen=True)
class MqttConfig:
    broker: str = "mqtt://127.0.0.1:1883"  # "" runs offline: samples wait in the outbox
    protocol: str = "5"
    username: str = ""
    password: str = ""
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    keepalive_s: int = 30
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 60.0
    max_inflight: int = 50
    publish_predictions: bool = False
    # Who lets a sample go from the outbox: "collector" (its edgekit.ack/1, after its commit) or
    # "broker" (the PUBACK: for a collector without end-to-end acks; a broker's queue limit can lose samples).
    ack: str = "collector"
    ack_timeout_s: float = 30.0  # a sample the collector has not acknowledged this long after its PUBACK goes again
    max_unacked: int = 500  # samples sent and not yet acknowledged by the collector, at most

    def __post_init__(self) -> None:
        if self.broker:
            urls = [urlparse(u.strip()) for u in self.broker.split(",")]
            for url in urls:
                if url.scheme not in ("mqtt", "mqtts") or not url.hostname:
                    raise _err("mqtt", "broker", self.broker, "must look like mqtt://host:1883 or mqtts://host:8883 "
                                                              "(several nodes of a cluster: separated by commas)")
                try:
                    url.port
                except ValueError:
                    raise _err("mqtt", "broker", self.broker, "has an invalid port") from None
            if len({u.scheme for u in urls}) > 1:
                raise _err("mqtt", "broker", self.broker, "mixes mqtt:// and mqtts://; use one scheme for every node")
        if self.protocol not in ("5", "3.1.1"):
            raise _err("mqtt", "protocol", self.protocol, "must be \"5\" or \"3.1.1\"")
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError("config [mqtt].cert_file and [mqtt].key_file go together; set both or neither")
        if self.password and not self.username:
            raise ConfigError("config [mqtt].password is set without [mqtt].username; set the username too")
        _within("mqtt", "keepalive_s", self.keepalive_s, 5, 3600)
        _within("mqtt", "reconnect_min_s", self.reconnect_min_s, 0.01)
        _within("mqtt", "reconnect_max_s", self.reconnect_max_s, self.reconnect_min_s)
        _within("mqtt", "max_inflight", self.max_inflight, 1, 65535)
        if self.ack not in ("collector", "broker"):
            raise _err("mqtt", "ack", self.ack, "must be \"collector\" (end-to-end) or \"broker\" (PUBACK only)")
        _within("mqtt", "ack_timeout_s", self.ack_timeout_s, 0.1)
        _within("mqtt", "max_unacked", self.max_unacked, 1, 100_000)

    @property
    def endpoints(self) -> "list[Tuple[str, int]]":
        """``(host, port)`` of every node in ``broker``, in order (one for a single broker)."""
        out = []
        for text in filter(None, (u.strip() for u in self.broker.split(","))):
            url = urlparse(text)
            out.append((url.hostname or "", url.port or (8883 if url.scheme == "mqtts" else 1883)))
        return out

    @property
    def host(self) -> str:
        return self.endpoints[0][0] if self.broker else ""

    @property
    def port(self) -> int:
        return self.endpoints[0][1] if self.broker else 1883

    @property
    def tls(self) -> bool:
        return urlparse(self.broker.split(",")[0].strip()).scheme == "mqtts" or bool(self.ca_file)


@dataclass(frozen=True)
class OutboxConfig:
    path: str = ""  # "": <state dir>/outbox-<device>.sqlite
    max_bytes: int = 64 * 1024 * 1024
    drain_timeout_s: float = 30.0
    sync: str = "normal"  # normal: survives kill -9; full: survives power loss too (slower)
    batch: int = 32  # flagged samples per transaction; 1: each one committed before the next input
    batch_wait_s: float = 0.05  # the longest a flagged sample waits in memory for its transaction

    def __post_init__(self) -> None:
        _within("outbox", "max_bytes", self.max_bytes, 1024)
        _within("outbox", "drain_timeout_s", self.drain_timeout_s, 0)
        _within("outbox", "batch", self.batch, 1, 10000)
        _within("outbox", "batch_wait_s", self.batch_wait_s, 0, 60)
        if self.sync not in ("normal", "full"):
            raise _err("outbox", "sync", self.sync, "must be \"normal\" or \"full\"")


@dataclass(frozen=True)
class TelemetryConfig:
    period_s: float = 30.0

    def __post_init__(self) -> None:
        _within("telemetry", "period_s", self.period_s, 0.1)


@dataclass(frozen=True)
class ResultsConfig:
    path: str = "-"  # "-": stdout, "": off
    # a results file never takes the last bytes of its disk: the outbox (usually on the same disk) needs them more
    keep_free_bytes: int = 512 << 10

    def __post_init__(self) -> None:
        _within("results", "keep_free_bytes", self.keep_free_bytes, 0)


@dataclass(frozen=True)
class UpdateConfig:
    """Model updates pushed on ``.../<device>/bundle`` (``edgekit fleet push``); see docs/agent.md."""

    enabled: bool = True
    max_bytes: int = 16 * 1024 * 1024  # the largest bundle archive accepted (before base64)
    keep: int = 2  # previous bundle directories kept under <state dir>/bundles/ for a quick rollback
    # PEM Ed25519 public keys; with any, only bundles signed by one of them run (docs/agent.md, "Signed bundles")
    trusted_keys: Tuple[str, ...] = ()
    max_attempts: int = 3  # starts (or opens) of a new bundle that may end in a crash before it is refused
    commit_after: int = 20  # probation: inferences a new bundle must run well before it is committed (the next fallback)
    probation_s: float = 0.0  # ... and seconds since the swap (both must pass)
    probation_max_errors: int = 2  # more inputs failing under the new bundle than this: back to the previous one
    probation_latency_ratio: float = 3.0  # p95 latency over the previous model's above this: back (0 = no limit)
    probation_latency_ms: float = 0.0  # p95 latency above this many ms: back (0 = no limit)
    probation_latency_floor_ms: float = 5.0  # the ratio is taken against at least this p95 (a busy board's noise)
    trial_timeout_s: float = 60.0  # a pushed model's trial run in a child process must end within this
    trial_memory_mb: int = 256  # ... and allocate at most this much beyond what the runtime itself maps

    def __post_init__(self) -> None:
        _within("update", "max_bytes", self.max_bytes, 1024)
        _within("update", "keep", self.keep, 0, 100)
        keys = self.trusted_keys
        if isinstance(keys, str) or not isinstance(keys, (list, tuple)) or \
                not all(isinstance(k, str) and k.strip() for k in keys):
            raise _err("update", "trusted_keys", keys, 'must be a list of public key files, e.g. ["/etc/edgekit/signing.pub"]')
        if len(set(keys)) != len(keys) or len(keys) > 16:
            raise _err("update", "trusted_keys", keys, "must name each key file once, and at most 16")
        object.__setattr__(self, "trusted_keys", tuple(os.path.expanduser(k) for k in keys))
        _within("update", "max_attempts", self.max_attempts, 1, 100)
        _within("update", "commit_after", self.commit_after, 1)
        _within("update", "probation_s", self.probation_s, 0, 7 * 86400)
        _within("update", "probation_max_errors", self.probation_max_errors, 0)
        _within("update", "probation_latency_ratio", self.probation_latency_ratio, 0)
        _within("update", "probation_latency_ms", self.probation_latency_ms, 0)
        _within("update", "probation_latency_floor_ms", self.probation_latency_floor_ms, 0)
        _within("update", "trial_timeout_s", self.trial_timeout_s, 1)
        _within("update", "trial_memory_mb", self.trial_memory_mb, 16)


_TABLES: Dict[str, type] = {
    "device": DeviceConfig,
    "bundle": BundleConfig,
    "runtime": RuntimeConfig,
    "source": SourceConfig,
    "policy": PolicyConfig,
    "mqtt": MqttConfig,
    "outbox": OutboxConfig,
    "telemetry": TelemetryConfig,
    "results": ResultsConfig,
    "update": UpdateConfig,
}

# Flag-style overrides (the CLI's and the Python API's) -> (table, key).
_SHORTCUTS: Dict[str, Tuple[str, str]] = {
    "bundle": ("bundle", "path"),
    "source": ("source", "path"),
    "watch": ("source", "watch"),
    "broker": ("mqtt", "broker"),
    "device_id": ("device", "id"),
    "fleet": ("device", "fleet"),
    "results": ("results", "path"),
    "runtime": ("runtime", "name"),
    "threads": ("runtime", "threads"),
    "outbox": ("outbox", "path"),
}


def _coerce(table: str, f: dataclasses.Field, value: Any) -> Any:
    kind = str(f.type).replace("Optional[", "").rstrip("]")
    if value is None:
        if "Optional" in str(f.type):
            return None
        raise _err(table, f.name, value, "must be set")
    if kind == "bool":
        if not isinstance(value, bool):
            raise _err(table, f.name, value, "must be true or false")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise _err(table, f.name, value, "must be an integer")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _err(table, f.name, value, "must be a number")
        return float(value)
    if kind == "str":
        if isinstance(value, (int, float)) and not isinstance(value, bool) and f.name in ("protocol", "id", "fleet"):
            return str(value)
        if not isinstance(value, str):
            raise _err(table, f.name, value, "must be a string")
        return value
    return value


def _build(table: str, values: Mapping[str, Any]):
    klass = _TABLES[table]
    if not isinstance(values, Mapping):
        raise ConfigError(f"config [{table}] must be a table, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(klass)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"config [{table}].{unknown[0]} is not a known key; expected one of {sorted(fields)}")
    return klass(**{k: _coerce(table, fields[k], v) for k, v in values.items()})


def _infer_kind(path: str) -> Optional[str]:
    low = path.lower()
    if low.endswith(".npz"):
        return "npz"
    if low.endswith(".npy") and not os.path.isdir(path):
        return "npy"
    if os.path.isdir(path):
        return "folder"
    return None


@dataclass(frozen=True)
class AgentConfig:
    device: DeviceConfig = field(default_factory=DeviceConfig)
    bundle: BundleConfig = field(default_factory=BundleConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    results: ResultsConfig = field(default_factory=ResultsConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)
    origin: str = "<defaults>"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], origin: str = "<dict>") -> "AgentConfig":
        unknown = sorted(set(data) - set(_TABLES))
        if unknown:
            raise ConfigError(f"config [{unknown[0]}] is not a known table; expected one of {sorted(_TABLES)}")
        return cls(origin=origin, **{t: _build(t, data.get(t, {})) for t in _TABLES})

    def to_dict(self) -> Dict[str, Dict[str, Any]]:
        return {t: dataclasses.asdict(getattr(self, t)) for t in _TABLES}

    def with_overrides(self, **overrides: Any) -> "AgentConfig":
        """A copy with flag-style values (``bundle=``, ``source=``, ``watch=``, ``broker=``,
        ``device_id=``, ``fleet=``, ``results=``, ``runtime=``, ``threads=``, ``outbox=``)
        or whole-table updates (``policy={"random_fraction": 1.0}``) applied. ``None`` is ignored.
        """
        data = self.to_dict()
        for name, value in overrides.items():
            if value is None:
                continue
            if name in _TABLES and isinstance(value, Mapping):
                data[name].update(value)
            elif name in _SHORTCUTS:
                table, key = _SHORTCUTS[name]
                data[table][key] = str(value) if isinstance(value, os.PathLike) else value
                if name == "source":
                    kind = _infer_kind(str(value))
                    if kind:
                        data["source"]["kind"] = kind
            elif name in _TABLES:
                raise ConfigError(f"override {name}= must be a mapping of [{name}] keys")
            else:
                raise ConfigError(f"override {name}= is unknown; expected one of {sorted(_SHORTCUTS) + sorted(_TABLES)}")
        return AgentConfig.from_dict(data, origin=self.origin)

    # -- derived paths ------------------------------------------------------
    @property
    def outbox_path(self) -> Path:
        if self.outbox.path:
            return Path(self.outbox.path).expanduser()
        return default_state_dir() / f"outbox-{self.device.id}.sqlite"

    @property
    def bench_path(self) -> Path:
        """The benchmark's runtime choice, next to the outbox (``runtime = "auto"`` reads it)."""
        return self.outbox_path.parent / "bench.json"

    @property
    def state_dir(self) -> Path:
        """The agent's state: the outbox, bench.json, installed bundles (``bundles/``) and their pointer."""
        return self.outbox_path.parent


def load_config(path: Optional[os.PathLike | str] = None, **overrides: Any) -> AgentConfig:
    """Read a TOML config (or start from the defaults) and apply overrides."""
    if path is None:
        config = AgentConfig()
    else:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config {p} cannot be read ({exc.__class__.__name__}: {exc}); check the path") from exc
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config {p} is not valid TOML ({exc}); fix the line it names") from exc
        config = AgentConfig.from_dict(data, origin=str(p))
    return config.with_overrides(**overrides) if overrides else config
