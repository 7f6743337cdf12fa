"""Flattening nested models (edgekit.convert.flatten): the flat float model computes what the nested one does, on
the nestings users build (a pretrained base in a Sequential or functional model, two levels, shared layers, a
frozen base called with training=False), and QAT then reaches the base's layers."""

from __future__ import annotations

import numpy as np
import pytest

from edgekit.convert.flatten import flatten_model, nested_models
from edgekit.errors import ModelError


def _x(shape, n=5, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n,) + tuple(shape)).astype(np.float32)


def _same(original, flat, x):
    assert not nested_models(flat), [layer.name for layer in flat.layers]
    want = np.asarray(original(x, training=False))
    got = np.asarray(flat(x, training=False))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert flat.count_params() == original.count_params()


def _conv_block(keras, name):
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv")(inp)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU(6.0, name="relu")(x)
    y = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = keras.layers.Add(name="add")([x, y])
    return keras.Model(inp, x, name=name)


def _randomize(model):
    rng = np.random.default_rng(1)
    model.set_weights([rng.normal(0, 0.3, w.shape).astype(np.float32) if w.ndim else w for w in model.get_weights()])
    for layer in model.layers if not hasattr(model, "submodules") else model.submodules:
        if type(layer).__name__ == "BatchNormalization":  # positive variances
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([gamma, beta, mean, np.abs(var) + 0.5])


def test_functional_base_in_sequential(keras):
    base = _conv_block(keras, "base")
    model = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Rescaling(1 / 127.5, offset=-1), base,
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(4, activation="softmax")])
    _randomize(model)
    flat = flatten_model(model)
    _same(model, flat, _x((16, 16, 3)))
    # the nested base's layers now sit in the outer graph, right after the outer Rescaling (whatever Keras named it)
    assert [layer.name for layer in flat.layers][1:5] == [model.layers[0].name, "conv", "bn", "relu"]


def test_sequential_in_functional_called_with_training_false(keras):
    head = keras.Sequential([keras.Input((16, 16, 8)), keras.layers.Conv2D(4, 1), keras.layers.BatchNormalization()],
                            name="head")
    inp = keras.Input((16, 16, 3))
    x = _conv_block(keras, "base")(inp, training=False)
    x = head(x, training=False)
    out = keras.layers.Dense(3)(keras.layers.Flatten()(x))
    model = keras.Model(inp, out)
    _randomize(model)
    flat = flatten_model(model)
    x = _x((16, 16, 3))
    _same(model, flat, x)
    # training=False travels to the base's BatchNormalization: a training-mode call matches the original too
    np.testing.assert_allclose(np.asarray(flat(x, training=True)), np.asarray(model(x, training=True)), rtol=1e-4, atol=1e-4)


def test_two_levels_and_clashing_names(keras):
    inner = _conv_block(keras, "inner")
    mid_in = keras.Input((16, 16, 3))
    mid = keras.Model(mid_in, keras.layers.Conv2D(5, 1, name="conv")(inner(mid_in)), name="mid")
    model = keras.Sequential([keras.Input((16, 16, 3)), mid, keras.layers.Flatten(), keras.layers.Dense(2)])
    _randomize(model)
    flat = flatten_model(model)
    _same(model, flat, _x((16, 16, 3)))
    names = [layer.name for layer in flat.layers]
    assert len(names) == len(set(names)) and "mid_conv" in names


def test_shared_layers_and_a_base_used_twice_stay_shared(keras):
    base = _conv_block(keras, "base")
    a, b = keras.Input((16, 16, 3)), keras.Input((16, 16, 3))
    shared = keras.layers.Dense(3, name="shared")
    pa = keras.layers.GlobalAveragePooling2D()(base(a))
    pb = keras.layers.GlobalAveragePooling2D()(base(b))
    model = keras.Model([a, b], keras.layers.Add()([shared(pa), shared(pb)]))
    _randomize(model)
    flat = flatten_model(model)
    xa, xb = _x((16, 16, 3)), _x((16, 16, 3), seed=3)
    np.testing.assert_allclose(np.asarray(flat([xa, xb])), np.asarray(model([xa, xb])), rtol=1e-5, atol=1e-5)
    assert flat.count_params() == model.count_params()  # one copy of the base's weights, not two


def test_frozen_base_stays_frozen_and_original_is_untouched(keras):
    base = _conv_block(keras, "base")
    base.trainable = False
    model = keras.Sequential([keras.Input((16, 16, 3)), base, keras.layers.Flatten(), keras.layers.Dense(2)])
    before = [w.copy() for w in model.get_weights()]
    flat = flatten_model(model)
    assert {layer.name for layer in flat.layers if layer.weights and not layer.trainable} == {"conv", "bn", "dw"}
    flat.set_weights([w + 1 for w in flat.get_weights()])
    for w, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(w, b)


def test_a_subclassed_model_inside_is_one_clear_error(keras):
    class Block(keras.Model):
        def __init__(self):
            super().__init__(name="block")
            self.conv = keras.layers.Conv2D(2, 1)

        def call(self, x):
            return self.conv(x)

    inp = keras.Input((16, 16, 3))
    model = keras.Model(inp, keras.layers.Flatten()(Block()(inp)))
    with pytest.raises(ModelError, match="block .* subclassed .* --mode ptq"):
        flatten_model(model)


def test_a_model_without_nested_models_is_returned_as_is(keras):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    assert flatten_model(model) is model


@pytest.fixture(scope="module")
def tutorial_model(keras):
    """The transfer-learning tutorial's model: MobileNetV2 (alpha 0.35, 96x96x3, no top) inside a Sequential."""
    base = keras.applications.MobileNetV2(alpha=0.35, input_shape=(96, 96, 3), include_top=False, weights=None)
    model = keras.Sequential([keras.Input((96, 96, 3)), keras.layers.Rescaling(1 / 127.5, offset=-1), base,
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3, activation="softmax")])
    _randomize(model)
    return model


def test_tutorial_mobilenetv2_flattens_to_the_same_function(tutorial_model):
    flat = flatten_model(tutorial_model)
    _same(tutorial_model, flat, _x((96, 96, 3), n=3))
    assert len(flat.layers) > 150


@pytest.mark.slow
def test_qat_reaches_the_mobilenetv2_base(tutorial_model):
    """Before flattening tfmot left the whole base float; now every parameter is under QAT and only the Rescaling
    (no parameters, not in tfmot's registry) is left float, by name."""
    from edgekit.convert import quantize as q
    from edgekit.data import Dataset, _image_preprocessing

    x, y = _x((96, 96, 3), n=6), np.arange(6) % 3
    data = Dataset(x, y, x, y, ("a", "b", "c"), _image_preprocessing((96, 96, 3), 255.0))
    r = q.quantize_aware(tutorial_model, data, epochs=0, fallback="ptq", progress=False, from_logits=False)
    cov = r.coverage
    assert r.mode == "qat" and cov["flattened"] == ["mobilenetv2_0.35_96"]
    assert cov["parameters_qat"] == cov["parameters"] == tutorial_model.count_params()
    assert [(f["class"], f["parameters"]) for f in cov["float_layers"]] == [("Rescaling", 0)]
    wrapped = [layer for layer in r.model.layers if type(layer).__name__ == "QuantizeWrapperV2"]
    kinds = {type(layer.layer).__name__ for layer in wrapped}
    assert {"Conv2D", "DepthwiseConv2D", "ReLU", "Add", "Dense"} <= kinds
