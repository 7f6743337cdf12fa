"""Image folders of mixed pictures (JPEG and PNG, sizes, grayscale, RGB, RGBA, palette, EXIF-rotated) give the
host's data set exactly the model inputs the board computes from the same files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from device_agent.inference.preprocess import decode_image, load_raw, preprocess
from edgekit.data import load_dataset

ORIENTATION = 0x0112


def _picture(rng, h, w):
    """A smooth colour picture with structure (so a rotation or a swapped axis shows)."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) * 127 // max(h + w - 2, 1)], -1)
    return np.clip(base + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)


def _save_rotated(img: Image.Image, path, orientation: int = 6, **kw) -> None:
    """What a phone does: store the sensor's pixels as they came and say in EXIF how to turn them upright.
    Orientation 6: the stored picture must be turned 90 degrees clockwise to be shown upright."""
    assert orientation == 6
    stored = img.transpose(Image.Transpose.ROTATE_90)  # counter-clockwise: undone by the clockwise turn
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    stored.save(path, exif=exif, **kw)


def _write_folder(root):
    rng = np.random.default_rng(3)
    files = []
    for c, cls in enumerate(["cats", "dogs"]):
        d = root / cls
        d.mkdir(parents=True)
        for i in range(3):
            rgb = Image.fromarray(_picture(rng, 30 + 7 * i + c, 41 - 3 * i))
            rgb.save(d / f"{i}-rgb.jpg", quality=90)
            rgb.convert("L").save(d / f"{i}-gray.png")
            rgba = rgb.convert("RGBA")
            rgba.putalpha(Image.fromarray(rng.integers(0, 256, rgb.size[::-1], dtype=np.uint8)))
            rgba.resize((50, 50)).save(d / f"{i}-rgba.png")
            rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(d / f"{i}-palette.png")
            rgb.convert("L").save(d / f"{i}-gray.jpg", quality=85)
            _save_rotated(rgb, d / f"{i}-exif.jpg", quality=90)
            _save_rotated(rgb, d / f"{i}-exif.png")
        files += sorted(d.iterdir())
    return files


@pytest.mark.parametrize("image_shape", [(24, 20, 3), (16, 16, 1), None])
def test_host_inputs_equal_the_boards_element_for_element(tmp_path, image_shape):
    files = _write_folder(tmp_path / "photos")
    data = load_dataset(str(tmp_path / "photos"), test_fraction=0.25, image_shape=image_shape)
    pre = data.preprocessing
    if image_shape is None:  # the first picture's size, upright; rgb because some pictures have colour
        first = Image.open(files[0])  # 0-exif.jpg: stored sideways, 30 x 41 upright
        assert files[0].name == "0-exif.jpg" and (first.width, first.height) == (30, 41)
        assert pre.shape == (30, 41, 3) and pre.color == "rgb"
    else:
        assert pre.shape == image_shape and pre.color == ("rgb" if image_shape[2] == 3 else "grayscale")
    host = np.concatenate([data.model_inputs(data.x_train), data.model_inputs(data.x_test)])
    assert host.dtype == np.float32 and host.shape == (len(files),) + tuple(pre.shape)
    # The board: the agent's folder source (load_raw with the bundle's color) and preprocess, file by file.
    board = [preprocess(load_raw(f, pre.color), pre) for f in files]
    unmatched = list(range(len(host)))
    for f, b in zip(files, board):
        assert b.dtype == np.float32 and b.shape == tuple(pre.shape), f
        same = [i for i in unmatched if np.array_equal(host[i], b)]  # bit-identical, not close
        assert same, f"{f.name}: the host has no input equal to the board's"
        unmatched.remove(same[0])
    assert unmatched == []


def test_exif_orientation_is_applied_on_both_sides(tmp_path):
    rng = np.random.default_rng(5)
    upright = Image.fromarray(_picture(rng, 20, 36))  # 36 wide, 20 high, as a viewer shows it
    upright.save(tmp_path / "upright.png")
    _save_rotated(upright, tmp_path / "rotated.png")
    stored = Image.open(tmp_path / "rotated.png")
    assert stored.size == (20, 36) and stored.getexif()[ORIENTATION] == 6  # the file holds it sideways
    for color in ("rgb", "grayscale"):
        want = decode_image(tmp_path / "upright.png", color)
        got = decode_image(tmp_path / "rotated.png", color)
        assert got.shape == want.shape == (20, 36, 3 if color == "rgb" else 1)
        assert np.array_equal(got, want)
    # A folder of such pictures: the host's data set holds them upright too.
    for cls in ("a", "b"):
        (tmp_path / "set" / cls).mkdir(parents=True)
        upright.save(tmp_path / "set" / cls / "0.png")
        _save_rotated(upright, tmp_path / "set" / cls / "1.png")
    data = load_dataset(str(tmp_path / "set"), test_fraction=0.5)
    assert data.input_shape == (20, 36, 3)
    rows = np.concatenate([data.x_train, data.x_test])
    assert all(np.array_equal(r, rows[0]) for r in rows)


def test_a_folder_of_gray_pictures_stays_grayscale(tmp_path):
    rng = np.random.default_rng(7)
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            gray = rng.integers(0, 256, (12, 10), dtype=np.uint8)
            Image.fromarray(np.repeat(gray[..., None], 3, -1)).save(tmp_path / cls / f"{i}-rgbmode.png")
            Image.fromarray(gray).save(tmp_path / cls / f"{i}-l.png")
    data = load_dataset(str(tmp_path), test_fraction=0.5)
    assert data.preprocessing.color == "grayscale" and data.input_shape == (12, 10, 1)


def test_a_model_input_an_image_folder_cannot_feed_is_named(tmp_path):
    from edgekit.errors import DataError

    _write_folder(tmp_path / "photos")
    with pytest.raises(DataError, match=r"shape \[24, 24, 4\]"):
        load_dataset(str(tmp_path / "photos"), image_shape=(24, 24, 4))


def test_convert_resizes_a_folder_of_mixed_pictures_to_the_models_input_and_the_agent_agrees(
        float_model_path, tmp_path, capsys):
    """`edgekit convert` with a folder of digits saved as RGB JPEGs and grayscale PNGs of several sizes, some
    EXIF-rotated: the data is read at the model's 8 x 8 x 1, and the agent run over the files labels every one as
    the bundle's int8 model does on the host's inputs."""
    import json

    from sklearn.datasets import load_digits

    from device_agent.agent import Agent
    from device_agent.config import load_config
    from device_agent.inference.interpreter import TFLiteModel
    from device_agent.inference.classify import probabilities_batch
    from edgekit.cli import main

    d = load_digits()
    root, inbox = tmp_path / "folder", tmp_path / "inbox"
    inbox.mkdir()
    for n, i in enumerate(range(len(d.target) - 120, len(d.target))):
        img = Image.fromarray((d.images[i] * (255 / 16)).round().astype(np.uint8), mode="L")
        side = (8, 16, 24, 13)[n % 4]
        img = img.resize((side, side + n % 3), Image.BILINEAR)
        (root / str(d.target[i])).mkdir(parents=True, exist_ok=True)
        target = root / str(d.target[i]) / f"{n:03d}.{'jpg' if n % 2 else 'png'}"
        if n % 5 == 0:
            _save_rotated(img.convert("RGB"), target, **({"quality": 95} if n % 2 else {}))
        elif n % 2:
            img.convert("RGB").save(target, quality=95)
        else:
            img.save(target)
        (inbox / f"{n:03d}-{target.parent.name}{target.suffix}").write_bytes(target.read_bytes())
    out = tmp_path / "bundle"
    assert main(["convert", str(float_model_path), "--data", str(root), "--mode", "ptq", "-o", str(out),
                 "--calibration-samples", "50", "--runtime", "ai_edge_litert", "--no-progress"]) == 0
    capsys.readouterr()
    m = json.loads((out / "manifest.json").read_text())
    assert m["preprocessing"]["shape"] == [8, 8, 1] and m["preprocessing"]["color"] == "grayscale"
    assert m["metrics"]["accuracy_int8"] > 0.6
    config = load_config(None, bundle=str(out), broker="", device_id="dev1", fleet="test",
                         outbox={"path": str(tmp_path / "o.sqlite")}, results={"path": str(tmp_path / "r.jsonl")},
                         source={"kind": "folder", "path": str(inbox)})
    with Agent(config) as agent:
        stats = agent.run()
        pre = agent.manifest.preprocessing
    assert stats.inferences == 120 and dict(stats.errors) == {} and dict(stats.input_mismatch) == {}
    lines = [json.loads(v) for v in (tmp_path / "r.jsonl").read_text().splitlines()]
    # The host: the data set the convert read (same files, the board's decode), the bundle's int8 model.
    data = load_dataset(str(root), image_shape=(8, 8, 1))
    host_x = np.concatenate([data.x_train, data.x_test])
    with TFLiteModel.open(out / "model.tflite") as model:
        for f, line in zip(sorted(inbox.iterdir()), lines):
            board = preprocess(load_raw(f, "grayscale"), pre)
            assert any(np.array_equal(board, data.model_inputs(h[None])[0]) for h in host_x), f.name
            probs = probabilities_batch(model(board)[None], m["output_activation"])[0]
            assert line["label"] == m["labels"][int(probs.argmax())]
