"""Relabel and export: npz and image folder round trips, CSV labels, the samples CLI."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from collecting import LABELS, sample, store, store_url  # noqa: F401  (fixtures)
from edgekit.cli import main
from edgekit.data import load_dataset
from edgekit.errors import DataError, OutputExistsError
from edgekit.loop.samples import export, import_labels_csv, render_ascii
from edgekit.loop.store import open_store

DIGITS = np.load(__import__("pathlib").Path(__file__).resolve().parents[1] / "device_agent" / "data" / "digits-300.npz")


def _fill(store, n=40, label_every=1):
    """n real digits as samples; every label_every-th one labeled with its true class."""
    truth = {}
    for i in range(n):
        p = sample(i, raw=DIGITS["x"][i], index=int(DIGITS["y"][(i + 1) % 300]), confidence=0.3 + (i % 5) / 10)
        store.put_sample(p, "t")
        if i % label_every == 0:
            truth[p["sample_id"]] = (str(int(DIGITS["y"][i])), DIGITS["x"][i])
    store.set_labels({k: v[0] for k, v in truth.items()})
    return truth


def test_npz_export_round_trips_through_load_dataset(store, tmp_path):
    truth = _fill(store, 40, label_every=2)  # 20 labeled
    out = export(store, tmp_path / "feedback.npz", test_fraction=0.25, seed=1, labels=LABELS)
    ds = load_dataset(str(out))
    assert ds.labels == tuple(LABELS)
    assert len(ds.x_train) == 15 and len(ds.x_test) == 5
    with np.load(out) as z:
        assert z["x_train"].dtype == np.uint8  # raw, as the board sent it
        ids = list(z["sample_id"])
        assert sorted(ids) == sorted(truth) and list(z["split"]) == ["train"] * 15 + ["test"] * 5
        x = np.concatenate([z["x_train"], z["x_test"]])
        y = np.concatenate([z["y_train"], z["y_test"]])
        assert set(z.files) >= {"labels", "device", "model_version", "confidence", "reasons"}
        assert list(z["reasons"])[:1] == ["low_confidence"] and list(z["model_version"])[:1] == ["1.0.0"]
    for sid, xi, yi in zip(ids, x, y):
        label, raw = truth[sid]
        assert np.array_equal(xi, raw) and ds.labels[yi] == label
    np.testing.assert_array_equal(ds.x_train, x[:15].astype(np.float32))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_folder_export_is_one_subfolder_per_class_with_provenance(store, tmp_path):
    truth = _fill(store, 30)
    out = export(store, tmp_path / "feedback", fmt="folder")
    rows = list(csv.DictReader(open(out / "provenance.csv")))
    assert len(rows) == 30
    for row in rows:
        label, raw = truth[row["sample_id"]]
        assert row["file"].startswith(f"{label}/") and row["label"] == label
        img = np.asarray(Image.open(out / row["file"]))
        assert np.array_equal(img, raw[..., 0])
    ds = load_dataset(str(out), test_fraction=0.2)
    assert set(ds.labels) == {v[0] for v in truth.values()}
    split = export(store, tmp_path / "split", fmt="folder", test_fraction=0.2)
    assert sorted(p.name for p in split.iterdir()) == ["provenance.csv", "test", "train"]
    assert len(list(split.glob("*/*/*.png"))) == 30


def test_export_refuses_what_it_cannot_write(store, tmp_path):
    with pytest.raises(DataError, match="no labeled samples"):
        export(store, tmp_path / "x.npz")
    _fill(store, 4)
    (tmp_path / "x.npz").write_bytes(b"keep me")
    with pytest.raises(OutputExistsError, match="--force"):
        export(store, tmp_path / "x.npz")
    assert (tmp_path / "x.npz").read_bytes() == b"keep me"
    with pytest.raises(DataError, match="not among the classes"):
        export(store, tmp_path / "y.npz", labels=["a", "b"])
    store.put_sample(sample(99, raw=np.zeros((4, 4, 1), np.float32)), "t")
    with pytest.raises(DataError, match="different inputs"):
        export(store, tmp_path / "z.npz", labeled_only=False)
    assert export(store, tmp_path / "x.npz", force=True).stat().st_size > 100


def test_labels_from_csv_all_or_nothing(store, tmp_path):
    payloads = [sample(i) for i in range(3)]
    for p in payloads:
        store.put_sample(p, "t")
    ids = [p["sample_id"] for p in payloads]
    good = tmp_path / "labels.csv"
    good.write_text("id,label\n" + "".join(f"{sid},{n}\n" for n, sid in enumerate(ids)))
    assert import_labels_csv(store, good) == 3
    assert [store.get_sample(s).label for s in ids] == ["0", "1", "2"]
    bad = tmp_path / "bad.csv"
    bad.write_text(f"{ids[0]},9\n00000000-0000-0000-0000-000000000000,4\n")
    with pytest.raises(DataError, match="not in the store"):
        import_labels_csv(store, bad)
    assert store.get_sample(ids[0]).label == "0"
    bad.write_text(f"{ids[0]}\n")
    with pytest.raises(DataError, match="row 1"):
        import_labels_csv(store, bad)


def test_the_samples_cli_lists_shows_labels_and_exports(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/s.db"
    with open_store(url) as s:
        for i in range(6):
            s.put_sample(sample(i, raw=DIGITS["x"][i], device="a" if i < 4 else "b", confidence=0.1 * (i + 1)), "t")
    assert main(["samples", "list", "--store", url, "--json", "--device", "a", "--max-confidence", "0.35"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["seq"] for r in rows] == [0, 1, 2] and rows[0]["input"] == {"dtype": "uint8", "shape": [8, 8, 1]}
    sid = rows[0]["sample_id"]
    assert main(["samples", "label", "--store", url, sid, "0"]) == 0
    assert main(["samples", "list", "--store", url, "--labeled", "--json"]) == 0
    out = capsys.readouterr().out
    assert [json.loads(x)["label"] for x in out.splitlines() if x.startswith("{")] == ["0"]
    assert main(["samples", "show", "--store", url, sid]) == 0
    shown = capsys.readouterr().out
    assert "label 0 by cli" in shown and render_ascii(DIGITS["x"][0]) in shown
    assert main(["samples", "show", "--store", url, sid, "--image", str(tmp_path / "s.png")]) == 0
    assert Image.open(tmp_path / "s.png").size == (64, 64)
    labels = tmp_path / "l.csv"
    labels.write_text("".join(f"{r['sample_id']},{r['seq'] % 3}\n" for r in rows[1:]))
    assert main(["samples", "label", "--store", url, "--csv", str(labels)]) == 0
    assert main(["samples", "export", "--store", url, "-o", str(tmp_path / "e.npz"), "--labels", "0,1,2"]) == 0
    with np.load(tmp_path / "e.npz") as z:
        assert list(z["labels"]) == ["0", "1", "2"] and (len(z["x_train"]), len(z["x_test"])) == (2, 1)
    bundle = __import__("pathlib").Path(__file__).resolve().parents[1] / "device_agent" / "data" / "digits-bundle"
    assert main(["samples", "export", "--store", url, "-o", str(tmp_path / "b.npz"), "--bundle", str(bundle)]) == 0
    with np.load(tmp_path / "b.npz") as z:
        assert list(z["labels"]) == LABELS  # the bundle's classes, in its order
    # With the default split the export is a data set `edgekit convert --data` accepts as it is.
    exported = load_dataset(str(tmp_path / "b.npz"))
    assert (len(exported.x_train), len(exported.x_test)) == (2, 1) and exported.labels == tuple(LABELS)
    assert main(["samples", "export", "--store", url, "-o", str(tmp_path / "e.npz")]) == 1
    assert "OutputExistsError" in capsys.readouterr().err
    assert main(["samples", "show", "--store", url, "nope"]) == 1
    assert "StoreError: sample 'nope' is not in the store" in capsys.readouterr().err


def test_the_class_order_comes_from_the_models_top_k_when_no_labels_are_given(store, tmp_path):
    p = sample(1)  # predicted "3" (index 3) with "4" (index 4) second
    p["prediction"]["top_k"] = [{"label": str(i), "index": i, "score": 0.1} for i in range(10)]
    store.put_sample(p, "t")
    store.set_label(p["sample_id"], "7")
    with np.load(export(store, tmp_path / "o.npz")) as z:
        assert list(z["labels"]) == LABELS and list(z["y_train"]) == [7]


def test_ascii_rendering_shows_a_small_image_and_summarises_a_big_one():
    art = render_ascii(np.array([[0, 255], [255, 0]], dtype=np.uint8))
    assert art.splitlines() == ["  @@", "@@  "]
    assert "use --image" in render_ascii(np.zeros((96, 96, 3), np.uint8))
