"""The example model (a small CNN for the digits) and a plain training loop.

``digits_cnn`` takes model inputs already scaled to 0..1 (the data set's
preprocessing does that) and ends in a softmax.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Tuple

from .data import Dataset
from .errors import DataError

__all__ = ["digits_cnn", "train", "seed_everything"]

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and TensorFlow (process-wide settings such as op determinism are left alone)."""
    from ._keras import keras

    keras.utils.set_random_seed(int(seed))


def digits_cnn(num_classes: int = 10, input_shape: Tuple[int, ...] = (8, 8, 1), seed: int = 0, *, width: int = 32) -> Any:
    """A small CNN (about 85k parameters at ``width=32``) for 8x8 grayscale digits.

    ``width`` scales every layer (the test fixtures use a narrower one).
    """
    from ._keras import keras

    seed_everything(seed)
    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input(shape=tuple(input_shape), name="image"),
            layers.Conv2D(width, 3, padding="same", activation="relu", name="conv1"),
            layers.Conv2D(2 * width, 3, padding="same", activation="relu", name="conv2"),
            layers.MaxPooling2D(2, name="pool"),
            layers.Flatten(name="flatten"),
            layers.Dropout(0.25, seed=seed, name="dropout"),
            layers.Dense(2 * width, activation="relu", name="dense"),
            layers.Dense(num_classes, activation="softmax", name="scores"),
        ],
        name="digits_cnn",
    )
    return model


def train(
    model: Any,
    dataset: Dataset,
    epochs: int,
    *,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
    from_logits: bool = False,
    validation: bool = False,
) -> Any:
    """Train ``model`` on ``dataset``'s train split (model inputs, sparse labels); returns the History."""
    from ._keras import keras

    if epochs < 0:
        raise DataError(f"epochs={epochs} must be >= 0")
    seed_everything(seed)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits),
        metrics=["accuracy"],
    )
    val: Optional[tuple] = (dataset.model_inputs(dataset.x_test), dataset.y_test) if validation else None
    return model.fit(
        dataset.model_inputs(dataset.x_train),
        dataset.y_train,
        epochs=int(epochs),
        batch_size=int(batch_size),
        shuffle=True,
        validation_data=val,
        verbose=1 if progress else 0,
    )
