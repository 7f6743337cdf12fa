"""The photo example: real photographs (scikit-learn's) cut into six classes of patches, written as camera and
phone pictures are (JPEG and PNG, varied sizes, some grayscale, some EXIF-rotated); learnable, and read the same
on host and board."""

from __future__ import annotations

import numpy as np
from PIL import Image

from device_agent.inference.preprocess import load_raw, preprocess
from edgekit.data import load_dataset
from edgekit.photos import CLASSES, write_photos


def test_the_folder_holds_pictures_as_cameras_write_them(tmp_path):
    root = write_photos(tmp_path / "photos", per_class=20, seed=1)
    assert sorted(p.name for p in root.iterdir()) == list(CLASSES) and len(CLASSES) == 6
    files = sorted(root.rglob("*.*"))
    assert len(files) == 6 * 20
    suffixes = {f.suffix for f in files}
    assert suffixes == {".jpg", ".png"}
    modes, sizes, rotated = set(), set(), 0
    for f in files:
        with Image.open(f) as img:
            modes.add(img.mode)
            sizes.add(img.size)
            rotated += img.getexif().get(0x0112, 1) in (6, 8)
    assert modes == {"L", "RGB"} and len(sizes) > 60 and rotated >= 6
    # The same seed writes the same pictures.
    again = write_photos(tmp_path / "again", per_class=20, seed=1)
    assert all((again / f.relative_to(root)).read_bytes() == f.read_bytes() for f in files)


def test_photos_spec_writes_once_and_the_classes_are_learnable(tmp_path):
    from sklearn.neighbors import KNeighborsClassifier

    spec = f"photos:{tmp_path / 'p'}"
    data = load_dataset(spec, image_shape=(24, 24, 3), test_fraction=0.25)
    assert data.labels == CLASSES and data.input_shape == (24, 24, 3) and data.preprocessing.color == "rgb"
    mtime = (tmp_path / "p").stat().st_mtime_ns
    assert load_dataset(spec, image_shape=(24, 24, 3)).labels == CLASSES
    assert (tmp_path / "p").stat().st_mtime_ns == mtime  # read, not written again
    clf = KNeighborsClassifier(3).fit(data.model_inputs(data.x_train).reshape(len(data.x_train), -1),
                                                data.y_train)
    acc = clf.score(data.model_inputs(data.x_test).reshape(len(data.x_test), -1), data.y_test)
    assert acc > 0.6  # six classes: chance is 1/6
    # Host inputs are the board's, element for element (a sample of files, the board's own path).
    host = np.concatenate([data.model_inputs(data.x_train), data.model_inputs(data.x_test)])
    for f in sorted((tmp_path / "p").rglob("*.*"))[::17]:
        board = preprocess(load_raw(f, "rgb"), data.preprocessing)
        assert any(np.array_equal(board, h) for h in host), f
