"""edgekit.shift: deterministic, and each component does what docs say."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgekit.shift import DEFAULT_SHIFT, SHIFTS, Shift, apply_shift, get_shift

DIGITS = Path(__file__).parents[1] / "device_agent" / "data" / "digits-300.npz"


@pytest.fixture(scope="module")
def digits():
    with np.load(DIGITS) as data:
        return data["x"].astype(np.float32), data["y"]


def test_same_seed_same_output_other_seed_other_output(digits):
    x, _ = digits
    a = apply_shift(x, DEFAULT_SHIFT, seed=3)
    b = apply_shift(x, DEFAULT_SHIFT, seed=3)
    c = apply_shift(x, DEFAULT_SHIFT, seed=4)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.dtype == np.float32 and a.shape == x.shape
    assert a.min() >= 0.0 and a.max() <= 255.0


def test_input_is_not_modified_and_neutral_shift_is_identity(digits):
    x, _ = digits
    before = x.copy()
    apply_shift(x, DEFAULT_SHIFT, seed=0)
    assert np.array_equal(x, before)
    assert np.array_equal(apply_shift(x, Shift(), seed=0), x)
    assert np.array_equal(apply_shift(x, DEFAULT_SHIFT.scaled(0.0), seed=0), x)


def test_noise_has_the_documented_std():
    x = np.full((200, 8, 8, 1), 128.0, np.float32)  # mid-grey: no clipping
    out = apply_shift(x, Shift(noise=20.0), seed=1)
    assert abs(float((out - x).std()) - 20.0) < 0.5
    assert abs(float((out - x).mean())) < 0.5


def test_contrast_scales_around_mid_grey_within_range(digits):
    x, _ = digits
    out = apply_shift(x, Shift(contrast=0.4), seed=2)
    dev_in = (x - 127.5).reshape(len(x), -1)
    dev_out = (out - 127.5).reshape(len(x), -1)
    ratio = (dev_out * dev_in).sum(1) / (dev_in * dev_in).sum(1)
    assert np.all(ratio >= 0.4 - 1e-4) and np.all(ratio <= 1.0 + 1e-4)
    assert np.allclose(dev_out, dev_in * ratio[:, None], atol=1e-3)  # one factor per image
    assert ratio.std() > 0.05  # factors vary between images


def test_rotation_moves_a_pixel_along_the_drawn_angle():
    x = np.zeros((50, 9, 9, 1), np.float32)
    x[:, 4, 8, 0] = 255.0  # a dot right of centre (4, 4)
    out = apply_shift(x, Shift(rotation=40.0), seed=5)
    angles = np.deg2rad(np.random.default_rng(5).uniform(-40.0, 40.0, size=50))  # the documented first draw
    yy, xx = np.mgrid[0:9, 0:9]
    mass = out[..., 0].sum(axis=(1, 2))
    cy = (out[..., 0] * yy).sum(axis=(1, 2)) / mass
    cx = (out[..., 0] * xx).sum(axis=(1, 2)) / mass
    got = np.arctan2(cy - 4.0, cx - 4.0)
    # Image rows grow downwards; whichever way the sign goes, it must be the drawn magnitude.
    assert np.allclose(np.abs(got), np.abs(angles), atol=np.deg2rad(6))
    assert np.all(np.sign(got[np.abs(angles) > 0.1]) == np.sign(angles[np.abs(angles) > 0.1]))


def test_translation_moves_the_ink_by_the_drawn_offset(digits):
    x, _ = digits
    x = np.pad(x[:40], ((0, 0), (2, 2), (2, 2), (0, 0)))  # an empty border: nothing leaves the picture
    out = apply_shift(x, Shift(translate=1.5), seed=0)
    moves = np.random.default_rng(0).uniform(-1.5, 1.5, size=(40, 2))  # rotation is off: the first draw
    assert np.allclose(out.sum(axis=(1, 2, 3)), x.sum(axis=(1, 2, 3)), rtol=1e-4)  # ink is kept

    def centroid(a):
        yy, xx = np.mgrid[0 : a.shape[1], 0 : a.shape[2]]
        m = a[..., 0].sum(axis=(1, 2))
        return np.stack([(a[..., 0] * yy).sum(axis=(1, 2)) / m, (a[..., 0] * xx).sum(axis=(1, 2)) / m], 1)

    assert np.allclose(centroid(out) - centroid(x), moves, atol=1e-3)


def test_field_shift_is_strong_but_keeps_the_picture(digits):
    x, _ = digits
    out = apply_shift(x, DEFAULT_SHIFT, seed=0)
    corr = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(x, out)]
    assert 0.3 < float(np.mean(corr)) < 0.95


def test_three_dimensional_batches_and_bad_arguments(digits):
    x, _ = digits
    out = apply_shift(x[..., 0], SHIFTS["noise"], seed=0)
    assert out.shape == x.shape[:3]
    with pytest.raises(ValueError, match="contrast"):
        Shift(contrast=0.0)
    with pytest.raises(ValueError, match="rotation"):
        Shift(rotation=-1)
    with pytest.raises(ValueError, match="unknown"):
        get_shift("sideways")
    with pytest.raises(ValueError, match="shape"):
        apply_shift(np.zeros((8, 8)), DEFAULT_SHIFT)
