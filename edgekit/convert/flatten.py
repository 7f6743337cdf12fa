"""Flattening: a model that holds other models becomes one graph of plain layers, same weights.

The transfer-learning pattern every Keras tutorial teaches puts a pretrained
base (``MobileNetV2(include_top=False)``) inside a ``Sequential`` or functional
model. tfmot annotates and prunes only the top-level layers and refuses a model
used as a layer ("Quantizing a tf.keras Model inside another tf.keras Model is
not supported", tensorflow/model-optimization#957), so without flattening the
whole base, nearly every weight, gets no quantization-aware training.

:func:`flatten_model` replays the outer model's graph, layer by layer, on new
Keras tensors; wherever a node calls a nested ``Sequential``/functional model it
replays that model's graph instead, at any depth. Each plain layer is rebuilt
from its config and given the original's weights, so the result computes the
same function and the original model is left untouched. Specifically:

- a layer called more than once (a shared layer, or a nested model used twice)
  becomes one layer called as often: its weights stay shared;
- a nested model that was frozen (``trainable=False``) passes that to its layers;
  a nested model called with ``training=False`` (the tutorials' ``base(x,
  training=False)``) passes it to the calls of its layers, so its
  BatchNormalization keeps using the moving statistics;
- inner layer names that clash with another layer of the flat graph get the
  nested model's name as a prefix;
- a subclassed model used as a layer has no graph to replay: :class:`ModelError`.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Tuple

from ..errors import ModelError

__all__ = ["flatten_model", "is_nested", "nested_models"]

log = logging.getLogger(__name__)


def _is_model(layer: Any) -> bool:
    from .._keras import keras

    return isinstance(layer, keras.Model)


def _is_graph(model: Any) -> bool:
    from .._keras import keras

    return bool(getattr(model, "_is_graph_network", False)) or (isinstance(model, keras.Sequential) and model.built)


def nested_models(model: Any) -> List[str]:
    """Names of the models used as layers inside ``model`` (top level only)."""
    return [layer.name for layer in getattr(model, "layers", []) if _is_model(layer)]


def is_nested(model: Any) -> bool:
    """True when ``model`` holds another model as a layer."""
    return bool(nested_models(model))


class _Flattener:
    def __init__(self) -> None:
        from .._keras import keras

        self.keras = keras
        self.copies: Dict[int, Any] = {}  # id(original layer) -> its rebuilt layer
        self.names: set = set()

    def copy(self, layer: Any, prefix: str, frozen: bool) -> Any:
        key = id(layer)
        if key in self.copies:
            return self.copies[key]
        from tf_keras.src.saving.serialization_lib import SafeModeScope

        config = layer.get_config()
        name = layer.name
        if name in self.names:
            base = f"{prefix}_{name}" if prefix else name
            name, n = base, 1
            while name in self.names:
                n += 1
                name = f"{base}_{n}"
            config["name"] = name
        self.names.add(name)
        try:
            with SafeModeScope(False):  # a Lambda in the user's in-memory model: its function is already trusted
                fresh = layer.__class__.from_config(config)
        except Exception as exc:  # noqa: BLE001 - a custom layer without a complete get_config
            raise ModelError(
                f"layer {layer.name} ({type(layer).__name__}) cannot be rebuilt from its config to flatten the model "
                f"({type(exc).__name__}: {' '.join(str(exc).split())[:160]}); give the layer a get_config(), "
                "or convert with --mode ptq"
            ) from exc
        if frozen or not layer.trainable:
            fresh.trainable = False
        self.copies[key] = fresh
        return fresh

    def run(self, model: Any, inputs: List[Any], prefix: str, frozen: bool, call_kwargs: Dict[str, Any],
            seed: Optional[Dict[int, Any]] = None, skip: Optional[set] = None) -> List[Any]:
        """Replay ``model``'s graph on ``inputs``; returns its outputs (flat list).

        ``seed``: more original tensor ids -> new tensors; ``skip``: ids of layers not replayed (both to cut
        leading layers off a graph, :mod:`edgekit.convert.inputs`).
        """
        import tensorflow as tf

        if not _is_graph(model):
            raise ModelError(
                f"nested model {model.name} ({type(model).__name__}) is a subclassed model: it has no graph to flatten; "
                "rebuild it with the functional API, or convert with --mode ptq"
            )
        frozen = frozen or not model.trainable
        model_inputs = tf.nest.flatten(model.inputs)
        if len(model_inputs) != len(inputs):
            raise ModelError(f"nested model {model.name} takes {len(model_inputs)} inputs but is called with {len(inputs)}")
        tensors: Dict[int, Any] = {id(t): x for t, x in zip(model_inputs, inputs)}
        tensors.update(seed or {})
        depths = sorted(model._nodes_by_depth.keys(), reverse=True)  # noqa: SLF001 - the graph, as Functional runs it
        for depth in depths:
            for node in model._nodes_by_depth[depth]:  # noqa: SLF001
                if node.is_input or id(node.layer) in (skip or ()):
                    continue
                if any(id(t) not in tensors for t in node.keras_inputs):
                    continue  # a node of another graph that shares this layer

                def swap(value: Any) -> Any:
                    return tensors[id(value)] if id(value) in tensors else value

                args = tf.nest.map_structure(swap, node.call_args)
                kwargs = tf.nest.map_structure(swap, dict(node.call_kwargs))
                layer = node.layer
                if _is_model(layer):
                    inner_kwargs = dict(call_kwargs)
                    if "training" in kwargs and kwargs["training"] is not None:
                        inner_kwargs["training"] = kwargs["training"]
                    inner_inputs = tf.nest.flatten(args[0] if args else kwargs["inputs"])
                    outs = self.run(layer, inner_inputs, layer.name, frozen, inner_kwargs)
                    outputs = outs if isinstance(layer.output, (list, tuple)) else outs[0]
                else:
                    fresh = self.copy(layer, prefix, frozen)
                    if call_kwargs.get("training") is not None and _takes_training(layer) and "training" not in kwargs:
                        kwargs["training"] = call_kwargs["training"]
                    outputs = fresh(*args, **kwargs)
                for t, x in zip(tf.nest.flatten(node.outputs), tf.nest.flatten(outputs)):
                    tensors[id(t)] = x
        missing = [t for t in tf.nest.flatten(model.outputs) if id(t) not in tensors]
        if missing:
            raise ModelError(f"model {model.name}: outputs {[t.name for t in missing]} cannot be reached while flattening")
        return [tensors[id(t)] for t in tf.nest.flatten(model.outputs)]


def _takes_training(layer: Any) -> bool:
    return bool(getattr(layer, "_expects_training_arg", False))


def flatten_model(model: Any) -> Any:
    """``model`` with every nested model replaced by its layers (one functional graph, same weights).

    A model without nested models is returned as it is.
    """
    if not is_nested(model):
        return model
    keras = _Flattener().keras
    if not _is_graph(model):
        raise ModelError(
            f"model {model.name} ({type(model).__name__}) holds nested models but is subclassed: it has no graph to "
            "flatten; rebuild it with the functional API, or convert with --mode ptq"
        )
    flat = _Flattener()
    originals: List[Tuple[Any, Any]] = []
    new_inputs = []
    for t in model.inputs:
        name = t.name.split(":")[0]
        flat.names.add(name)
        new_inputs.append(keras.Input(batch_shape=tuple(t.shape), dtype=t.dtype, name=name))
    outputs = flat.run(model, new_inputs, "", False, {})
    flat_model = keras.Model(new_inputs if len(new_inputs) > 1 else new_inputs[0],
                             outputs if isinstance(model.output, (list, tuple)) else outputs[0], name=model.name)
    originals = [(orig, copy) for orig, copy in _pairs(model, flat.copies)]
    for orig, copy in originals:
        if orig.weights:
            copy.set_weights(orig.get_weights())
    log.info("flattened model %s: %d nested model(s) replaced by their %d layers", model.name, len(nested_models(model)),
             len(flat_model.layers))
    return flat_model


def _pairs(model: Any, copies: Dict[int, Any]) -> List[Tuple[Any, Any]]:
    """(original layer, its copy) for every plain layer reached through ``model``, nested ones included."""
    out, seen = [], set()

    def walk(m: Any) -> None:
        for layer in m.layers:
            if _is_model(layer):
                walk(layer)
            elif id(layer) in copies and id(layer) not in seen:
                seen.add(id(layer))
                out.append((layer, copies[id(layer)]))

    walk(model)
    return out
