"""Where inputs come from: a folder, an ``.npy``/``.npz`` batch, a camera, an MQTT topic, or an array.

A source's :meth:`items` yields ``(info, raw)`` pairs: ``info`` is the
``source`` object a sample payload carries (``{"uri", "index", "id"?}``) and
``raw`` the input in raw units. An input that cannot be read is yielded as an
:class:`InputError` in place of the array, so the agent logs it, counts it and
goes on. Endless sources yield ``None`` while idle so the agent can publish,
send telemetry and notice a stop in the meantime.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple, Union

import numpy as np

from . import limits
from .errors import ConfigError, InputError
from .inference.npy import MAGIC, read_npy
from .inference.preprocess import IMAGE_SUFFIXES, load_raw

__all__ = ["Item", "Source", "ArraySource", "FolderSource", "NpySource", "CameraSource", "MqttSource", "open_source"]

log = logging.getLogger(__name__)

Item = Optional[Tuple[Dict[str, Any], Union[np.ndarray, InputError]]]
_IDLE_S = 0.1


class Source:
    """Base class: ``finite`` sources end; the others run until ``stop`` is set."""

    finite = True

    def items(self, stop: threading.Event) -> Iterator[Item]:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        pass


class ArraySource(Source):
    """Rows of an in-memory array (the first axis indexes inputs); ``ids`` travel in ``source.id``."""

    def __init__(self, x: Union[np.ndarray, Sequence[np.ndarray]], ids: Optional[Sequence[Any]] = None,
                 uri: str = "array"):
        self.x = list(x) if isinstance(x, (list, tuple)) else np.asarray(x)  # a list may mix shapes
        if ids is not None and len(ids) != len(self.x):
            raise ConfigError(f"ArraySource ids has {len(ids)} entries, expected={len(self.x)} (one per row)")
        self.ids = ids
        self.uri = uri

    def items(self, stop: threading.Event) -> Iterator[Item]:
        for i in range(len(self.x)):
            if stop.is_set():
                return
            info: Dict[str, Any] = {"uri": self.uri, "index": i}
            if self.ids is not None:
                v = self.ids[i]
                info["id"] = v.item() if isinstance(v, np.generic) else v
            yield info, np.asarray(self.x[i])


class NpySource(ArraySource):
    """An ``.npy`` batch, or one array (``key``) of an ``.npz``; rows are inputs."""

    def __init__(self, path: str, key: str = "x"):
        p = Path(path)
        try:
            if p.suffix.lower() == ".npz":
                with np.load(p, allow_pickle=False) as data:
                    if key not in data.files:
                        raise ConfigError(f"config [source].key={key!r} is not in {p}; it holds {data.files}")
                    x = data[key]
            else:
                x = np.load(p, allow_pickle=False, mmap_mode="r")
        except ConfigError:
            raise
        except (OSError, ValueError, EOFError) as exc:
            raise ConfigError(f"config [source].path={str(p)!r} is not a readable .npy/.npz ({exc}); check the file") from exc
        if x.ndim < 1:
            raise ConfigError(f"config [source].path={str(p)!r} holds a scalar; inputs must be rows of an array")
        super().__init__(x, uri=str(p))


class FolderSource(Source):
    """Image and ``.npy`` files of a folder in name order; with ``watch``, new files as they appear."""

    def __init__(self, path: str, watch: bool = False, poll_interval_s: float = 1.0, color: str = "grayscale"):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ConfigError(f"config [source].path={str(self.path)!r} is not a folder; create it or fix the path")
        self.watch = watch
        self.finite = not watch
        self.poll_interval_s = poll_interval_s
        self.color = color
        self._seen: set = set()
        self._index = 0

    def _new_files(self):
        found = []
        for p in sorted(self.path.iterdir()):
            if p.name in self._seen or p.name.startswith(".") or not p.is_file():
                continue
            if p.suffix.lower() not in IMAGE_SUFFIXES + (".npy",):
                continue
            found.append(p)
        return found

    def items(self, stop: threading.Event) -> Iterator[Item]:
        while not stop.is_set():
            files = self._new_files()
            if self.watch and files:
                # A file still being written changes size; take it on the next poll.
                time.sleep(min(0.05, self.poll_interval_s))
                files = [p for p in files if _stable(p)]
            for p in files:
                if stop.is_set():
                    return
                self._seen.add(p.name)
                info = {"uri": str(p), "index": self._index}
                self._index += 1
                try:
                    yield info, load_raw(p, self.color)
                except InputError as exc:
                    yield info, exc
            if not self.watch:
                return
            deadline = time.monotonic() + self.poll_interval_s
            while time.monotonic() < deadline and not stop.is_set():
                yield None
                time.sleep(min(_IDLE_S, max(0.0, deadline - time.monotonic())))


def _stable(p: Path) -> bool:
    try:
        size = p.stat().st_size
        time.sleep(0.01)
        return size > 0 and p.stat().st_size == size
    except OSError:
        return False


class CameraSource(Source):
    """Frames of a camera through OpenCV (RGB, H x W x 3), endless."""

    finite = False

    def __init__(self, index: int = 0, fps: float = 0.0):
        try:
            import cv2  # optional: only boards with a camera install it
        except ImportError as exc:
            raise ConfigError(
                "config [source].kind='camera' needs OpenCV, which is not installed; "
                "pip install opencv-python-headless, or use kind='folder'"
            ) from exc
        self._cv2 = cv2
        self.index = index
        self.period = 1.0 / fps if fps > 0 else 0.0
        self.cap = cv2.VideoCapture(index)
        if not self.cap.isOpened():
            raise ConfigError(f"config [source].camera_index={index} cannot be opened; check the camera and its index")

    def items(self, stop: threading.Event) -> Iterator[Item]:
        i = 0
        next_t = time.monotonic()
        while not stop.is_set():
            if self.period and time.monotonic() < next_t:
                yield None
                time.sleep(min(_IDLE_S, max(0.0, next_t - time.monotonic())))
                continue
            next_t = time.monotonic() + self.period
            ok, frame = self.cap.read()
            info = {"uri": f"camera:{self.index}", "index": i}
            i += 1
            if not ok or frame is None:
                yield info, InputError(f"camera {self.index} returned no frame; check the cable or the device")
                time.sleep(0.5)
                continue
            yield info, self._cv2.cvtColor(frame, self._cv2.COLOR_BGR2RGB)

    def close(self) -> None:
        self.cap.release()


def decode_reading(payload: bytes, dtype: str = "float32", shape: Sequence[int] = (),
                   exact: bool = False) -> np.ndarray:
    """One sensor reading from an MQTT payload: JSON ``{"values": [...]}``, an ``.npy`` blob, or raw ``dtype`` bytes.

    Limits first (docs/agent.md, "Limits"): the payload's size (a multiple of the input's for ``shape``), a
    JSON payload's nesting depth, an ``.npy`` header's shape and dtype before its data is read; with
    ``exact`` (the model takes ``shape`` as is: no resizing) exactly ``prod(shape)`` values.
    """
    size = int(np.prod(shape)) if shape and exact else None
    max_bytes = limits.sensor_max_bytes(shape, dtype)
    if len(payload) > max_bytes:
        raise InputError(f"reading is {len(payload)} bytes, over the limit of {max_bytes} for this model's input")
    if payload[:6] == MAGIC:
        return read_npy(payload, what="reading (.npy)", expected_size=size)
    head = payload.lstrip()[:1]
    if head in (b"{", b"["):
        obj = limits.loads(payload, what="reading (JSON)", max_bytes=max_bytes, error=InputError)
        try:
            values = obj["values"] if isinstance(obj, dict) else obj
            arr = np.asarray(values, dtype=np.float64)
        except (ValueError, KeyError, TypeError, OverflowError) as exc:
            raise InputError(
                f"reading is not JSON {{\"values\": [...]}} of numbers ({exc.__class__.__name__}); fix the sensor's publisher"
            ) from exc
        if size is not None and arr.size != size:
            raise InputError(f"reading has {arr.size} values, expected={size} for this model's input {list(shape)}")
        return arr
    dt = np.dtype(dtype)
    if len(payload) == 0 or len(payload) % dt.itemsize:
        raise InputError(f"reading has {len(payload)} bytes, not a whole number of {dt.name} values")
    return np.frombuffer(payload, dtype=dt)


class MqttSource(Source):
    """Sensor readings published on an MQTT topic (subscribed through the agent's connection)."""

    finite = False

    def __init__(self, topic: str, dtype: str = "float32", shape: Sequence[int] = (), max_queue: int = 1000,
                 max_queue_bytes: int = 32 << 20, exact: bool = False):
        if not topic:
            raise ConfigError("config [source].topic is empty; kind='mqtt' needs the topic the sensor publishes on")
        self.topic = topic
        self.dtype = dtype
        self.shape = tuple(int(d) for d in shape)
        self.exact = exact
        self.max_bytes = limits.sensor_max_bytes(self.shape, dtype)
        self.max_queue_bytes = int(max_queue_bytes)
        self._queue: "queue.Queue[Tuple[str, bytes]]" = queue.Queue(max_queue)
        self._queued_bytes = 0
        self._lock = threading.Lock()
        self.overflow = 0
        self.refused = 0  # oversized readings dropped unread in the MQTT thread; reported as input errors
        self._refused_seen = 0

    def offer(self, topic: str, payload: bytes) -> None:
        """Called from the MQTT thread for each message on :attr:`topic`: an oversized reading is refused
        here, unread; the queue is bounded in messages and in bytes."""
        if len(payload) > self.max_bytes:
            self.refused += 1
            return
        with self._lock:
            if self._queued_bytes + len(payload) > self.max_queue_bytes:
                self.overflow += 1
                return
            try:
                self._queue.put_nowait((topic, payload))
            except queue.Full:
                self.overflow += 1
                return
            self._queued_bytes += len(payload)

    def items(self, stop: threading.Event) -> Iterator[Item]:
        i = 0
        while not stop.is_set():
            refused = self.refused
            if refused != self._refused_seen:
                n, self._refused_seen = refused - self._refused_seen, refused
                for _ in range(n):
                    yield {"uri": f"mqtt:{self.topic}", "index": i}, InputError(
                        f"reading over the limit of {self.max_bytes} bytes for this model's input; refused unread")
                    i += 1
            try:
                topic, payload = self._queue.get(timeout=_IDLE_S)
            except queue.Empty:
                yield None
                continue
            with self._lock:
                self._queued_bytes -= len(payload)
            info = {"uri": f"mqtt:{topic}", "index": i}
            i += 1
            try:
                x = decode_reading(payload, self.dtype, self.shape, self.exact)
            except InputError as exc:
                yield info, exc
                continue
            if self.shape and x.size == int(np.prod(self.shape)) and x.shape != self.shape:
                x = x.reshape(self.shape)  # a flat reading of an image-shaped input
            yield info, x


def open_source(cfg, color: str = "grayscale", raw_dtype: str = "float32", shape: Sequence[int] = (),
                exact: bool = False) -> Source:
    """Build the configured source (``cfg`` is a :class:`~device_agent.config.SourceConfig`);
    ``color``, ``raw_dtype`` and ``shape`` come from the bundle's preprocessing (``exact``: the model
    takes inputs of ``shape`` only, no resizing)."""
    if cfg.kind == "camera":
        return CameraSource(cfg.camera_index, cfg.fps)
    if cfg.kind == "mqtt":
        return MqttSource(cfg.topic, raw_dtype, shape, exact=exact)
    if not cfg.path:
        raise ConfigError(f"config [source].path is empty; kind={cfg.kind!r} needs a path (or pass --source PATH)")
    if not Path(cfg.path).exists():
        raise ConfigError(f"config [source].path={cfg.path!r} does not exist; check the path")
    if cfg.kind == "folder":
        return FolderSource(cfg.path, cfg.watch, cfg.poll_interval_s, color)
    if cfg.watch:
        raise ConfigError(f"config [source].watch=true needs kind='folder', not {cfg.kind!r}")
    return NpySource(cfg.path, cfg.key)
