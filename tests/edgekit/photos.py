"""Real photographs as an image folder: scikit-learn's two sample photos (they ship with the package) cut into patches
of three classes, written as JPEG and PNG files of varied sizes, the way a user's folder of camera pictures looks."""

from __future__ import annotations

from pathlib import Path

import numpy as np

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
