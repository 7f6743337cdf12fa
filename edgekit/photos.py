"""Real photographs as an image folder, and the model the Keras transfer-learning tutorials build for them.

:func:`write_photo_folder`: scikit-learn's two sample photos (they ship with the package: no download) cut into
patches of three classes, written as JPEG and PNG files of varied sizes, the way a user's folder of camera pictures
looks. :func:`tutorial_model`: MobileNetV2 (alpha 0.35, 96x96x3, no top, random init) nested in
``Sequential([Input, Rescaling(1/127.5, offset=-1), base, GlobalAveragePooling2D(), Dense(k, softmax)])``;
:func:`train_tutorial_model` trains it from scratch on raw pixels 0..255 (the model rescales them itself).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["REGIONS", "write_photo_folder", "tutorial_model", "train_tutorial_model"]

#: class name -> (photo index in load_sample_images(), rows, cols) of the region its patches come from
REGIONS = {
    "flower": (1, (60, 400), (100, 560)),
    "roof": (0, (0, 200), (0, 640)),
    "garden": (0, (250, 427), (0, 640)),
}


def write_photo_folder(root: Path, per_class: int = 40, size: int = 96, seed: int = 0) -> Path:
    """``root/<class>/NNN.jpg|png``: ``per_class`` patches per class; the first of each is ``size`` x ``size``
    (the folder's input shape), the others 0.8x..1.6x that, so the loader resizes them."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for name, (which, (r0, r1), (c0, c1)) in REGIONS.items():
        folder = root / name
        folder.mkdir(exist_ok=True)
        for i in range(per_class):
            side = size if i == 0 else int(size * rng.uniform(0.8, 1.6))
            side = min(side, r1 - r0, c1 - c0)
            r = int(rng.integers(r0, r1 - side + 1))
            c = int(rng.integers(c0, c1 - side + 1))
            patch = Image.fromarray(photos[which][r:r + side, c:c + side])
            if i % 3 == 2:
                patch.save(folder / f"{i:03d}.png")
            else:
                patch.save(folder / f"{i:03d}.jpg", quality=90)
    return root


def tutorial_model(num_classes: int = 3, size: int = 96, seed: int = 0) -> Any:
    """The tutorial's nested model (random init). Its BatchNormalization momentum is 0.9 instead of MobileNetV2's
    0.999, so that the moving statistics settle within the few hundred steps of training from scratch here."""
    from ._keras import keras
    from .models import seed_everything

    seed_everything(seed)
    base = keras.applications.MobileNetV2(alpha=0.35, input_shape=(size, size, 3), include_top=False, weights=None)
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    return keras.Sequential([keras.Input((size, size, 3)), keras.layers.Rescaling(1 / 127.5, offset=-1), base,
                             keras.layers.GlobalAveragePooling2D(),
                             keras.layers.Dense(num_classes, activation="softmax")])


def train_tutorial_model(model: Any, x_raw: np.ndarray, y: np.ndarray, seed: int = 0) -> Any:
    """7 epochs at 3e-3 then 2 at 5e-4 (Adam, batch 8) on raw pixels; returns ``model``."""
    from ._keras import keras
    from .models import seed_everything

    seed_everything(seed)
    for lr, epochs in ((3e-3, 7), (5e-4, 2)):
        model.compile(keras.optimizers.Adam(lr), "sparse_categorical_crossentropy")
        model.fit(x_raw, y, epochs=epochs, batch_size=8, shuffle=True, verbose=0)
    return model
