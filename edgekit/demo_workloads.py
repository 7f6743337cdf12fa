"""What ``edgekit demo`` runs the loop on: the data, the first model and the agent's stream of one workload.

``digits`` (``make demo``): scikit-learn's 1,797 real 8x8 digits, the example CNN, a stream of arrays.

``photos`` (``edgekit demo --workload photos``): real photographs cut into three classes of JPEG/PNG patches of
varied sizes (:mod:`edgekit.photos`), the model the Keras transfer-learning tutorials build (MobileNetV2 alpha
0.35, 96x96x3, nested in a Sequential with its own Rescaling; random init, trained here), and a stream that is a
folder of picture files the agent reads, decodes and resizes itself, as a camera board's would.

In both, part of the stream and a second copy of the test set carry the demo's distribution shift
(:mod:`edgekit.shift`), drawn afresh.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Tuple

import numpy as np
from device_agent.sources import ArraySource, FolderSource, Source

__all__ = ["Prepared", "Workload", "WORKLOADS", "get_workload"]


@dataclass(frozen=True)
class Prepared:
    """One workload's data, split so that no input is used twice."""

    data_spec: str  # what convert and retrain read (edgekit.data.load_dataset)
    image_shape: Optional[Tuple[int, ...]]  # the model's input, for an image folder
    source: Callable[[], Source]  # the agent's stream, opened afresh on each call
    y_stream: np.ndarray  # class index of each streamed input
    stream_shifted: np.ndarray  # bool: the input carries the shift
    position: Callable[[Mapping[str, Any]], int]  # a sample's `source` (as the agent reported it) -> stream position
    x_test: np.ndarray  # raw uint8 inputs no step trains on
    y_test: np.ndarray
    x_test_shifted: np.ndarray
    summary: str  # what was made, for the demo's line


class Workload:
    name = ""  # the bundle's name
    things = ""  # "digits", "photos": what the stream is made of
    epochs = {"base": 0, "qat": 0, "retrain": 0, "retrain_qat": 0}
    model_title = ""
    data_title = ""

    def prepare(self, c: Any, out: Path, shift: Any) -> Prepared:
        raise NotImplementedError

    def train(self, c: Any, data: Any, path: Path) -> Any:
        """Build and train the first float model, save it to ``path``, return it."""
        raise NotImplementedError

    def retrain_float_model(self, v1: Path, model_path: Path) -> Optional[Path]:
        """The float model retrain fine-tunes (None: the one the v1 bundle keeps)."""
        return model_path


class Digits(Workload):
    name = "digits"
    things = "digits"
    epochs = {"base": 15, "qat": 3, "retrain": 10, "retrain_qat": 3}
    model_title = "train the example CNN"
    data_title = "split the 1,797 real digits (scikit-learn)"

    def prepare(self, c: Any, out: Path, shift: Any) -> Prepared:
        from .data import load_dataset
        from .shift import apply_shift

        full = load_dataset("digits", seed=c.seed)
        x = np.concatenate([full.x_train, full.x_test])
        y = np.concatenate([full.y_train, full.y_test])
        order = np.random.default_rng(c.seed).permutation(len(x))
        tr, st, te = np.split(order, [c.train_size, c.train_size + c.stream_size])
        rng = np.random.default_rng(c.seed + 1)
        shifted = rng.random(len(st)) < c.shifted_fraction
        x_stream = x[st].copy()
        x_stream[shifted] = apply_shift(x[st][shifted], shift, seed=c.seed + 2)
        x_stream = np.round(x_stream).astype(np.uint8)
        x_test_shifted = np.round(apply_shift(x[te], shift, seed=c.seed + 3)).astype(np.uint8)
        np.savez_compressed(out / "data.npz", x_train=x[tr].astype(np.uint8), y_train=y[tr],
                            x_test=x[te].astype(np.uint8), y_test=y[te], labels=np.array(full.labels))
        np.savez_compressed(out / "stream.npz", x=x_stream, y=y[st], shifted=shifted,
                            x_test_shifted=x_test_shifted, y_test_shifted=y[te])
        ids = list(range(len(st)))
        return Prepared(
            data_spec=str(out / "data.npz"), image_shape=None,
            source=lambda: ArraySource(x_stream, ids=ids, uri="demo-stream"),
            y_stream=y[st], stream_shifted=shifted, position=lambda src: int(src["id"]),
            x_test=x[te].astype(np.uint8), y_test=y[te], x_test_shifted=x_test_shifted,
            summary=(f"{len(tr)} to train, {len(st)} for the agent's stream ({int(shifted.sum())} of them shifted: "
                     f"{shift.describe()}), {len(te)} held out as the clean and the shifted test sets -> "
                     f"{out / 'data.npz'}"),
        )


    def train(self, c: Any, data: Any, path: Path) -> Any:
        from .models import digits_cnn, train

        model = digits_cnn(num_classes=data.num_classes, input_shape=data.input_shape, seed=c.seed)
        train(model, data, c.base_epochs, seed=c.seed, progress=False)
        model.save(str(path))
        return model


class Photos(Workload):
    name = "photos"
    things = "photos"
    # the tutorial model's own schedule (edgekit.photos.train_tutorial_model) is 7 + 2 epochs
    epochs = {"base": 9, "qat": 1, "retrain": 3, "retrain_qat": 1}
    size = 96
    model_title = "train the tutorial's nested MobileNetV2 (alpha 0.35, 96x96x3, random init)"
    data_title = "cut real photographs (scikit-learn's sample images) into labelled picture files"

    def prepare(self, c: Any, out: Path, shift: Any) -> Prepared:
        from PIL import Image

        from device_agent.inference.preprocess import decode_image

        from .data import load_dataset, read_images
        from .photos import write_photo_folder
        from .shift import apply_shift

        photos = write_photo_folder(out / "photos", per_class=c.photos_per_class, size=self.size, seed=c.seed)
        data = load_dataset(str(photos), seed=c.seed, image_shape=(self.size, self.size, 3))
        labels = list(data.labels)
        # The stream: new patches of the same photographs, one flat folder of picture files, a part shifted.
        drawn = write_photo_folder(out / ".stream-drawn", per_class=c.photos_stream_per_class, size=self.size,
                                   seed=c.seed + 1)
        files = sorted(f for f in drawn.rglob("*") if f.is_file())
        rng = np.random.default_rng(c.seed + 2)
        files = [files[i] for i in rng.permutation(len(files))]
        stream = out / "stream"
        stream.mkdir()
        y_stream = np.array([labels.index(f.parent.name) for f in files])
        shifted = rng.random(len(files)) < c.shifted_fraction
        truth = {}
        for i, (f, y, s) in enumerate(zip(files, y_stream, shifted)):
            dest = stream / f"{i:04d}{f.suffix}"
            if s:  # the shift on the upright picture, at its own size; saved the way it came
                pixels = apply_shift(decode_image(f, "rgb")[None].astype(np.float32), shift, seed=c.seed + 3 + i)[0]
                Image.fromarray(np.round(pixels).astype(np.uint8)).save(dest, quality=90)
            else:
                shutil.copyfile(f, dest)
            truth[dest.name] = {"label": labels[int(y)], "shifted": bool(s)}
        shutil.rmtree(drawn)
        (out / "stream-truth.json").write_text(json.dumps(truth, indent=1), encoding="utf-8")
        # The test sets: more patches no step trains on, decoded the board's way; the shifted copy drawn afresh.
        tests = write_photo_folder(out / ".test-drawn", per_class=c.photos_test_per_class, size=self.size,
                                   seed=c.seed + 4)
        test_files = sorted(f for f in tests.rglob("*") if f.is_file())
        x_test = np.round(read_images(test_files, data.preprocessing)).astype(np.uint8)
        y_test = np.array([labels.index(f.parent.name) for f in test_files])
        shutil.rmtree(tests)
        x_test_shifted = np.round(apply_shift(x_test.astype(np.float32), shift, seed=c.seed + 5)).astype(np.uint8)
        np.savez_compressed(out / "test.npz", x_test=x_test, y_test=y_test, x_test_shifted=x_test_shifted,
                            labels=np.array(labels))
        n_train, n_test = len(data.y_train), len(data.y_test)
        return Prepared(
            data_spec=str(photos), image_shape=(self.size, self.size, 3),
            source=lambda: FolderSource(str(stream), color="rgb"),
            y_stream=y_stream, stream_shifted=shifted, position=lambda src: int(Path(src["uri"]).stem),
            x_test=x_test, y_test=y_test, x_test_shifted=x_test_shifted,
            summary=(f"{n_train + n_test} patches of {len(labels)} classes ({', '.join(labels)}) in {photos} "
                     f"({n_train} to train, {n_test} to check), {len(files)} picture files for the agent's stream in "
                     f"{stream} ({int(shifted.sum())} of them shifted: {shift.describe()}), {len(y_test)} held out "
                     f"as the clean and the shifted test sets -> {out / 'test.npz'}"),
        )

    def train(self, c: Any, data: Any, path: Path) -> Any:
        from .photos import train_tutorial_model, tutorial_model

        # raw pixels 0..255: the model rescales its own input (convert moves that Rescaling into the bundle)
        model = train_tutorial_model(tutorial_model(data.num_classes, self.size, seed=c.seed),
                                     data.x_train, data.y_train, seed=c.seed, epochs=c.base_epochs)
        model.save(str(path))
        return model

    def retrain_float_model(self, v1: Path, model_path: Path) -> Optional[Path]:
        # the float model the bundle keeps: flattened, its Rescaling moved into the bundle's preprocessing, which
        # retrain feeds it with
        return None


WORKLOADS = {"digits": Digits(), "photos": Photos()}


def get_workload(name: str) -> Workload:
    try:
        return WORKLOADS[name]
    except KeyError:
        raise ValueError(f"workload {name!r} is unknown; expected one of {sorted(WORKLOADS)}") from None
