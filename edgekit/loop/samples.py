"""Relabel and export what the collector stored.

* :func:`export` writes labeled samples as an ``.npz`` that ``edgekit convert
  --data`` and ``edgekit.data.load_dataset`` read (``x_train, y_train, x_test,
  y_test, labels`` plus provenance arrays), or as an image folder with one
  subfolder per class (``keras.utils.image_dataset_from_directory``) and a
  ``provenance.csv``. Both are written to a temporary sibling then renamed.
* :func:`import_labels_csv` labels many samples from an ``id,label`` CSV.
* Samples labelled :data:`~edgekit.loop.store.INVALID_LABEL` ("none of these / not a valid
  input") are a decision, not a class: exports leave them out.
* :func:`render_ascii` / :func:`save_image` show a sample that is an image.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import DataError, OutputExistsError, StoreError
from .store import INVALID_LABEL, SampleRecord, Store

__all__ = ["export", "import_labels_csv", "class_order", "render_ascii", "save_image", "PROVENANCE_FIELDS"]

PROVENANCE_FIELDS = ("sample_id", "device", "model_version", "confidence", "reasons")


def class_order(records: Sequence[SampleRecord], labels: Optional[Sequence[str]] = None) -> Tuple[str, ...]:
    """The class names, in index order: ``labels`` if given, else the model's own order
    (read from the stored top-k), else sorted. Every human label must be among them
    (:data:`INVALID_LABEL` is not a class and is ignored)."""
    used = sorted({r.label for r in records if r.label is not None and r.label != INVALID_LABEL})
    if labels is not None:
        order = tuple(str(v) for v in labels)
        if len(set(order)) != len(order):
            raise DataError(f"labels={list(order)} has duplicates; give each class once")
    else:
        index: Dict[int, str] = {}
        for r in records:
            for k in ({"index": r.pred_index, "label": r.label_pred},) + tuple(r.top_k):
                i, name = k.get("index"), k.get("label")
                if isinstance(i, int) and i >= 0 and name is not None:
                    index.setdefault(i, str(name))
        names = [index.get(i) for i in range(max(index) + 1)] if index else []
        complete = names and None not in names and len(set(names)) == len(names) and set(used) <= set(names)
        order = tuple(names) if complete else tuple(used)
    unknown = [v for v in used if v not in order]
    if unknown:
        raise DataError(f"labels {unknown} are not among the classes {list(order)}; pass labels= with every class")
    return order


def _split(n: int, test_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    if not 0.0 <= test_fraction < 1.0:
        raise DataError(f"test_fraction={test_fraction}, expected 0 <= test_fraction < 1")
    order = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def export(
    store: Store,
    output: "str | os.PathLike[str]",
    *,
    fmt: str = "npz",
    labels: Optional[Sequence[str]] = None,
    test_fraction: Optional[float] = None,
    labeled_only: bool = True,
    seed: int = 0,
    force: bool = False,
    records: Optional[Sequence[SampleRecord]] = None,
    **filters: object,
) -> Path:
    """Write the samples (filtered like :meth:`Store.list_samples`, or ``records`` when given, e.g. in an
    order with a limit) as a data set; returns the path. Samples labelled "none of these" are left out.

    Unlabeled samples (``labeled_only=False``, npz only) get ``y = -1``. ``test_fraction`` defaults to
    0.2 for npz (so ``edgekit convert --data`` takes the file as it is: it needs both splits) and to 0 for
    a folder (one subfolder per class, no split).
    """
    if test_fraction is None:
        test_fraction = 0.2 if fmt == "npz" else 0.0
    if fmt not in ("npz", "folder"):
        raise DataError(f"fmt={fmt!r}, expected 'npz' or 'folder'")
    if fmt == "folder" and not labeled_only:
        raise DataError("a folder export needs a class for every image; keep labeled_only=True or export npz")
    out = Path(output)
    if out.exists() and not force:
        raise OutputExistsError(f"{out} exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise DataError(f"directory {out.parent} does not exist; create it first")
    if records is None:
        records = store.list_samples(labeled=True if labeled_only else None, **filters)  # type: ignore[arg-type]
    records = [r for r in records if r.label != INVALID_LABEL and (r.label is not None or not labeled_only)]
    if not records:
        raise DataError(f"no {'labeled ' if labeled_only else ''}samples match in {store.url}; "
                        "label some with `edgekit samples label`")
    order = class_order(records, labels)
    shapes = {(r.input_dtype, r.input_shape) for r in records}
    if len(shapes) > 1:
        raise DataError(f"samples have different inputs {sorted(shapes)[:4]}; filter by --model-version or --device")
    train, test = _split(len(records), test_fraction, seed)
    if fmt == "npz":
        return _write_npz(records, order, train, test, out)
    return _write_folder(records, order, train, test, out)


def _y(records: Sequence[SampleRecord], order: Sequence[str]) -> np.ndarray:
    index = {name: i for i, name in enumerate(order)}
    return np.asarray([index[r.label] if r.label is not None else -1 for r in records], dtype=np.int64)


def _write_npz(records: List[SampleRecord], order: Tuple[str, ...], train: np.ndarray, test: np.ndarray,
               out: Path) -> Path:
    x = np.stack([r.array() for r in records])
    y = _y(records, order)
    rows = [records[i] for i in np.concatenate([train, test])]
    arrays = {
        "x_train": x[train], "y_train": y[train], "x_test": x[test], "y_test": y[test],
        "labels": np.asarray(order, dtype=str),
        # Provenance: one entry per row of x_train, then x_test.
        "sample_id": np.asarray([r.sample_id for r in rows], dtype=str),
        "device": np.asarray([r.device for r in rows], dtype=str),
        "model_version": np.asarray([r.model_version for r in rows], dtype=str),
        "confidence": np.asarray([r.confidence for r in rows], dtype=np.float64),
        "reasons": np.asarray([",".join(r.reasons) for r in rows], dtype=str),
        "split": np.asarray(["train"] * len(train) + ["test"] * len(test), dtype=str),
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".npz", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _image(arr: np.ndarray) -> "object":
    from PIL import Image

    if arr.dtype != np.uint8:
        raise DataError(f"input dtype={arr.dtype.name} is not 8-bit pixels; export npz instead of a folder")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        return Image.fromarray(arr, mode="L")
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        return Image.fromarray(arr, mode="RGB" if arr.shape[-1] == 3 else "RGBA")
    raise DataError(f"input shape={list(arr.shape)} is not an image (H x W x 1|3|4); export npz instead")


def _write_folder(records: List[SampleRecord], order: Tuple[str, ...], train: np.ndarray, test: np.ndarray,
                  out: Path) -> Path:
    for name in order:
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            raise DataError(f"class name {name!r} cannot be a folder name; rename the label")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        prov = []
        for split, idx in (("train", train), ("test", test)):
            base = tmp / split if len(test) else tmp
            for i in idx:
                r = records[i]
                rel = Path(r.label) / f"{r.sample_id}.png"  # type: ignore[arg-type]
                (base / rel.parent).mkdir(parents=True, exist_ok=True)
                _image(r.array()).save(base / rel)  # type: ignore[attr-defined]
                prov.append([str(base.relative_to(tmp) / rel), r.label, split, r.sample_id, r.device,
                             r.model_version, f"{r.confidence:.6f}", ",".join(r.reasons)])
        with open(tmp / "provenance.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["file", "label", "split", *PROVENANCE_FIELDS])
            w.writerows(prov)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def import_labels_csv(store: Store, path: "str | os.PathLike[str]", *, by: str = "csv") -> int:
    """Label samples from a CSV of ``id,label`` rows (a header row is optional); all or nothing."""
    p = Path(path)
    try:
        with open(p, newline="", encoding="utf-8") as f:
            rows = [row for row in csv.reader(f) if row and any(c.strip() for c in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read labels CSV {p}: {exc}") from exc
    if rows and rows[0][0].strip().lower() in ("id", "sample_id"):
        rows = rows[1:]
    mapping: Dict[str, str] = {}
    for n, row in enumerate(rows, start=1):
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise DataError(f"{p} row {n}: {row!r} is not 'id,label'; every row needs a sample id and a label")
        mapping[row[0].strip()] = row[1].strip()
    if not mapping:
        raise DataError(f"{p} holds no id,label rows")
    try:
        return store.set_labels(mapping, by=by)
    except StoreError as exc:
        raise DataError(f"{p}: {exc}") from exc


_RAMP = " .:-=+*#%@"


def render_ascii(arr: np.ndarray, max_width: int = 64) -> str:
    """A small grayscale image as text (two characters a pixel), or a one-line summary."""
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 2 or a.shape[1] > max_width:
        return f"<{a.dtype.name} array of shape {list(np.asarray(arr).shape)}; use --image out.png to see it>"
    lo, hi = float(a.min()), float(a.max())
    scaled = np.zeros(a.shape, dtype=int) if hi <= lo else ((a - lo) / (hi - lo) * (len(_RAMP) - 1)).round().astype(int)
    return "\n".join("".join(_RAMP[v] * 2 for v in row) for row in scaled)


def save_image(record: SampleRecord, path: "str | os.PathLike[str]", *, scale: int = 1) -> Path:
    """Write a sample's input as a PNG (nearest-neighbour upscaled by ``scale``)."""
    img = _image(record.array())
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), 0)  # type: ignore[attr-defined]
    out = Path(path)
    img.save(out)  # type: ignore[attr-defined]
    return out
