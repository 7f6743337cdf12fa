"""Load a Keras model from ``.keras``, ``.h5`` or a SavedModel directory into tf_keras (Keras 2).

QAT needs Keras 2. A model saved by Keras 3 is rebuilt: its config is
translated to Keras 2 terms (``batch_shape`` -> ``batch_input_shape``, dtype
policies -> dtype names, the new node format -> the old one, keyword
arguments Keras 2 does not know are dropped) and its weights are read from the
file layer by layer. When that is impossible, one :class:`ModelError` line says
why and what to do.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import zipfile
from pathlib import Path
from typing import Any, Dict, List

from ..errors import ModelError

__all__ = ["load_model", "model_file_size"]

log = logging.getLogger(__name__)

_BASE_KWARGS = {"name", "trainable", "dtype", "batch_input_shape", "input_shape", "batch_size", "input_dim", "dynamic", "autocast"}


def model_file_size(path: os.PathLike | str) -> int:
    """Bytes of a model file, or the sum over a SavedModel directory."""
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size


def load_model(path: os.PathLike | str) -> Any:
    """A tf_keras model from ``path`` (``.keras``, ``.h5`` or a SavedModel directory)."""
    from .._keras import keras

    p = Path(path)
    if not p.exists():
        raise ModelError(f"model {p} does not exist; pass a .keras, .h5 file or a SavedModel directory (or 'example')")
    if p.is_dir() and not (p / "saved_model.pb").is_file():
        raise ModelError(f"model directory {p} has no saved_model.pb; pass a SavedModel directory, .keras or .h5 file")
    if p.is_file() and p.suffix.lower() not in (".keras", ".h5", ".hdf5"):
        raise ModelError(f"model {p} has suffix {p.suffix!r}; pass a .keras, .h5 file or a SavedModel directory")
    first_error: Exception
    try:
        return keras.models.load_model(str(p), compile=False)
    except Exception as exc:  # noqa: BLE001 - Keras raises anything from a bad file
        first_error = exc
    if p.is_file():
        config = _keras3_config(p)
        if config is not None:
            log.info("%s was saved by Keras 3; rebuilding it in Keras 2 (tf_keras)", p)
            try:
                return _rebuild(p, config)
            except ModelError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise ModelError(
                    f"model {p} was saved by Keras 3 and cannot be rebuilt in Keras 2 ({type(exc).__name__}: "
                    f"{_short(exc)}); save it with tf_keras, or export a SavedModel"
                ) from exc
    raise ModelError(
        f"model {p} cannot be loaded ({type(first_error).__name__}: {_short(first_error)}); "
        "check the file is a complete Keras model, or save it again"
    ) from first_error


def _short(exc: Exception) -> str:
    return " ".join(str(exc).split())[:200]


def _keras3_config(p: Path) -> Dict[str, Any] | None:
    try:
        if zipfile.is_zipfile(p):
            with zipfile.ZipFile(p) as zf:
                if "config.json" not in zf.namelist():
                    return None
                meta = json.loads(zf.read("metadata.json")) if "metadata.json" in zf.namelist() else {}
                if not str(meta.get("keras_version", "3")).startswith("3"):
                    return None
                return json.loads(zf.read("config.json"))
        import h5py

        with h5py.File(p, "r") as f:
            if not str(f.attrs.get("keras_version", "")).startswith("3"):
                return None
            raw = f.attrs.get("model_config")
            return json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None


def _strip(obj: Any) -> Any:
    """Keras 3 serialization -> Keras 2: drop module/registered_name, unwrap dtype policies."""
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if obj.get("class_name") == "DTypePolicy" or obj.get("class_name") == "FloatDTypePolicy":
        return obj.get("config", {}).get("name", "float32")
    if obj.get("class_name") == "__keras_tensor__":
        return obj
    out = {}
    for key, value in obj.items():
        if key in ("module", "registered_name", "shared_object_id", "build_config", "compile_config"):
            continue
        out[key] = _strip(value)
    return out


def _history(obj: Any, found: List[list]) -> None:
    if isinstance(obj, dict):
        if obj.get("class_name") == "__keras_tensor__":
            name, node, index = obj["config"]["keras_history"]
            found.append([name, node, index, {}])
            return
        for v in obj.values():
            _history(v, found)
    elif isinstance(obj, list):
        for v in obj:
            _history(v, found)


def _layer(layer: Dict[str, Any]) -> Dict[str, Any]:
    from .._keras import keras

    cls_name = layer["class_name"]
    cfg = dict(layer.get("config", {}))
    if cls_name == "InputLayer":
        if "batch_shape" in cfg:
            cfg["batch_input_shape"] = cfg.pop("batch_shape")
        cfg.pop("optional", None)
    for key in [k for k in cfg if k.endswith("_initializer")]:
        cfg.pop(key)  # weights are loaded from the file; initial values do not matter
    klass = getattr(keras.layers, cls_name, None)
    if klass is None:
        raise ModelError(f"layer class {cls_name!r} does not exist in Keras 2; save the model with tf_keras instead")
    allowed = set(inspect.signature(klass.__init__).parameters) | _BASE_KWARGS
    dropped = [k for k in cfg if k not in allowed]
    for key in dropped:
        cfg.pop(key)
    if dropped:
        log.debug("layer %s: dropped Keras 3 arguments %s", cfg.get("name"), dropped)
    out = {"class_name": cls_name, "config": cfg}
    if "name" in layer:
        out["name"] = layer["name"]
    if "inbound_nodes" in layer:
        nodes = []
        for node in layer["inbound_nodes"]:
            if isinstance(node, dict):  # Keras 3: {"args": [...], "kwargs": {...}}
                found: List[list] = []
                _history(node.get("args", []), found)
                nodes.append(found)
            else:
                nodes.append(node)
        out["inbound_nodes"] = nodes
    return out


def _rebuild(p: Path, config: Dict[str, Any]) -> Any:
    from .._keras import keras

    cls_name = config.get("class_name")
    cfg = _strip(config.get("config", {}))
    if cls_name not in ("Sequential", "Functional", "Model"):
        raise ModelError(f"model {p} is a subclassed Keras 3 model ({cls_name}); save it with tf_keras or as a SavedModel")
    cfg["layers"] = [_layer(_strip(layer)) for layer in config["config"]["layers"]]
    for key in ("input_layers", "output_layers"):
        if key in cfg and cfg[key] and not isinstance(cfg[key][0], list):
            cfg[key] = [cfg[key]]
    cfg.pop("build_input_shape", None) if cls_name != "Sequential" else None
    if cls_name == "Sequential":
        model = keras.Sequential.from_config(cfg)
    else:
        model = keras.Model.from_config(cfg)
    _load_weights(p, model)
    return model


def _load_weights(p: Path, model: Any) -> None:
    import h5py
    import numpy as np

    def assign(layer: Any, arrays: List[Any]) -> None:
        expected = [tuple(w.shape) for w in layer.weights]
        got = [tuple(a.shape) for a in arrays]
        if expected != got:
            raise ModelError(f"layer {layer.name}: file weights {got} do not fit the rebuilt layer {expected}; save with tf_keras")
        layer.set_weights(arrays)

    if zipfile.is_zipfile(p):
        import tempfile

        with zipfile.ZipFile(p) as zf, tempfile.TemporaryDirectory() as tmp:
            zf.extract("model.weights.h5", tmp)
            with h5py.File(Path(tmp) / "model.weights.h5", "r") as f:
                for layer in model.layers:
                    if not layer.weights:
                        continue
                    group = f.get(f"layers/{layer.name}/vars")
                    if group is None:
                        raise ModelError(f"layer {layer.name} has no weights in {p}; save the model with tf_keras")
                    assign(layer, [np.asarray(group[str(i)]) for i in range(len(group))])
        return
    with h5py.File(p, "r") as f:
        root = f["model_weights"] if "model_weights" in f else f
        for layer in model.layers:
            if not layer.weights:
                continue
            group = root.get(layer.name)
            if group is None:
                raise ModelError(f"layer {layer.name} has no weights in {p}; save the model with tf_keras")
            arrays: Dict[str, Any] = {}

            def collect(name: str, obj: Any, arrays: Dict[str, Any] = arrays) -> None:
                if isinstance(obj, h5py.Dataset):
                    arrays.setdefault(name.split("/")[-1].split(":")[0], np.asarray(obj))

            group.visititems(collect)
            names = [w.name.split("/")[-1].split(":")[0] for w in layer.weights]
            if any(n not in arrays for n in names):
                raise ModelError(f"layer {layer.name}: weights {names} not all found in {p}; save the model with tf_keras")
            assign(layer, [arrays[n] for n in names])
