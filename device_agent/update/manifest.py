"""The bundle contract: ``model.tflite`` + ``manifest.json`` in one directory.

The manifest is the single description both sides share: the host writes it
(``edgekit convert``), the board reads it (``edgekit-agent run``). See
docs/bundle.md for every field. A ``.tar.gz`` of the directory is how a bundle
travels; :func:`load_bundle` accepts either.

The model's sha256 is checked here, before any interpreter opens the file.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Tuple

from .. import limits
from ..errors import BundleError
from .archive import PLAIN_NAME, SIGNATURE_NAME, remove_tree, unpack

__all__ = [
    "FORMAT",
    "MANIFEST_NAME",
    "MODEL_NAME",
    "TensorSpec",
    "Preprocessing",
    "Manifest",
    "Bundle",
    "load_bundle",
    "sha256_file",
]

FORMAT = "edgekit-bundle/1"
MANIFEST_NAME = "manifest.json"
MODEL_NAME = "model.tflite"
_DTYPES = ("int8", "uint8", "int16", "int32", "float32", "float16")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MAX_TEXT = 256  # name, version, one label
_MAX_LABELS = 65536
_MAX_UNPACKED = 1 << 30  # a configured .tar.gz (local, but still bounded)


def _number(value: Any, what: str, **bounds: Any) -> float:
    return limits.check_number(value, what=f"manifest field '{what}'", error=BundleError, **bounds)


def sha256_file(path: os.PathLike | str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _require(data: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in data:
        raise BundleError(f"manifest field '{where}{key}' is missing; re-create the bundle with `edgekit convert`")
    return data[key]


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor of the model, as the interpreter sees it."""

    name: str
    shape: Tuple[int, ...]
    dtype: str
    scale: float = 0.0
    zero_point: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise BundleError(f"tensor dtype={self.dtype!r} is not supported; expected one of {_DTYPES}")
        if any(int(d) <= 0 and i > 0 for i, d in enumerate(self.shape)):
            raise BundleError(f"tensor shape={list(self.shape)} has a non-positive dimension")
        if not math.isfinite(self.scale) or self.scale < 0:
            raise BundleError(f"tensor scale={self.scale} must be a finite number >= 0")
        if not -(1 << 31) <= self.zero_point < (1 << 31):
            raise BundleError(f"tensor zero_point={self.zero_point} is out of the int32 range")

    @property
    def quantized(self) -> bool:
        return self.dtype in ("int8", "uint8", "int16") and self.scale > 0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> "TensorSpec":
        if not isinstance(data, Mapping):
            raise BundleError(f"manifest field '{where.rstrip('.')}' must be an object")
        zero_point = data.get("zero_point", 0)
        if isinstance(zero_point, bool) or not isinstance(zero_point, int):
            raise BundleError(f"manifest field '{where}zero_point'={zero_point!r} must be an integer")
        return cls(
            name=str(data.get("name", ""))[:_MAX_TEXT],
            shape=limits.check_shape(_require(data, "shape", where), what=f"manifest field '{where}shape'",
                                     error=BundleError, allow_batch=True),
            dtype=str(_require(data, "dtype", where)),
            scale=_number(data.get("scale", 0.0), f"{where}scale", lo=0.0),
            zero_point=zero_point,
        )

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "scale": self.scale,
            "zero_point": self.zero_point,
        }


@dataclass(frozen=True)
class Preprocessing:
    """How a raw input becomes the model's float input.

    ``model_input = resize(raw) * scale + offset``, then quantized with the
    input tensor's scale and zero point. ``kind`` is ``"image"`` (raw is an
    H x W x C picture, pixels 0..255) or ``"array"`` (raw is already shaped
    like ``shape``, e.g. sensor readings).
    """

    kind: str = "image"
    shape: Tuple[int, ...] = ()
    color: str = "grayscale"  # grayscale | rgb (images only)
    resize: str = "bilinear"  # bilinear | nearest | none
    scale: float = 1.0
    offset: float = 0.0
    raw_dtype: str = "uint8"

    def __post_init__(self) -> None:
        if self.kind not in ("image", "array"):
            raise BundleError(f"preprocessing.kind={self.kind!r} is not supported; expected 'image' or 'array'")
        if self.color not in ("grayscale", "rgb"):
            raise BundleError(f"preprocessing.color={self.color!r} is not supported; expected 'grayscale' or 'rgb'")
        if self.resize not in ("bilinear", "nearest", "none"):
            raise BundleError(f"preprocessing.resize={self.resize!r} is not supported; expected bilinear, nearest or none")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Preprocessing":
        if not isinstance(data, Mapping):
            raise BundleError("manifest field 'preprocessing' must be an object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise BundleError(f"manifest field 'preprocessing.{sorted(unknown)[0]}' is unknown; expected {sorted(known)}")
        kwargs = dict(data)
        if "shape" in kwargs:
            kwargs["shape"] = limits.check_shape(kwargs["shape"], what="manifest field 'preprocessing.shape'",
                                                 error=BundleError)
        for key in ("scale", "offset"):
            if key in kwargs:
                kwargs[key] = _number(kwargs[key], f"preprocessing.{key}", nonzero=key == "scale")
        for key in ("kind", "color", "resize", "raw_dtype"):
            if key in kwargs and not isinstance(kwargs[key], str):
                raise BundleError(f"manifest field 'preprocessing.{key}'={kwargs[key]!r} must be a string")
        return cls(**kwargs)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["shape"] = list(self.shape)
        return out


@dataclass(frozen=True)
class Manifest:
    """Everything a board needs to know about a model, and the proof of it."""

    name: str
    version: str
    sha256: str
    labels: Tuple[str, ...]
    input: TensorSpec
    output: TensorSpec
    preprocessing: Preprocessing
    quantization: Mapping[str, Any] = field(default_factory=dict)
    output_activation: str = "softmax"  # softmax | logits | sigmoid
    confidence_threshold: float = 0.5
    margin_threshold: float = 0.0
    metrics: Mapping[str, Any] = field(default_factory=dict)
    reference: Mapping[str, Any] = field(default_factory=dict)
    model_file: str = MODEL_NAME
    size_bytes: int = 0
    created: str = ""
    format: str = FORMAT

    def __post_init__(self) -> None:
        if self.format != FORMAT:
            raise BundleError(f"manifest format={self.format!r} is not supported; this agent reads {FORMAT!r}")
        if not self.labels:
            raise BundleError("manifest field 'labels' is empty; give the class names with `edgekit convert --labels`")
        if self.output_activation not in ("softmax", "logits", "sigmoid"):
            raise BundleError(
                f"manifest field 'output_activation'={self.output_activation!r}; expected softmax, logits or sigmoid"
            )
        if not 0.0 <= self.confidence_threshold <= 1.0:
            raise BundleError(f"manifest field 'confidence_threshold'={self.confidence_threshold} must be within [0, 1]")
        if not 0.0 <= self.margin_threshold <= 1.0:
            raise BundleError(f"manifest field 'margin_threshold'={self.margin_threshold} must be within [0, 1]")
        if not PLAIN_NAME.match(self.model_file) or self.model_file in (MANIFEST_NAME, SIGNATURE_NAME):
            raise BundleError(f"manifest field 'model.file'={self.model_file[:200]!r} must be a plain file name in the "
                              "bundle directory (no '/', no '..'), like 'model.tflite'")
        if not _SHA256.match(self.sha256):
            raise BundleError(f"manifest field 'model.sha256'={self.sha256[:80]!r} is not a hex sha256")
        for key in ("name", "version"):
            if not 0 < len(getattr(self, key)) <= _MAX_TEXT:
                raise BundleError(f"manifest field '{key}' must be 1-{_MAX_TEXT} characters")
        if len(self.labels) > _MAX_LABELS or any(len(x) > _MAX_TEXT for x in self.labels):
            raise BundleError(f"manifest field 'labels' must hold at most {_MAX_LABELS} labels of at most "
                              f"{_MAX_TEXT} characters")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Manifest":
        if not isinstance(data, Mapping):
            raise BundleError("manifest.json must hold a JSON object")
        fmt = _require(data, "format", "")
        if fmt != FORMAT:
            raise BundleError(f"manifest format={fmt!r} is not supported; this agent reads {FORMAT!r}")
        model = _require(data, "model", "")
        conf = data.get("confidence", {}) or {}
        for what, value in (("model", model), ("confidence", conf)):
            if not isinstance(value, Mapping):
                raise BundleError(f"manifest field '{what}' must be an object")
        labels = _require(data, "labels", "")
        if isinstance(labels, (str, bytes)) or not isinstance(labels, list):
            raise BundleError("manifest field 'labels' must be a list of strings")
        size_bytes = model.get("size_bytes", 0)
        if isinstance(size_bytes, bool) or not isinstance(size_bytes, int) or size_bytes < 0:
            raise BundleError(f"manifest field 'model.size_bytes'={size_bytes!r} must be an integer >= 0")
        try:
            return cls(
                format=fmt,
                name=str(_require(data, "name", "")),
                version=str(_require(data, "version", "")),
                sha256=str(_require(model, "sha256", "model.")),
                model_file=str(model.get("file", MODEL_NAME)),
                size_bytes=size_bytes,
                labels=tuple(str(x) for x in labels),
                input=TensorSpec.from_dict(_require(data, "input", ""), "input."),
                output=TensorSpec.from_dict(_require(data, "output", ""), "output."),
                output_activation=str(data.get("output_activation", "softmax")),
                preprocessing=Preprocessing.from_dict(_require(data, "preprocessing", "")),
                quantization=dict(data.get("quantization", {}) or {}),
                confidence_threshold=_number(conf.get("threshold", 0.5), "confidence.threshold", lo=0.0, hi=1.0),
                margin_threshold=_number(conf.get("margin_threshold", 0.0), "confidence.margin_threshold",
                                         lo=0.0, hi=1.0),
                metrics=dict(data.get("metrics", {}) or {}),
                reference=dict(data.get("reference", {}) or {}),
                created=str(data.get("created", "")),
            )
        except (TypeError, ValueError, AttributeError) as exc:
            raise BundleError(f"manifest.json has a malformed value ({exc}); re-create the bundle with `edgekit convert`") from exc

    def to_dict(self) -> dict:
        return {
            "format": self.format,
            "name": self.name,
            "version": self.version,
            "created": self.created,
            "model": {"file": self.model_file, "sha256": self.sha256, "size_bytes": self.size_bytes},
            "labels": list(self.labels),
            "input": self.input.to_dict(),
            "output": self.output.to_dict(),
            "output_activation": self.output_activation,
            "preprocessing": self.preprocessing.to_dict(),
            "quantization": dict(self.quantization),
            "confidence": {"threshold": self.confidence_threshold, "margin_threshold": self.margin_threshold},
            "metrics": dict(self.metrics),
            "reference": dict(self.reference),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @property
    def model_ref(self) -> dict:
        """The ``model`` object every MQTT payload carries."""
        return {"name": self.name, "version": self.version, "sha256": self.sha256}


@dataclass(frozen=True)
class Bundle:
    """A bundle on disk whose model file matched its manifest's sha256."""

    path: Path
    manifest: Manifest

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest.model_file


def _extract_archive(archive: Path) -> Path:
    target = Path(tempfile.mkdtemp(prefix="edgekit-bundle-"))
    # The interpreter reads the model from here for as long as the process runs; removed at exit.
    atexit.register(remove_tree, target)
    try:
        with open(archive, "rb") as fh:
            return unpack(fh, target, what=f"bundle archive {archive}", max_total=_MAX_UNPACKED)
    except OSError as exc:
        raise BundleError(f"bundle archive {archive} cannot be read ({exc}); copy it again") from exc


def load_bundle(path: os.PathLike | str, verify: bool = True) -> Bundle:
    """Read a bundle directory (or ``.tar.gz``) and check its model's sha256.

    Raises :class:`BundleError` with one line that names the problem and the
    fix; the interpreter never sees a file that failed the check.
    """
    path = Path(path)
    if not path.exists():
        raise BundleError(f"bundle {path} does not exist; pass the directory `edgekit convert -o` wrote")
    if path.is_file():
        if not path.name.endswith((".tar.gz", ".tgz")):
            raise BundleError(f"bundle {path} is a file; pass a bundle directory or a .tar.gz of one")
        path = _extract_archive(path)
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        raise BundleError(f"bundle {path} has no {MANIFEST_NAME}; pass the directory `edgekit convert -o` wrote")
    try:
        with open(manifest_path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > limits.MAX_MANIFEST_BYTES:
                raise BundleError(f"{manifest_path} is {size} bytes, over the limit of {limits.MAX_MANIFEST_BYTES}")
            raw = fh.read(limits.MAX_MANIFEST_BYTES + 1)  # never more than the limit, whatever the file says
    except OSError as exc:
        raise BundleError(f"{manifest_path} cannot be read ({exc}); copy the bundle again") from exc
    data = limits.loads(raw, what=str(manifest_path), max_bytes=limits.MAX_MANIFEST_BYTES, error=BundleError)
    manifest = Manifest.from_dict(data)
    model_path = path / manifest.model_file
    if model_path.is_symlink() or not model_path.is_file():
        raise BundleError(f"bundle {path} has no {manifest.model_file}; copy the whole bundle directory")
    if verify:
        actual = sha256_file(model_path)
        if actual != manifest.sha256:
            raise BundleError(
                f"{model_path} sha256={actual[:12]}... does not match the manifest's {manifest.sha256[:12]}...; "
                "the file is corrupt or was replaced: copy the bundle again"
            )
    return Bundle(path=path, manifest=manifest)


def read_labels(value: Optional[Sequence[str] | str]) -> Tuple[str, ...]:
    """Labels from a comma list, a file with one label a line, or a sequence."""
    if value is None:
        return ()
    if isinstance(value, str):
        p = Path(value)
        if p.is_file():
            return tuple(line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip())
        return tuple(x.strip() for x in value.split(",") if x.strip())
    return tuple(str(x) for x in value)
