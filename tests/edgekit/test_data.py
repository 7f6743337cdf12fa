"""Data loaders: the digits example, .npz files and image folders, and their errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from edgekit.data import load_dataset
from edgekit.errors import DataError


def test_digits_are_raw_pixels_split_stratified_and_deterministic(digits):
    assert digits.x_train.shape[1:] == (8, 8, 1) and digits.x_train.dtype == np.float32
    assert digits.x_train.max() == pytest.approx(255.0) and digits.x_train.min() == 0.0
    assert len(digits.x_train) + len(digits.x_test) == 1797
    assert digits.labels == tuple(str(i) for i in range(10))
    # stratified: every class has its share of the test split
    assert np.bincount(digits.y_test, minlength=10).min() >= 35
    again = load_dataset("digits")
    np.testing.assert_array_equal(again.y_test, digits.y_test)
    x = digits.model_inputs(digits.x_test)
    assert x.dtype == np.float32 and x.max() <= 1.0 + 1e-6


def test_npz_with_labels_and_extra_provenance_arrays(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(
        path,
        x_train=rng.integers(0, 256, (20, 6, 6, 1)).astype(np.uint8),
        y_train=np.arange(20) % 3,
        x_test=rng.integers(0, 256, (6, 6, 6, 1)).astype(np.uint8),
        y_test=np.arange(6) % 3,
        labels=np.array(["cat", "dog", "owl"]),
        sample_id=np.array([f"id{i}" for i in range(20)]),
    )
    d = load_dataset(str(path))
    assert d.labels == ("cat", "dog", "owl")
    assert d.input_shape == (6, 6, 1)
    assert d.preprocessing.scale == pytest.approx(1 / 255)
    assert d.y_train.dtype == np.int64


def test_npz_missing_arrays_names_them(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, x_train=np.zeros((2, 4)), y_train=np.zeros(2))
    with pytest.raises(DataError, match="x_test"):
        load_dataset(str(path))


def _write_images(root, classes, n, size=(10, 12)):
    rng = np.random.default_rng(1)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8), mode="L").save(root / c / f"{i}.png")


def test_image_folder_one_subfolder_per_class(tmp_path):
    _write_images(tmp_path / "imgs", ["a", "b"], 10)
    d = load_dataset(str(tmp_path / "imgs"))
    assert d.labels == ("a", "b")
    assert d.input_shape == (10, 12, 1)
    assert len(d.x_train) + len(d.x_test) == 20
    assert d.preprocessing.kind == "image" and d.preprocessing.color == "grayscale"


def test_empty_image_folder_is_a_data_error(tmp_path):
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        load_dataset(str(tmp_path / "imgs"))


def test_unreadable_image_is_named(tmp_path):
    _write_images(tmp_path / "imgs", ["a", "b"], 3)
    (tmp_path / "imgs" / "b" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png"):
        load_dataset(str(tmp_path / "imgs"))


def test_missing_data_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(str(tmp_path / "nope"))
