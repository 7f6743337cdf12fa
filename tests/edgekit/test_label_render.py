"""How inputs are shown (images at their own pixels, series as lines), and the labeling API under fuzzed bodies."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from collecting import LABELS
from edgekit.loop.label import LabelServer, LabelService
from edgekit.loop.label.render import image_array, kind, png_bytes, series
from edgekit.loop.store import open_store
from labeling import DIGITS, fill


def _png(arr):
    return Image.open(io.BytesIO(png_bytes(arr)))


def test_images_keep_their_pixels_grayscale_and_rgb():
    gray = DIGITS["x"][0]  # 8 x 8 x 1 uint8
    img = _png(gray)
    assert (img.mode, img.size) == ("L", (8, 8)) and np.array_equal(np.asarray(img), gray[..., 0])
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    img = _png(rgb)
    assert (img.mode, img.size) == ("RGB", (7, 5)) and np.array_equal(np.asarray(img), rgb)
    assert _png(np.zeros((1, 6, 6, 4), np.uint8)).mode == "RGBA"  # a leading batch axis is dropped


def test_other_dtypes_are_scaled_from_min_to_max():
    f = np.array([[0.25, 0.5], [0.75, 1.0]], dtype=np.float32)
    assert image_array(f).tolist() == [[0, 85], [170, 255]]
    assert image_array(np.full((3, 3), 7.0)).max() == 0  # constant: black, no division by zero
    assert image_array(np.array([[np.nan, 1.0], [2.0, np.inf]])).tolist() == [[0, 0], [255, 255]]  # nan dark, inf bright


def test_series_are_told_apart_and_reduced():
    assert kind(np.zeros(16000, np.int16)) == "series"  # a second of audio
    assert kind(np.zeros((128, 3), np.float32)) == "series"  # an accelerometer window
    assert kind(np.zeros((1, 500))) == "series"
    assert kind(np.zeros((28, 28))) == "image" and kind(np.zeros((96, 96, 3))) == "image"
    s = series(np.arange(16000, dtype=np.int16), max_points=1000)
    assert s["envelope"] and s["length"] == 16000 and len(s["channels"]) == 1 and len(s["channels"][0]) == 1000
    assert s["channels"][0][:2] == [0.0, 31.0] and s["channels"][0][-1] == 15999.0  # min/max of each slice
    s3 = series(np.stack([np.arange(40.0), -np.arange(40.0), np.ones(40)], axis=1))
    assert not s3["envelope"] and [c[:2] for c in s3["channels"]] == [[0, 1], [0, -1], [1, 1]]
    img = _png(np.sin(np.linspace(0, 6, 300)))
    assert img.size == (240, 120)  # the grid's thumbnail of a series


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('fuzz')}/s.db"
    with open_store(url) as store:
        fill(store, 6)
        with LabelServer(LabelService(store, classes=LABELS), "127.0.0.1", 0).start() as server:
            yield server


_json = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False)
                     | st.text(max_size=40), lambda kids: st.lists(kids, max_size=5)
                     | st.dictionaries(st.text(max_size=12), kids, max_size=5), max_leaves=20)
_fields = st.fixed_dictionaries({}, optional={
    "user": st.one_of(st.text(max_size=80), _json), "sample_id": st.one_of(st.text(max_size=60), _json),
    "label": st.one_of(st.sampled_from(LABELS + ["__invalid__"]), _json),
    "label_version": st.one_of(st.integers(-3, 3), _json), "n": _json, "predicted": _json, "items": _json,
    "exclude": _json, "sample_ids": _json, "limit": _json})


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(path=st.sampled_from(["/api/next", "/api/label", "/api/undo", "/api/skip", "/api/renew", "/api/grid",
                             "/api/accept", "/api/nope"]),
       body=st.one_of(_fields, _json, st.binary(max_size=200)))
def test_no_request_body_breaks_the_server(fuzz_server, path, body):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(fuzz_server.url.rstrip("/") + path, data=data, method="POST",
                                 headers={"Content-Type": "application/json", "X-Edgekit": "1"})
    try:
        with urllib.request.urlopen(req, timeout=30) as res:
            status = res.status
            json.loads(res.read())
    except urllib.error.HTTPError as err:
        status = err.code
        assert "error" in json.loads(err.read())  # a clear line, never a stack trace
    assert status in (200, 400, 403, 404, 409, 413), status
    with urllib.request.urlopen(fuzz_server.url.rstrip("/") + "/api/progress", timeout=30) as res:
        assert res.status == 200  # still serving
