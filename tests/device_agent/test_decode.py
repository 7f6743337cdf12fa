"""Pictures as cameras and tools write them: EXIF-rotated, RGBA, palette, grayscale with alpha; decoded upright
and in the bundle's colour by the board (the host's image-folder loader calls the same code)."""

from __future__ import annotations

import threading

import numpy as np
from PIL import Image

from device_agent.inference.preprocess import decode_image
from device_agent.sources import FolderSource


def _upright(h=18, w=31):
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 8, yy * 14, (xx * yy) % 256], -1).astype(np.uint8)


def test_exif_rotated_pictures_come_out_upright_from_the_folder_source(tmp_path):
    up = Image.fromarray(_upright())
    up.save(tmp_path / "a-upright.png")
    for orientation, stored in ((3, up.transpose(Image.Transpose.ROTATE_180)),
                                (6, up.transpose(Image.Transpose.ROTATE_90)),
                                (8, up.transpose(Image.Transpose.ROTATE_270)),
                                (2, up.transpose(Image.Transpose.FLIP_LEFT_RIGHT))):
        exif = Image.Exif()
        exif[0x0112] = orientation
        stored.save(tmp_path / f"b-orientation-{orientation}.png", exif=exif)
    items = list(FolderSource(str(tmp_path), color="rgb").items(threading.Event()))
    want = np.asarray(up)
    assert len(items) == 5
    for info, raw in items:
        assert np.array_equal(raw, want), info["uri"]


def test_modes_decode_to_the_bundles_colour(tmp_path):
    rgb = Image.fromarray(_upright())
    rgba = rgb.convert("RGBA")
    rgba.putalpha(7)
    rgba.save(tmp_path / "rgba.png")
    rgb.convert("LA").save(tmp_path / "la.png")
    rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(tmp_path / "p.png")
    rgb.save(tmp_path / "rgb.jpg")
    for name in ("rgba.png", "la.png", "p.png", "rgb.jpg"):
        assert decode_image(tmp_path / name, "rgb").shape == (18, 31, 3)
        assert decode_image(tmp_path / name, "grayscale").shape == (18, 31, 1)
    # Alpha is dropped (what Keras' load_img and tf.io.decode_png(channels=3) do), colour kept exactly.
    assert np.array_equal(decode_image(tmp_path / "rgba.png", "rgb"), _upright())


def test_a_malformed_exif_block_is_ignored_not_fatal(tmp_path):
    path = tmp_path / "bad-exif.jpg"
    Image.fromarray(_upright()).save(path, exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff\x01\x12")
    assert decode_image(path, "rgb").shape == (18, 31, 3)
