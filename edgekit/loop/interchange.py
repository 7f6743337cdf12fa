"""Samples out to the labeling tools people already use, and their labels back in.

Export (:func:`export_for_labeling`, a directory written whole or not at all):

* ``label-studio``: ``tasks.json``, a list of Label Studio tasks; each has ``data.image`` (the input
  as a PNG data URI, or ``--image-url PREFIX`` + ``images/<sample_id>.png``), ``data.sample_id`` and
  the provenance, and the board's prediction as a pre-annotation
  (``predictions[0].result`` a ``choices`` result, ``model_version``, ``score`` = its confidence, so
  the Data Manager sorts by it); ``label_config.xml``, the labeling interface to paste into the
  project's settings (one choice per class and "none of these / not a valid input").
* ``fiftyone``: FiftyOne's ``FiftyOneImageClassificationDataset`` layout: ``data/<sample_id>.png``
  and ``labels.json`` (``{"classes": [...], "labels": {"<sample_id>": {"label": i, "confidence": c}}}``,
  the board's predictions with their confidences).
* ``csv``: ``labels.csv`` with ``image,label,confidence,model_version,sample_id`` (label: the
  board's prediction, to be corrected) and ``images/<sample_id>.png``.

The class-folder tree (CVAT's ImageNet format, Keras' ``image_dataset_from_directory``, FiftyOne's
``ImageClassificationDirectoryTree``) is :func:`edgekit.loop.samples.export` with ``fmt="folder"``.

Import (:func:`read_labels` then :func:`import_labels`; all or nothing):

* ``label-studio``: Label Studio's JSON export (tasks with ``annotations``; cancelled ones are
  skipped, the newest of the rest wins) or its JSON-MIN export (one record per annotation);
  the sample is found by ``data.sample_id``;
* ``fiftyone``: a ``labels.json`` (or its directory) as FiftyOne writes it: targets as class
  indices (with ``classes``) or names (``classes`` null), plain or with confidences; keys are
  the image names, i.e. sample ids;
* ``csv``: any CSV with ``sample_id`` and ``label`` columns (blank labels are skipped);
* ``folder``: a class-folder tree (a directory or a ``.zip``; ``<class>/<sample_id>.<ext>``, also
  under ``train/`` / ``test/``), as CVAT's ImageNet export writes it; ``no_label`` and
  ``_unlabeled`` folders are skipped.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple
from xml.sax.saxutils import quoteattr

from ..errors import DataError, OutputExistsError
from .label.render import kind, png_bytes
from .store import INVALID_LABEL, SampleRecord, Store

__all__ = ["EXPORT_FORMATS", "IMPORT_FORMATS", "INVALID_CHOICE", "export_for_labeling", "label_studio_config",
           "read_labels", "import_labels", "LabelFile"]

EXPORT_FORMATS = ("label-studio", "fiftyone", "csv")
IMPORT_FORMATS = ("label-studio", "fiftyone", "csv", "folder")
INVALID_CHOICE = "none of these / not a valid input"
"""What Label Studio shows for :data:`~edgekit.loop.store.INVALID_LABEL` (stored as its alias)."""
CONTROL = "label"  # the Choices control's name in label_config.xml (Label Studio's from_name)
MAX_IMPORT_BYTES = 512 * 1024 * 1024
_UNLABELED_DIRS = ("no_label", "_unlabeled")
_IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


# -- export -------------------------------------------------------------------------------------

def label_studio_config(classes: Sequence[str]) -> str:
    """The labeling interface for the exported tasks (Label Studio's Settings > Labeling Interface > Code)."""
    choices = "\n".join(f"    <Choice value={quoteattr(c)}/>" for c in classes)
    return (
        "<View>\n"
        '  <Image name="image" value="$image" zoom="true" smoothing="false"/>\n'
        '  <Text name="sample" value="$sample_id"/>\n'
        f'  <Choices name="{CONTROL}" toName="image" choice="single-radio" showInline="true" required="true">\n'
        f"{choices}\n"
        f"    <Choice value={quoteattr(INVALID_CHOICE)} alias={quoteattr(INVALID_LABEL)}/>\n"
        "  </Choices>\n"
        "</View>\n"
    )


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")


def _check_images(records: Sequence[SampleRecord], fmt: str) -> None:
    for r in records:
        if kind(r.array()) != "image":
            raise DataError(f"sample {r.sample_id} (input shape {list(r.input_shape)}) is not an image, and {fmt} "
                            "exports hold images; label it in `edgekit label` (it plots series) or export npz")


def export_for_labeling(records: Sequence[SampleRecord], output: "str | os.PathLike[str]", fmt: str, *,
                        classes: Sequence[str], image_url: Optional[str] = None, force: bool = False) -> Path:
    """Write ``records`` (in their order) for a labeling tool; returns the directory."""
    if fmt not in EXPORT_FORMATS:
        raise DataError(f"format {fmt!r} is not a labeling-tool export; use one of {', '.join(EXPORT_FORMATS)}")
    if not records:
        raise DataError("no samples to export; check the filters (and --labeled / --unlabeled)")
    out = Path(output)
    if out.exists() and not force:
        raise OutputExistsError(f"{out} exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise DataError(f"directory {out.parent} does not exist; create it first")
    _check_images(records, fmt)
    classes = list(classes)
    missing = sorted({r.label_pred for r in records if r.label_pred not in classes})
    if missing:
        raise DataError(f"predicted classes {missing} are not among the classes {classes}; pass --bundle DIR "
                        "(or --labels) with every class")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        {"label-studio": _write_label_studio, "fiftyone": _write_fiftyone, "csv": _write_csv}[fmt](
            records, tmp, classes, image_url)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_label_studio(records: Sequence[SampleRecord], tmp: Path, classes: List[str],
                        image_url: Optional[str]) -> None:
    tasks = []
    if image_url is not None:
        (tmp / "images").mkdir()
    for r in records:
        png = png_bytes(r)
        if image_url is None:
            image = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        else:
            (tmp / "images" / f"{r.sample_id}.png").write_bytes(png)
            image = f"{image_url}{r.sample_id}.png"
        tasks.append({
            "data": {
                "image": image, "sample_id": r.sample_id, "fleet": r.fleet, "device": r.device,
                "model_version": r.model_version, "predicted": r.label_pred, "confidence": round(r.confidence, 6),
                "margin": round(r.margin, 6), "reasons": ",".join(r.reasons), "received_at": _iso(r.received_at),
            },
            "predictions": [{
                "model_version": f"{r.model_name} {r.model_version}".strip(),
                "score": round(r.confidence, 6),
                "result": [{"id": r.sample_id.replace("-", "")[:10], "from_name": CONTROL, "to_name": "image",
                            "type": "choices", "value": {"choices": [r.label_pred]}}],
            }],
        })
    (tmp / "tasks.json").write_text(json.dumps(tasks, indent=1) + "\n", encoding="utf-8")
    (tmp / "label_config.xml").write_text(label_studio_config(classes), encoding="utf-8")


def _write_fiftyone(records: Sequence[SampleRecord], tmp: Path, classes: List[str], image_url: Optional[str]) -> None:
    (tmp / "data").mkdir()
    index = {c: i for i, c in enumerate(classes)}
    labels = {}
    for r in records:
        (tmp / "data" / f"{r.sample_id}.png").write_bytes(png_bytes(r))
        labels[r.sample_id] = {"label": index[r.label_pred], "confidence": round(r.confidence, 6)}
    (tmp / "labels.json").write_text(json.dumps({"classes": classes, "labels": labels}) + "\n", encoding="utf-8")


def _write_csv(records: Sequence[SampleRecord], tmp: Path, classes: List[str], image_url: Optional[str]) -> None:
    (tmp / "images").mkdir()
    with open(tmp / "labels.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "label", "confidence", "model_version", "sample_id"])
        for r in records:
            (tmp / "images" / f"{r.sample_id}.png").write_bytes(png_bytes(r))
            w.writerow([f"images/{r.sample_id}.png", r.label_pred, f"{r.confidence:.6f}", r.model_version,
                        r.sample_id])


# -- import -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LabelFile:
    """What a labeling tool's file says: {sample_id: (label, who)} and what was passed over, with why."""

    fmt: str
    labels: Mapping[str, Tuple[str, Optional[str]]]
    skipped: Mapping[str, int] = field(default_factory=dict)


def _detect(path: Path) -> str:
    if path.is_dir():
        if (path / "labels.json").is_file():
            return "fiftyone"
        return "folder"
    suffix = path.suffix.lower()
    if suffix == ".zip":
        return "folder"
    if suffix == ".csv":
        return "csv"
    if suffix == ".json":
        if path.name == "labels.json":
            return "fiftyone"
        return "label-studio"
    raise DataError(f"cannot tell the format of {path}; pass --format ({', '.join(IMPORT_FORMATS)})")


def _load_json(path: Path) -> Any:
    try:
        size = path.stat().st_size
        if size > MAX_IMPORT_BYTES:
            raise DataError(f"{path} is {size} bytes, more than the {MAX_IMPORT_BYTES} an import reads; split it")
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc


def read_labels(path: "str | os.PathLike[str]", fmt: Optional[str] = None) -> LabelFile:
    """Parse a labeling tool's export (format detected from the path unless given)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p} does not exist")
    fmt = fmt or _detect(p)
    if fmt not in IMPORT_FORMATS:
        raise DataError(f"format {fmt!r} is unknown; use one of {', '.join(IMPORT_FORMATS)}")
    reader = {"label-studio": _read_label_studio, "fiftyone": _read_fiftyone, "csv": _read_csv,
              "folder": _read_folder}[fmt]
    labels, skipped = reader(p)
    return LabelFile(fmt, labels, dict(skipped))


def _who(annotation: Mapping[str, Any]) -> Optional[str]:
    who = annotation.get("completed_by", annotation.get("annotator"))
    if isinstance(who, Mapping):
        who = who.get("email") or who.get("id")
    return f"label-studio:{who}" if who not in (None, "") else "label-studio"


def _choice(value: Any, p: Path, where: str) -> Optional[str]:
    """One class name from a choices value (a list of one, a string, or {"choices": [...]})."""
    if isinstance(value, Mapping):
        value = value.get("choices")
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        return value[0]
    if isinstance(value, list) and len(value) > 1:
        raise DataError(f"{p}: {where} chose {value}; a sample takes one class (use choice=\"single\")")
    return None


def _read_label_studio(p: Path) -> Tuple[Dict[str, Tuple[str, Optional[str]]], Dict[str, int]]:
    doc = _load_json(p)
    if isinstance(doc, Mapping):
        doc = [doc]
    if not isinstance(doc, list):
        raise DataError(f"{p} is not a Label Studio export (a JSON list of tasks)")
    labels: Dict[str, Tuple[str, Optional[str]]] = {}
    skipped: Dict[str, int] = {}

    def skip(why: str) -> None:
        skipped[why] = skipped.get(why, 0) + 1

    for n, task in enumerate(doc):
        if not isinstance(task, Mapping):
            raise DataError(f"{p}: item {n} is {type(task).__name__}, not a task object")
        if "data" in task or "annotations" in task:  # JSON: the raw task format
            data = task.get("data") or {}
            sid = data.get("sample_id") if isinstance(data, Mapping) else None
            if not sid:
                skip("no data.sample_id")
                continue
            anns = [a for a in task.get("annotations") or [] if isinstance(a, Mapping) and not a.get("was_cancelled")]
            if not anns:
                skip("no annotation (or only skipped ones)")
                continue
            ann = max(enumerate(anns), key=lambda ia: (str(ia[1].get("updated_at") or ia[1].get("created_at") or ""),
                                                       ia[0]))[1]
            label = None
            for res in ann.get("result") or []:
                if isinstance(res, Mapping) and res.get("type") == "choices":
                    label = _choice(res.get("value"), p, f"task {task.get('id', n)}")
                    if label is not None:
                        break
            if label is None:
                skip("annotation without a choice")
                continue
            labels[str(sid)] = (label, _who(ann))
        else:  # JSON-MIN: task data flattened, the control's name holds the choice
            sid = task.get("sample_id")
            if not sid:
                skip("no sample_id")
                continue
            value = task.get(CONTROL)
            if value is None:
                others = [k for k, v in task.items() if isinstance(v, (str, list, Mapping)) and k not in _LS_DATA_KEYS]
                value = task.get(others[0]) if len(others) == 1 else None
            label = _choice(value, p, f"record {n}")
            if label is None:
                skip("annotation without a choice")
                continue
            labels[str(sid)] = (label, _who(task))
    return labels, skipped


_LS_DATA_KEYS = {"image", "sample_id", "fleet", "device", "model_version", "predicted", "confidence", "margin",
                 "reasons", "received_at", "id", "annotator", "annotation_id", "created_at", "updated_at",
                 "lead_time", "agreement"}


def _read_fiftyone(p: Path) -> Tuple[Dict[str, Tuple[str, Optional[str]]], Dict[str, int]]:
    path = p / "labels.json" if p.is_dir() else p
    doc = _load_json(path)
    if not isinstance(doc, Mapping) or not isinstance(doc.get("labels"), Mapping):
        raise DataError(f"{path} is not FiftyOne's labels.json (an object with a 'labels' mapping)")
    classes = doc.get("classes")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise DataError(f"{path}: 'classes' must be a list of class names or null")
    labels: Dict[str, Tuple[str, Optional[str]]] = {}
    skipped: Dict[str, int] = {}
    for key, target in doc["labels"].items():
        if isinstance(target, Mapping):
            target = target.get("label")
        if target is None:
            skipped["unlabeled"] = skipped.get("unlabeled", 0) + 1
            continue
        if isinstance(target, bool) or not isinstance(target, (int, str)):
            raise DataError(f"{path}: label of {key!r} is {target!r}; expected a class index or name")
        if isinstance(target, int):
            if classes is None or not 0 <= target < len(classes):
                raise DataError(f"{path}: label of {key!r} is index {target} but classes has "
                                f"{0 if classes is None else len(classes)} entries")
            target = classes[target]
        labels[PurePosixPath(str(key).replace("\\", "/")).name.rsplit(".", 1)[0]
               if ("/" in str(key) or "\\" in str(key)) else str(key)] = (target, "fiftyone")
    return labels, skipped


def _read_csv(p: Path) -> Tuple[Dict[str, Tuple[str, Optional[str]]], Dict[str, int]]:
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read {p}: {exc}") from exc
    if not rows or "sample_id" not in rows[0] or "label" not in rows[0]:
        raise DataError(f"{p} needs a header with 'sample_id' and 'label' columns "
                        "(as `edgekit samples export --format csv` writes)")
    labels: Dict[str, Tuple[str, Optional[str]]] = {}
    skipped: Dict[str, int] = {}
    for n, row in enumerate(rows, start=2):
        sid, label = (row.get("sample_id") or "").strip(), (row.get("label") or "").strip()
        if not sid:
            raise DataError(f"{p} line {n}: no sample_id")
        if not label:
            skipped["blank label"] = skipped.get("blank label", 0) + 1
            continue
        labels[sid] = (label, "csv")
    return labels, skipped


def _read_folder(p: Path) -> Tuple[Dict[str, Tuple[str, Optional[str]]], Dict[str, int]]:
    if p.is_dir():
        names = [str(f.relative_to(p)).replace(os.sep, "/") for f in p.rglob("*") if f.is_file()]
    else:
        try:
            with zipfile.ZipFile(p) as z:
                names = [i.filename for i in z.infolist() if not i.is_dir()]
        except (OSError, zipfile.BadZipFile) as exc:
            raise DataError(f"cannot read {p} as a zip of class folders: {exc}") from exc
    labels: Dict[str, Tuple[str, Optional[str]]] = {}
    skipped: Dict[str, int] = {}
    for name in names:
        path = PurePosixPath(name)
        if path.suffix.lower() not in _IMAGE_EXT:
            continue
        if len(path.parts) < 2:
            skipped["image outside a class folder"] = skipped.get("image outside a class folder", 0) + 1
            continue
        cls = path.parent.name
        if cls in _UNLABELED_DIRS:
            skipped["unlabeled"] = skipped.get("unlabeled", 0) + 1
            continue
        sid = path.stem
        if sid in labels and labels[sid][0] != cls:
            raise DataError(f"{p}: {sid} is in two class folders ({labels[sid][0]}, {cls}); keep one")
        labels[sid] = (cls, "folder")
    if not labels and not skipped:
        raise DataError(f"{p} holds no images in class folders (<class>/<sample_id>.png)")
    return labels, skipped


def import_labels(store: Store, source: "str | os.PathLike[str] | LabelFile", *, fmt: Optional[str] = None,
                  by: Optional[str] = None, classes: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Label the store's samples from a labeling tool's export; all or nothing.

    Unknown sample ids, or (when ``classes`` is given) labels outside the classes, refuse the whole
    file. ``by`` overrides who the tool says labelled. Returns counts: ``labeled`` (changed),
    ``unchanged``, ``skipped`` (by reason).
    """
    lf = source if isinstance(source, LabelFile) else read_labels(source, fmt)
    if not lf.labels:
        raise DataError(f"the {lf.fmt} file holds no labels" + (f" (skipped: {dict(lf.skipped)})" if lf.skipped else ""))
    current = store.labels_of(lf.labels)
    unknown = [sid for sid in lf.labels if sid not in current]
    if unknown:
        raise DataError(f"{len(unknown)} sample id(s) of the {lf.fmt} file are not in {store.url}, e.g. "
                        f"{unknown[:3]}; import into the store the samples were exported from")
    if classes is not None:
        allowed = set(classes) | {INVALID_LABEL}
        bad = sorted({label for label, _ in lf.labels.values() if label not in allowed})
        if bad:
            raise DataError(f"labels {bad[:5]} are not among the classes {list(classes)}; fix them in the tool "
                            "or pass the right --bundle / --labels")
    changed: Dict[str, Dict[str, str]] = {}
    for sid, (label, who) in lf.labels.items():
        if current[sid][0] != label:
            changed.setdefault(by or who or lf.fmt, {})[sid] = label
    with store.batch():
        for who, mapping in changed.items():
            store.set_labels(mapping, by=who, action="import")
    n = sum(len(m) for m in changed.values())
    return {"format": lf.fmt, "labeled": n, "unchanged": len(lf.labels) - n, "skipped": dict(lf.skipped)}
