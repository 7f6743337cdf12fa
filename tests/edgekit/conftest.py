"""Session fixtures for the converter tests: real digits, one trained CNN, one PTQ and one QAT bundle."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def keras():
    """tf_keras (TF_USE_LEGACY_KERAS=1), the Keras the converter and tfmot use."""
    from edgekit._keras import keras

    return keras


@pytest.fixture(scope="session")
def digits():
    from edgekit.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def float_model_path(tmp_path_factory, digits):
    """The example CNN (85k parameters) trained on digits, saved as a tf_keras .keras file."""
    from edgekit.models import digits_cnn, train

    model = digits_cnn()
    train(model, digits, 15, progress=False)
    path = tmp_path_factory.mktemp("model") / "digits.keras"
    model.save(path)
    return path


@pytest.fixture(scope="session")
def ptq_result(tmp_path_factory, digits, float_model_path):
    from edgekit.convert import convert

    out = tmp_path_factory.mktemp("ptq") / "bundle"
    return convert(float_model_path, digits, mode="ptq", output=out, progress=False, name="digits")


@pytest.fixture(scope="session")
def qat_result(tmp_path_factory, digits, float_model_path):
    from edgekit.convert import convert

    out = tmp_path_factory.mktemp("qat") / "bundle"
    return convert(float_model_path, digits, mode="qat", output=out, epochs=3, progress=False, name="digits")
