"""A photo example: real photographs cut into labelled patches, written as a folder of picture files.

The photographs are the two that ship inside scikit-learn (``sklearn.datasets.load_sample_images``: a
pagoda above a lake, a dahlia); nothing is downloaded. Six classes are regions of them: ``sky``,
``pagoda``, ``water`` and ``trees`` from the first, ``dahlia`` and ``leaves`` from the second. Each patch
is a random crop of its region, resized to a random size and saved the ways pictures come from cameras
and phones: mostly JPEG, some PNG, some grayscale, some stored sideways with an EXIF orientation tag (the
board and the host turn them upright; docs/bundle.md, "Picture files")::

    write_photos("photos", per_class=40)            # photos/<class>/<n>.jpg|png
    data = load_dataset("photos:photos", image_shape=(96, 96, 3))   # written first when missing

The model the Keras transfer-learning tutorials build for such pictures is here too (the tests and
bench/bench_models.py use it): :func:`tutorial_model` is MobileNetV2 (alpha 0.35, 96x96x3, no top, random
init) nested in ``Sequential([Input, Rescaling(1/127.5, offset=-1), base, GlobalAveragePooling2D(),
Dense(k, softmax)])``; :func:`train_tutorial_model` trains it from scratch on raw pixels 0..255.
:func:`write_photo_folder` writes a three-class folder of the same photographs (flower, roof, garden) that the
tutorial model learns in a few epochs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

__all__ = ["CLASSES", "write_photos", "REGIONS", "write_photo_folder", "tutorial_model", "train_tutorial_model"]

# (photo, (left, top, right, bottom)) regions of the 640 x 427 sample photographs, per class.
_REGIONS: Dict[str, List[Tuple[str, Tuple[int, int, int, int]]]] = {
    "sky": [("china.jpg", (360, 0, 640, 120))],
    "pagoda": [("china.jpg", (85, 70, 330, 330))],
    "water": [("china.jpg", (340, 228, 545, 300))],
    "trees": [("china.jpg", (330, 290, 560, 427)), ("china.jpg", (0, 330, 200, 427))],
    "dahlia": [("flower.jpg", (190, 100, 430, 340))],
    "leaves": [("flower.jpg", (0, 0, 160, 300)), ("flower.jpg", (480, 0, 640, 300))],
}
#: The class names, in folder (and label) order.
CLASSES = tuple(sorted(_REGIONS))
_ORIENTATION = 0x0112


def _photos() -> Dict[str, "object"]:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    d = load_sample_images()
    return {os.path.basename(f): Image.fromarray(img) for f, img in zip(d.filenames, d.images)}


def write_photos(directory: os.PathLike | str, *, per_class: int = 40, seed: int = 0, min_side: int = 40,
                 max_side: int = 140, gray_fraction: float = 0.15, rotated_fraction: float = 0.15,
                 png_fraction: float = 0.3) -> Path:
    """Write ``per_class`` patches of each class into ``directory/<class>/``; returns the directory.

    A patch is a crop of ``min_side``..``max_side`` pixels (aspect 3:4 to 4:3) inside its region, resized by
    0.6..1.4; ``gray_fraction`` of them grayscale, ``rotated_fraction`` stored turned a quarter with EXIF
    orientation 6 or 8, ``png_fraction`` PNG (the rest JPEG, quality 75..95).
    """
    from PIL import Image

    out = Path(directory)
    rng = np.random.default_rng(seed)
    photos = _photos()
    for cls in CLASSES:
        (out / cls).mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            name, (left, top, right, bottom) = _REGIONS[cls][int(rng.integers(len(_REGIONS[cls])))]
            w = int(rng.integers(min_side, max_side + 1))
            h = int(np.clip(w * rng.uniform(0.75, 1.333), min_side, max_side))
            w, h = min(w, right - left), min(h, bottom - top)
            x0 = int(rng.integers(left, right - w + 1))
            y0 = int(rng.integers(top, bottom - h + 1))
            patch = photos[name].crop((x0, y0, x0 + w, y0 + h))
            f = rng.uniform(0.6, 1.4)
            patch = patch.resize((max(8, round(w * f)), max(8, round(h * f))), Image.BILINEAR)
            if rng.random() < gray_fraction:
                patch = patch.convert("L")
            exif = Image.Exif()
            if rng.random() < rotated_fraction:  # the sensor's pixels, and the tag that turns them upright
                orientation = int(rng.choice([6, 8]))
                patch = patch.transpose(Image.Transpose.ROTATE_90 if orientation == 6 else Image.Transpose.ROTATE_270)
                exif[_ORIENTATION] = orientation
            if rng.random() < png_fraction:
                patch.save(out / cls / f"{n:04d}.png", exif=exif)
            else:
                patch.save(out / cls / f"{n:04d}.jpg", quality=int(rng.integers(75, 96)), exif=exif)
    return out


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


def train_tutorial_model(model: Any, x_raw: np.ndarray, y: np.ndarray, seed: int = 0, epochs: int = 9) -> Any:
    """Adam, batch 8, on raw pixels: 7/9 of ``epochs`` at 3e-3, then the rest at 5e-4 (7 + 2 by default);
    returns ``model``."""
    from ._keras import keras
    from .models import seed_everything

    seed_everything(seed)
    first = max(1, round(epochs * 7 / 9))
    for lr, n in ((3e-3, first), (5e-4, epochs - first)):
        if n <= 0:
            continue
        model.compile(keras.optimizers.Adam(lr), "sparse_categorical_crossentropy")
        model.fit(x_raw, y, epochs=n, batch_size=8, shuffle=True, verbose=0)
    return model
