"""Data sets for conversion and evaluation: the digits example, an ``.npz``, or an image folder.

Every loader returns a :class:`Dataset` whose ``x`` arrays hold RAW inputs
(image pixels 0..255 as float32, shape ``(N, H, W, C)``) and whose
``preprocessing`` says how raw becomes the model's input, exactly as a board
will do it (see docs/bundle.md)::

    model_input = raw * preprocessing.scale + preprocessing.offset
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np

from device_agent.update.manifest import Preprocessing
from device_agent.inference.preprocess import IMAGE_SUFFIXES

from .errors import DataError

__all__ = ["Dataset", "load_dataset", "is_image_folder", "read_images", "split"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dataset:
    """Train and test splits in raw units, with labels and the preprocessing recipe."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    labels: Tuple[str, ...]
    preprocessing: Preprocessing
    name: str = "data"

    def __post_init__(self) -> None:
        for x, y, which in ((self.x_train, self.y_train, "train"), (self.x_test, self.y_test, "test")):
            if len(x) != len(y):
                raise DataError(f"x_{which} has {len(x)} rows but y_{which} has {len(y)}; give one label per input")
            if len(y) and (int(np.min(y)) < 0 or int(np.max(y)) >= len(self.labels)):
                raise DataError(
                    f"y_{which} holds class index {int(np.max(y))} but there are {len(self.labels)} labels; "
                    "pass every label (--labels) or fix the class indices"
                )
        if len(self.x_train) == 0 or len(self.x_test) == 0:
            raise DataError(
                f"data set '{self.name}' has {len(self.x_train)} train and {len(self.x_test)} test inputs; both must be non-empty"
            )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DataError(
                f"x_train shape={list(self.x_train.shape[1:])} but x_test shape={list(self.x_test.shape[1:])}; "
                "both splits must hold inputs of one shape"
            )

    @property
    def input_shape(self) -> Tuple[int, ...]:
        return tuple(int(d) for d in self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def model_inputs(self, x: np.ndarray) -> np.ndarray:
        """Raw inputs to the model's float inputs: ``x * scale + offset``."""
        pre = self.preprocessing
        return (np.asarray(x, dtype=np.float32) * np.float32(pre.scale) + np.float32(pre.offset)).astype(np.float32)

    def with_labels(self, labels: Tuple[str, ...]) -> "Dataset":
        """The same data with the class names of the model's outputs, one per output.

        When ``labels`` are the data's own names in another order (a model trained with its classes in another
        order than the folders sort in), the class indices follow them: output i is the class named labels[i].
        Otherwise the names replace the data's, index for index.
        """
        if len(labels) != len(self.labels):
            raise DataError(
                f"{len(labels)} labels given ({', '.join(labels)}) but the data has {len(self.labels)} classes; "
                "give one label per class"
            )
        labels = tuple(labels)
        if set(labels) == set(self.labels) and len(set(labels)) == len(labels) and labels != tuple(self.labels):
            index = np.asarray([labels.index(name) for name in self.labels], dtype=np.int64)
            return Dataset(self.x_train, index[self.y_train], self.x_test, index[self.y_test], labels,
                           self.preprocessing, self.name)
        return Dataset(self.x_train, self.y_train, self.x_test, self.y_test, labels, self.preprocessing, self.name)


def split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int) -> Tuple[np.ndarray, ...]:
    """A deterministic stratified split (falls back to a plain shuffle for tiny classes)."""
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction={test_fraction} must be within (0, 1)")
    counts = np.bincount(y)
    stratify = y if counts[counts > 0].min() >= 2 else None
    try:
        return tuple(train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=stratify))
    except ValueError as exc:
        raise DataError(f"cannot split {len(y)} inputs with test_fraction={test_fraction} ({exc}); give more data") from exc


def _image_preprocessing(shape: Tuple[int, ...], raw_max: float) -> Preprocessing:
    if len(shape) == 3 and shape[-1] in (1, 3):
        return Preprocessing(
            kind="image",
            shape=shape,
            color="grayscale" if shape[-1] == 1 else "rgb",
            resize="bilinear",
            scale=1.0 / 255.0 if raw_max > 1.5 else 1.0,
            offset=0.0,
            raw_dtype="uint8" if raw_max > 1.5 else "float32",
        )
    return Preprocessing(kind="array", shape=shape, color="grayscale", resize="none", scale=1.0, offset=0.0, raw_dtype="float32")


def _digits(test_fraction: float, seed: int) -> Dataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images.astype(np.float32) * (255.0 / 16.0))[..., None]
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = split(x, y, test_fraction, seed)
    return Dataset(
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        labels=tuple(str(i) for i in range(10)),
        preprocessing=_image_preprocessing((8, 8, 1), 255.0),
        name="digits",
    )


def _npz(path: Path) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path} is not a readable .npz ({exc}); write it with numpy.savez") from exc
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
    if missing:
        raise DataError(f"{path} lacks arrays {missing}; the .npz must hold x_train, y_train, x_test, y_test")
    x_train = arrays["x_train"].astype(np.float32)
    x_test = arrays["x_test"].astype(np.float32)
    if x_train.ndim == 3 and x_train.shape[-1] not in (1, 3):  # (N, H, W) grayscale images
        x_train, x_test = x_train[..., None], x_test[..., None]
    ys = []
    for key in ("y_train", "y_test"):
        y = arrays[key]
        if y.ndim == 2 and y.shape[1] > 1:  # one-hot
            y = y.argmax(axis=1)
        if not np.issubdtype(y.dtype, np.integer):
            if not np.all(np.equal(np.mod(y, 1), 0)):
                raise DataError(f"{path}: {key} holds non-integer values; give class indices 0..N-1")
        ys.append(y.reshape(-1).astype(np.int64))
    if "labels" in arrays:
        labels = tuple(str(v) for v in arrays["labels"].reshape(-1))
    else:
        labels = tuple(str(i) for i in range(int(max(ys[0].max(), ys[1].max())) + 1))
    raw_max = float(max(np.max(x_train), np.max(x_test)))
    return Dataset(x_train, ys[0], x_test, ys[1], labels, _image_preprocessing(tuple(x_train.shape[1:]), raw_max), path.stem)


_GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F")


def _is_gray(path: Path) -> bool:
    """True when the picture holds no colour: a grayscale mode (from the header), or R = G = B everywhere."""
    from PIL import Image
    from device_agent.inference.preprocess import decode_image

    try:
        with Image.open(path) as img:
            if img.mode in _GRAY_MODES:
                return True
    except OSError:
        pass  # decode_image says what is wrong with it
    rgb = decode_image(path, "rgb")
    return bool(np.all(rgb[..., 0] == rgb[..., 1]) and np.all(rgb[..., 1] == rgb[..., 2]))


def read_images(files, preprocessing: Preprocessing) -> np.ndarray:
    """Image files as raw model-sized inputs (float32 pixels 0..255, ``(N,) + preprocessing.shape``), each
    decoded and resized by the board's own code (device_agent.inference.preprocess), so that
    ``x * scale + offset`` is, element for element, what the agent feeds the model for the same file."""
    from device_agent.errors import InputError
    from device_agent.inference.preprocess import decode_image, preprocess

    raw_pre = replace(preprocessing, scale=1.0, offset=0.0)
    xs = []
    for f in files:
        try:
            xs.append(preprocess(decode_image(f, preprocessing.color), raw_pre))
        except InputError as exc:
            raise DataError(f"{exc}") from exc
    return np.stack(xs).astype(np.float32).reshape((-1,) + tuple(preprocessing.shape))


def _image_folder(path: Path, test_fraction: float, seed: int,
                  image_shape: Optional[Tuple[int, ...]] = None) -> Dataset:
    from device_agent.errors import InputError
    from device_agent.inference.preprocess import decode_image

    classes = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"image folder {path} has no class subfolders; put each class's images in {path}/<label>/")
    files = [(i, f) for i, c in enumerate(classes) for f in sorted(c.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DataError(f"image folder {path} has no images ({', '.join(IMAGE_SUFFIXES)}) in its class subfolders")
    empty = [c.name for i, c in enumerate(classes) if not any(j == i for j, _ in files)]
    if empty:
        raise DataError(f"class folder(s) {empty} in {path} hold no images; add images or remove the folder")
    try:
        if image_shape is not None:  # the model's input: its size, its channels
            if len(image_shape) != 3 or image_shape[-1] not in (1, 3):
                raise DataError(f"the model takes inputs of shape {list(image_shape)}; an image folder feeds "
                                "H x W x 1 (grayscale) or H x W x 3 (rgb) models")
            shape = tuple(int(d) for d in image_shape)
            color = "grayscale" if shape[2] == 1 else "rgb"
        else:  # the first picture's size (upright); rgb unless every picture is gray
            first = decode_image(files[0][1], "rgb")
            color = "grayscale" if all(_is_gray(f) for _, f in files) else "rgb"
            shape = (int(first.shape[0]), int(first.shape[1]), 1 if color == "grayscale" else 3)
    except InputError as exc:
        raise DataError(str(exc)) from exc
    pre = Preprocessing(kind="image", shape=shape, color=color, resize="bilinear", scale=1.0 / 255.0)
    x = read_images([f for _, f in files], pre)
    y = np.asarray([label for label, _ in files], dtype=np.int64)
    x_train, x_test, y_train, y_test = split(x, y, test_fraction, seed)
    return Dataset(x_train, y_train, x_test, y_test, tuple(c.name for c in classes), pre, path.name)


PHOTOS = "photos:"


def is_image_folder(spec: str) -> bool:
    """True when ``spec`` names pictures that are resized to the model's input (a folder, ``photos:DIR``)."""
    return spec.startswith(PHOTOS) or Path(spec).is_dir()


def _photos_folder(path: Path) -> Path:
    """The photo example in ``path``, written there (whole, or not at all) when it does not exist yet."""
    if path.exists():
        return path
    import shutil
    import tempfile

    from .photos import write_photos

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write_photos(tmp)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("photo example written to %s", path)
    return path


def load_dataset(spec: str, *, test_fraction: float = 0.2, seed: int = 0,
                 image_shape: Optional[Sequence[int]] = None) -> Dataset:
    """``"digits"``, a path to an ``.npz``, an image folder with one subfolder per class, or ``"photos:DIR"``
    (the photo example of :mod:`edgekit.photos`, written into DIR first when DIR does not exist).

    An image folder's pictures (JPEG, PNG, ... of any size and mode, EXIF-rotated or not) are decoded and
    resized exactly as the board does it (:func:`read_images`): to ``image_shape`` (H, W, C; the model's input)
    when given, else to the first picture's size, in rgb unless every picture is gray.
    """
    if spec == "digits":
        return _digits(test_fraction, seed)
    shape = tuple(image_shape) if image_shape is not None else None
    if spec.startswith(PHOTOS):
        return _image_folder(_photos_folder(Path(spec[len(PHOTOS):])), test_fraction, seed, shape)
    path = Path(spec)
    if not path.exists():
        raise DataError(f"data {spec!r} does not exist; pass 'digits', an .npz file or an image folder")
    if path.is_dir():
        return _image_folder(path, test_fraction, seed, shape)
    if path.suffix.lower() == ".npz":
        return _npz(path)
    raise DataError(f"data {spec!r} is neither an .npz nor a folder; pass 'digits', an .npz file or an image folder")
