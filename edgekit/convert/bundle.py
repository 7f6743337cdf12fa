"""Writing bundles: ``model.tflite`` + ``manifest.json`` (+ ``report/``), atomically; packing to ``.tar.gz``.

The format is defined once, by :class:`device_agent.update.manifest.Manifest`; this
module only fills it in. See docs/bundle.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tarfile
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

from device_agent.delivery import protocol
from device_agent.update.manifest import MANIFEST_NAME, MODEL_NAME, Manifest, Preprocessing, TensorSpec, sha256_file

from ..errors import ModelError, OutputExistsError

__all__ = ["write_bundle", "rewrite_manifest", "atomic_dir", "check_output", "pack", "FLOAT_MODEL_NAME"]

#: The float Keras model a bundle came from, kept beside it on the workstation for the next retrain.
FLOAT_MODEL_NAME = "float_model.keras"

log = logging.getLogger(__name__)


def check_output(path: os.PathLike | str, force: bool) -> Path:
    """Fail early (before any work) when ``path`` exists and ``force`` is not set."""
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"output {path} exists; pass --force to replace it, or choose another -o")
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"output {path} exists and is a file; remove it or choose another -o")
    return path


@contextlib.contextmanager
def atomic_dir(path: os.PathLike | str, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path``, on error it vanishes."""
    path = check_output(path, force)
    parent = path.parent if str(path.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
        old: Optional[Path] = None
        if path.exists():
            check_output(path, force)
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _specs(model_path: Path) -> tuple[TensorSpec, TensorSpec]:
    from device_agent.inference.interpreter import TFLiteModel

    with TFLiteModel.open(model_path) as model:
        return model.input_spec, model.output_spec


def write_bundle(
    directory: os.PathLike | str,
    model_bytes: bytes,
    *,
    name: str,
    version: str,
    labels: Sequence[str],
    preprocessing: Preprocessing,
    quantization: Mapping[str, Any],
    output_activation: str = "softmax",
    confidence_threshold: float = 0.5,
    margin_threshold: float = 0.0,
    metrics: Optional[Mapping[str, Any]] = None,
    reference: Optional[Mapping[str, Any]] = None,
) -> Manifest:
    """Write ``model.tflite`` and ``manifest.json`` into an existing ``directory``; returns the manifest."""
    directory = Path(directory)
    model_path = directory / MODEL_NAME
    model_path.write_bytes(model_bytes)
    input_spec, output_spec = _specs(model_path)
    manifest = Manifest(
        name=name,
        version=str(version),
        sha256=sha256_file(model_path),
        labels=tuple(labels),
        input=input_spec,
        output=output_spec,
        preprocessing=preprocessing,
        quantization=dict(quantization),
        output_activation=output_activation,
        confidence_threshold=float(confidence_threshold),
        margin_threshold=float(margin_threshold),
        metrics=dict(metrics or {}),
        reference=dict(reference or {}),
        model_file=MODEL_NAME,
        size_bytes=len(model_bytes),
        created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    (directory / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
    return manifest


def rewrite_manifest(directory: os.PathLike | str, manifest: Manifest) -> None:
    """Replace ``manifest.json`` in ``directory`` (atomically, via a temp file)."""
    target = Path(directory) / MANIFEST_NAME
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(manifest.to_json(), encoding="utf-8")
    os.replace(tmp, target)


def pack(bundle_dir: os.PathLike | str, output: Optional[os.PathLike | str] = None, *, everything: bool = False) -> Path:
    """``bundle_dir`` as ``<bundle_dir>.tar.gz`` (one top-level folder); returns the archive's path.

    By default the archive holds what a board needs, ``manifest.json`` and the model; the report and
    ``float_model.keras`` stay on the workstation (``everything=True`` packs the whole directory).
    """
    bundle_dir = Path(bundle_dir)
    if not (bundle_dir / MANIFEST_NAME).is_file():
        raise ModelError(f"{bundle_dir} is not a bundle (no {MANIFEST_NAME}); pass the directory `edgekit convert -o` wrote")
    out = Path(output) if output else bundle_dir.with_name(bundle_dir.name + ".tar.gz")
    tmp = out.with_name(out.name + ".tmp")
    try:
        if everything:
            with tarfile.open(tmp, "w:gz") as tar:
                tar.add(bundle_dir, arcname=bundle_dir.name)
        else:  # the board's part, packed exactly as `edgekit fleet push` sends it
            tmp.write_bytes(protocol.pack_bundle(bundle_dir))
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out
