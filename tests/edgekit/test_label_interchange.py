"""Samples out to Label Studio, FiftyOne, a CSV and class folders, and labels back from files those tools write.

The files read back are in the tools' own export formats (tests/edgekit/data/labeling/README.md says where
each layout comes from), not our writer read by our reader.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import shutil
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from collecting import MODEL, LABELS, prediction  # noqa: F401
from device_agent.delivery import protocol
from device_agent.update.manifest import Preprocessing
from edgekit.cli import main
from edgekit.errors import DataError
from edgekit.loop.interchange import export_for_labeling, import_labels, label_studio_config, read_labels
from edgekit.loop.retrain import load_feedback
from edgekit.loop.samples import export
from edgekit.loop.store import INVALID_LABEL, open_store
from labeling import DIGITS

DATA = Path(__file__).parent / "data" / "labeling"
IDS = [f"5b0f7c9e-8f0e-4a4e-9a51-{i:012d}" for i in range(1, 7)]
PRED = ["3", "5", "1", "7", "0", "2"]


@pytest.fixture
def tool_store(tmp_path):
    """Six real digits with the sample ids the tool files refer to."""
    url = f"sqlite:///{tmp_path}/samples.db"
    with open_store(url) as s:
        for i, (sid, pred) in enumerate(zip(IDS, PRED)):
            s.put_sample(protocol.sample_payload(
                device="pi-1", fleet="lab", seq=i, model=MODEL, sample_id=sid,
                prediction=prediction(int(pred), 0.3 + i / 20), reasons=["low_confidence"],
                raw=DIGITS["x"][i], source={"file": f"in-{i}.png"}), "t")
        yield s


def test_label_studio_tasks_carry_the_prediction_as_a_pre_annotation(tool_store, tmp_path):
    records = tool_store.list_samples()
    out = export_for_labeling(records, tmp_path / "ls", "label-studio", classes=LABELS)
    tasks = json.loads((out / "tasks.json").read_text())
    config = ET.fromstring((out / "label_config.xml").read_text())
    image = config.find("Image")
    choices = config.find("Choices")
    # what Label Studio matches: $image <- data.image, the result's from_name/to_name <- the control tags
    assert image.get("value") == "$image" and choices.get("toName") == image.get("name")
    values = [c.get("alias") or c.get("value") for c in choices.findall("Choice")]
    assert values == LABELS + [INVALID_LABEL]
    assert len(tasks) == 6
    for task, r in zip(tasks, records):
        assert task["data"]["sample_id"] == r.sample_id
        (p,) = task["predictions"]
        assert p["model_version"] == "digits 1.0.0" and p["score"] == pytest.approx(r.confidence)
        (res,) = p["result"]
        assert (res["from_name"], res["to_name"], res["type"]) == (choices.get("name"), image.get("name"), "choices")
        assert res["value"]["choices"] == [r.label_pred] and r.label_pred in values
        png = base64.b64decode(task["data"]["image"].split(",", 1)[1])
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), r.array()[..., 0])


def test_label_studio_json_export_labels_the_store(tool_store):
    res = import_labels(tool_store, DATA / "label-studio-export.json", classes=LABELS)
    assert res["labeled"] == 3 and res["skipped"] == {"no annotation (or only skipped ones)": 2}
    got = {sid: (r.label, r.labeled_by) for sid in IDS for r in [tool_store.get_sample(sid)]}
    assert got[IDS[0]] == ("9", "label-studio:2")  # the newer of two annotations
    assert got[IDS[1]] == ("5", "label-studio:1")
    assert got[IDS[2]] == (None, None)  # skipped in Label Studio
    assert got[IDS[3]] == (INVALID_LABEL, "label-studio:2")  # "none of these", by its alias
    assert got[IDS[4]] == (None, None)
    assert tool_store.label_history(IDS[0])[0].action == "import"
    again = import_labels(tool_store, DATA / "label-studio-export.json")
    assert (again["labeled"], again["unchanged"]) == (0, 3)  # importing twice changes nothing


def test_label_studio_json_min_export_labels_the_store(tool_store):
    res = import_labels(tool_store, DATA / "label-studio-export-min.json", fmt="label-studio", by="team")
    # one record per annotation: task 1 appears twice, the later record (the newer annotation) wins
    assert res["labeled"] == 3
    assert [tool_store.get_sample(s).label for s in IDS[:4]] == ["9", "5", None, INVALID_LABEL]
    assert tool_store.get_sample(IDS[0]).labeled_by == "team"


@pytest.mark.parametrize("layout", ["fiftyone-default", "fiftyone-classes", "fiftyone-confidence"])
def test_fiftyone_labels_json_labels_the_store(tool_store, layout):
    res = import_labels(tool_store, DATA / layout)
    assert res["format"] == "fiftyone" and res["labeled"] == 3
    assert [tool_store.get_sample(s).label for s in IDS] == ["4", "5", None, None, None, "2"]


def test_fiftyone_export_is_the_image_classification_layout(tool_store, tmp_path):
    records = tool_store.list_samples()
    out = export_for_labeling(records, tmp_path / "fo", "fiftyone", classes=LABELS)
    doc = json.loads((out / "labels.json").read_text())
    assert doc["classes"] == LABELS
    assert sorted(doc["labels"]) == sorted(p.stem for p in (out / "data").iterdir())
    for r in records:
        entry = doc["labels"][r.sample_id]
        assert LABELS[entry["label"]] == r.label_pred and entry["confidence"] == pytest.approx(r.confidence)
    # what FiftyOne gets back after a person corrected one label reads as FiftyOne writes it
    doc["labels"][IDS[0]] = {"label": 8, "confidence": 1.0}
    (out / "labels.json").write_text(json.dumps(doc, separators=(",", ":")))
    import_labels(tool_store, out)
    assert tool_store.get_sample(IDS[0]).label == "8" and tool_store.get_sample(IDS[1]).label == PRED[1]


def test_csv_round_trip_with_a_spreadsheet_edit(tool_store, tmp_path):
    out = export_for_labeling(tool_store.list_samples(), tmp_path / "c", "csv", classes=LABELS)
    rows = list(csv.DictReader(open(out / "labels.csv", newline="")))
    assert list(rows[0]) == ["image", "label", "confidence", "model_version", "sample_id"]
    assert all((out / row["image"]).is_file() for row in rows)
    # a spreadsheet saves it back: BOM, columns moved, some labels fixed, some cleared
    rows[0]["label"], rows[1]["label"], rows[2]["label"] = "6", INVALID_LABEL, ""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["sample_id", "label", "confidence", "image", "model_version"])
    w.writeheader()
    w.writerows(rows)
    (tmp_path / "edited.csv").write_bytes(b"\xef\xbb\xbf" + buf.getvalue().encode())
    res = import_labels(tool_store, tmp_path / "edited.csv", by="sheet")
    assert res["skipped"] == {"blank label": 1} and res["labeled"] == 5
    got = {row["sample_id"]: tool_store.get_sample(row["sample_id"]).label for row in rows}
    assert got[rows[0]["sample_id"]] == "6" and got[rows[1]["sample_id"]] == INVALID_LABEL
    assert got[rows[2]["sample_id"]] is None and got[rows[3]["sample_id"]] == rows[3]["label"]


def test_class_folders_from_a_cvat_imagenet_zip(tool_store, tmp_path):
    # CVAT's "ImageNet 1.0" export with images: <label>/<image name> in a zip; unlabeled ones are left out
    zpath = tmp_path / "task_7-imagenet.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for sid, label in ((IDS[0], "1"), (IDS[1], "2"), (IDS[5], "9")):
            buf = io.BytesIO()
            Image.fromarray(tool_store.get_sample(sid).array()[..., 0]).save(buf, format="PNG")
            z.writestr(f"{label}/{sid}.png", buf.getvalue())
    res = import_labels(tool_store, zpath)
    assert res["format"] == "folder" and res["labeled"] == 3
    assert [tool_store.get_sample(s).label for s in (IDS[0], IDS[1], IDS[5])] == ["1", "2", "9"]
    # and our own class-folder export reads back the same way (train/ and test/ splits included)
    folder = export(tool_store, tmp_path / "tree", fmt="folder", test_fraction=0.34)
    shutil.move(str(folder / "train" / "2"), str(folder / "train" / "4"))  # a person moved a misfiled one
    import_labels(tool_store, folder)
    assert tool_store.get_sample(IDS[1]).label == "4"


def test_imports_refuse_what_does_not_fit(tool_store, tmp_path):
    bad = tmp_path / "other.json"
    doc = json.loads((DATA / "label-studio-export.json").read_text())
    doc[1]["data"]["sample_id"] = "not-in-this-store"
    bad.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="not in sqlite"):
        import_labels(tool_store, bad)
    assert all(tool_store.get_sample(s).label is None for s in IDS)  # all or nothing
    with pytest.raises(DataError, match=r"labels \['9'\] are not among the classes"):
        import_labels(tool_store, DATA / "label-studio-export.json", classes=[str(i) for i in range(9)])
    with pytest.raises(DataError, match="index 4 but classes has 0"):
        (tmp_path / "fo").mkdir()
        (tmp_path / "fo" / "labels.json").write_text(json.dumps({"classes": None, "labels": {IDS[0]: 4}}))
        read_labels(tmp_path / "fo")
    (tmp_path / "x.txt").write_text("?")
    with pytest.raises(DataError, match="cannot tell the format"):
        read_labels(tmp_path / "x.txt")
    with pytest.raises(DataError, match="not an image"):
        p = protocol.sample_payload(device="mic", fleet="lab", seq=99, model=MODEL, prediction=prediction(3),
                                    reasons=["random"], raw=np.zeros(400, np.float32))
        tool_store.put_sample(p, "t")
        export_for_labeling([tool_store.get_sample(p["sample_id"])], tmp_path / "n", "label-studio", classes=LABELS)
    assert not (tmp_path / "n").exists()


def test_none_of_these_is_left_out_of_exports_and_retraining(tool_store, tmp_path):
    tool_store.set_labels({IDS[0]: "3", IDS[1]: "5", IDS[2]: INVALID_LABEL}, by="ann")
    out = export(tool_store, tmp_path / "fb.npz", labels=LABELS, test_fraction=0.0)
    with np.load(out) as z:
        assert sorted(z["sample_id"]) == sorted(IDS[:2]) and list(z["labels"]) == LABELS
    pre = Preprocessing(kind="image", shape=(8, 8, 1), scale=1 / 16)
    fb = load_feedback(tool_store.url, LABELS, pre)
    assert sorted(fb.ids) == sorted(IDS[:2])


def test_the_cli_exports_in_informative_order_and_imports(tool_store, tmp_path, capsys):
    url = tool_store.url
    assert main(["samples", "export", "--store", url, "--format", "label-studio", "--order", "informative",
                 "--limit", "4", "-o", str(tmp_path / "ls"), "--labels", ",".join(LABELS)]) == 0
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    assert len(tasks) == 4
    assert "wrote 4 sample(s)" in capsys.readouterr().out
    assert main(["samples", "list", "--store", url, "--order", "informative", "--limit", "4", "--json"]) == 0
    listed = [json.loads(line)["sample_id"] for line in capsys.readouterr().out.splitlines()]
    assert listed == [t["data"]["sample_id"] for t in tasks]  # one order for every tool
    assert main(["samples", "import", "--store", url, str(DATA / "label-studio-export.json")]) == 0
    assert "labeled 3 sample(s)" in capsys.readouterr().out
    assert main(["samples", "import", "--store", url, str(tmp_path / "missing.json")]) == 1
    assert "DataError:" in capsys.readouterr().err
    assert label_studio_config(["a&b"]).count('value="a&amp;b"') == 1
