"""The bundle contract on the board side: manifest round trip, archives, and the errors that name the field."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from device_agent.errors import BundleError
from device_agent.update.manifest import FORMAT, Manifest, load_bundle

BUNDLE = Path(__file__).parent / "data" / "digits-bundle"


def _copy(tmp_path) -> Path:
    out = tmp_path / "b"
    shutil.copytree(BUNDLE, out)
    return out


def _edit(bundle: Path, change) -> None:
    data = json.loads((bundle / "manifest.json").read_text())
    change(data)
    (bundle / "manifest.json").write_text(json.dumps(data))


def test_manifest_round_trips_through_json():
    m = load_bundle(BUNDLE).manifest
    again = Manifest.from_dict(json.loads(m.to_json()))
    assert again == m and m.format == FORMAT and m.input.dtype == "int8" and len(m.labels) == 10


def test_an_archive_loads_and_its_temporary_copy_is_removed_at_exit(tmp_path):
    archive = tmp_path / "b.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(BUNDLE, arcname="digits-v1")
    code = f"import device_agent as d; b = d.load_bundle({str(archive)!r}); print(b.path); print(b.manifest.sha256)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[1] == load_bundle(BUNDLE).manifest.sha256
    assert not Path(out[0]).exists()


def test_an_archive_with_an_unsafe_path_is_refused(tmp_path):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        data = b"x"
        info = tarfile.TarInfo("../../escape.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(BundleError, match="unsafe path"):
        load_bundle(archive)
    assert not (tmp_path.parent / "escape.txt").exists()


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda d: d.pop("labels"), "'labels' is missing"),
        (lambda d: d["model"].pop("sha256"), "'model.sha256' is missing"),
        (lambda d: d.update(format="edgekit-bundle/99"), "format='edgekit-bundle/99' is not supported"),
        (lambda d: d["preprocessing"].update(color="cmyk"), "preprocessing.color='cmyk'"),
        (lambda d: d["input"].update(dtype="complex64"), "dtype='complex64' is not supported"),
        (lambda d: d["confidence"].update(threshold=1.5), "'confidence.threshold'=1.5 must be within [0, 1]"),
    ],
)
def test_a_bad_manifest_names_the_field(tmp_path, change, words):
    bundle = _copy(tmp_path)
    _edit(bundle, change)
    with pytest.raises(BundleError) as err:
        load_bundle(bundle)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_a_replaced_model_fails_the_sha256_check(tmp_path):
    bundle = _copy(tmp_path)
    (bundle / "model.tflite").write_bytes(b"\0" * 64)
    with pytest.raises(BundleError, match="does not match the manifest"):
        load_bundle(bundle)
