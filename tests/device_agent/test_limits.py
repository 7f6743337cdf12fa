"""The limits (device_agent/limits.py), the .npy reader, the archive rules and the trial run, one by one."""

from __future__ import annotations

import io
import json
import math
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from device_agent import limits
from device_agent.errors import BundleError, InputError, ProtocolError
from device_agent.inference.npy import read_npy
from device_agent.inference.preprocess import load_raw
from device_agent.delivery import protocol
from device_agent.update.archive import remove_tree, unpack
from device_agent.update.manifest import load_bundle
from device_agent.update.sandbox import TrialTimeout, trial_run

import craft
from conftest import BUNDLE, DATA
from craft import entry, tar_gz


# -- JSON, shapes, numbers ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("payload, depth", [
    (b"1", 0), (b"{}", 1), (b'[[1], {"a": [2]}]', 3), (b'"[[[[[[[["', 0), (b'["\\"[[", "\\\\", [[]]]', 3),
    (b"[" * 100000, 100000), (b"]]]][[", 2),
    # a string with no closing quote runs to the end: json.loads never recurses into what follows it either
    (b'[["abc\\', 2), (b'["\\"[[[', 1), (b'[[1], "x[[[[', 2), (b'["a\\\\"[[', 3),
    # runs of backslashes: pairs from the left, an odd run escapes the quote after it
    (b'["\\\\\\"[", [[]]]', 3), (b'[["a\\\\\\\\\\"[[', 2), (b'["\\\\\\\\", [[]]]', 3),
])
def test_json_depth_counts_brackets_outside_strings(payload, depth):
    assert limits.json_depth(payload) == depth


def test_an_unterminated_string_of_escapes_is_measured_in_one_pass():
    """A hostile board or client sends a string that never closes, full of escaped quotes, on a topic that takes
    4 MiB: the depth check must not retry the string from every quote in it (it did: 55 s for 80 KB, hours for
    4 MiB, the agent's MQTT thread stuck). Run in a child with a bound a linear pass is thousands of times under
    (bench: tens of ms for 4 MiB, whatever the strings hold; a regex pass over the strings took 0.2-0.35 s)."""
    code = ("from device_agent import limits\n"
            "d = b'\"' + b'\\\\\"' * 2_000_000 + b'[' * 40\n"
            "assert len(d) > 4_000_000 and limits.json_depth(d) == 0\n"
            "assert limits.json_depth(b'[' * 40 + d) == 40\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_a_deep_or_big_payload_is_refused_before_json_sees_it():
    with pytest.raises(ProtocolError, match="command nests JSON 990 levels deep, over the limit of 32"):
        limits.loads(b"[" * 990 + b"]" * 990, what="command", max_bytes=1 << 20, error=ProtocolError)
    with pytest.raises(ProtocolError, match="is 65537 bytes, over the limit of 65536"):
        limits.loads(b" " * 65537, what="command", max_bytes=65536, error=ProtocolError)
    assert limits.loads(json.dumps({"a": [[[1]]]}).encode(), what="x", max_bytes=100) == {"a": [[[1]]]}


@pytest.mark.parametrize("shape, words", [
    ([20000, 20000, 1], "has 400000000 elements, over the limit of 4194304"),
    ([1] * 9, "has rank 9, over the limit of 8"),
    ([8, 0, 1], "non-positive dimension"),
    ([8, 8.5, 1], "must be a list of integers"),
    ("8x8", "must be a list of integers"),
    ([True, 8], "must be a list of integers"),
])
def test_a_bad_shape_is_refused_with_its_name(shape, words):
    with pytest.raises(BundleError, match="preprocessing.shape") as err:
        limits.check_shape(shape, what="preprocessing.shape", error=BundleError)
    assert words in str(err.value)


def test_shapes_within_the_limit_pass():
    assert limits.check_shape([2048, 2048, 1], what="s") == (2048, 2048, 1)
    assert limits.check_shape([-1, 8, 8, 1], what="s", allow_batch=True) == (-1, 8, 8, 1)


@pytest.mark.parametrize("value, bounds, words", [
    (math.nan, dict(lo=0, hi=1), "must be a finite number"),
    (math.inf, dict(), "must be a finite number"),
    (5, dict(lo=0, hi=1), "=5 must be within [0, 1]"),
    ("0.5", dict(), "must be a number"),
    (0, dict(nonzero=True), "must not be zero"),
    (-1e-9, dict(lo=0), "must be >= 0"),
])
def test_numbers_are_finite_and_in_range(value, bounds, words):
    with pytest.raises(BundleError) as err:
        limits.check_number(value, what="manifest field 'x'", error=BundleError, **bounds)
    assert words in str(err.value)


# -- .npy ---------------------------------------------------------------------------------------------------------

def _npy_bytes(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_an_npy_written_by_numpy_reads_back_identically_without_np_load(tmp_path):
    for a in (np.arange(64, dtype=np.uint8).reshape(8, 8, 1), np.asfortranarray(np.random.rand(3, 4)),
              np.float32(3.5)):
        assert np.array_equal(read_npy(_npy_bytes(a), what="x"), a)
        np.save(tmp_path / "a.npy", a)
        assert np.array_equal(load_raw(tmp_path / "a.npy"), a)


@pytest.mark.parametrize("header, data, words", [
    ({"descr": "<f4", "fortran_order": False, "shape": (100000, 100000)}, b"", "(10000000000 elements), over the limit"),
    ({"descr": "|O", "fortran_order": False, "shape": (2,)}, b"\0" * 16, "has dtype object"),
    ({"descr": "<f4", "fortran_order": False, "shape": (4,)}, b"\0" * 15, "holds 15 data bytes, expected=16"),
    ({"descr": [("a", "<f4")], "fortran_order": False, "shape": (1,)}, b"\0" * 4, "send numbers"),
])
def test_an_npy_header_is_checked_before_the_data(tmp_path, header, data, words):
    from fuzzing import npy

    payload = npy(header, data)
    with pytest.raises(InputError) as err:
        read_npy(payload, what="reading")
    assert words in str(err.value)
    (tmp_path / "bad.npy").write_bytes(payload)  # a file in a watched folder: the same checks
    with pytest.raises(InputError):
        load_raw(tmp_path / "bad.npy")


def test_an_npy_of_the_wrong_size_is_refused_when_the_size_is_known():
    with pytest.raises(InputError, match=r"declares shape \[63\] \(63 values\), expected=64"):
        read_npy(_npy_bytes(np.zeros(63, np.float32)), what="reading", expected_size=64)


def test_a_huge_picture_is_refused_from_its_header(tmp_path):
    from PIL import Image

    Image.new("L", (5000, 4000)).save(tmp_path / "big.png")  # 20 M pixels, a few KB on disk
    with pytest.raises(InputError, match="is 5000 x 4000 pixels, over the limit of 16777216"):
        load_raw(tmp_path / "big.png")


# -- archives -------------------------------------------------------------------------------------------------------

def test_archives_written_by_gnu_tar_and_by_the_packers_unpack(tmp_path):
    shutil.copytree(BUNDLE, tmp_path / "digits-v1")
    (tmp_path / "digits-v1" / "signature.json").write_text("{}")
    for fmt in ("gnu", "posix"):
        subprocess.run(["tar", f"--format={fmt}", "-czf", str(tmp_path / f"{fmt}.tar.gz"), "-C", str(tmp_path),
                        "digits-v1"], check=True)
        into = tmp_path / f"into-{fmt}"
        into.mkdir()
        root = unpack((tmp_path / f"{fmt}.tar.gz").read_bytes(), into, what="a", max_total=1 << 20)
        assert sorted(p.name for p in root.iterdir()) == ["manifest.json", "model.tflite", "signature.json"]
        assert load_bundle(root).manifest.sha256 == load_bundle(BUNDLE).manifest.sha256
    into = tmp_path / "into-pack"
    into.mkdir()
    assert load_bundle(unpack(protocol.pack_bundle(BUNDLE), into, what="a", max_total=1 << 20))


def test_a_whole_convert_output_is_not_a_board_bundle(tmp_path):
    shutil.copytree(BUNDLE, tmp_path / "digits-v1")
    (tmp_path / "digits-v1" / "report").mkdir()
    (tmp_path / "digits-v1" / "report" / "report.md").write_text("# report")
    subprocess.run(["tar", "-czf", str(tmp_path / "all.tar.gz"), "-C", str(tmp_path), "digits-v1"], check=True)
    (tmp_path / "into").mkdir()
    with pytest.raises(BundleError, match="holds a folder 'digits-v1/report' inside the bundle folder"):
        unpack((tmp_path / "all.tar.gz").read_bytes(), tmp_path / "into", what="a", max_total=1 << 20)


def test_a_model_named_other_than_the_manifest_says_is_refused(tmp_path):
    archive = tar_gz([entry("d/manifest.json", craft.manifest_bytes()), entry("d/other.tflite", craft.model_bytes())])
    (tmp_path / "into").mkdir()
    root = unpack(archive, tmp_path / "into", what="a", max_total=1 << 20)
    with pytest.raises(BundleError, match="has no model.tflite"):
        load_bundle(root)


def test_remove_tree_removes_a_tree_deeper_than_python_recurses(tmp_path):
    deep = tmp_path / "deep"
    path = deep
    for _ in range(3000):
        path = path / "a"
    subprocess.run(["mkdir", "-p", str(path)], check=True)
    with pytest.raises(RecursionError):
        shutil.rmtree(deep)  # what pruning did: a RecursionError, which ignore_errors does not cover
    assert remove_tree(deep) and not deep.exists()


# -- the trial run ------------------------------------------------------------------------------------------------

def test_a_good_model_passes_its_trial_run(expected_runtime):
    result = trial_run(BUNDLE / "model.tflite", runtime=expected_runtime)
    assert (result.inputs, result.outputs) == (1, 1) and result.ms > 0


def test_a_crashing_model_names_its_signal(expected_runtime):
    crash = DATA / {"ai_edge_litert": "crash-bundle-litert", "tflite_runtime": "crash-bundle-tflite"}[expected_runtime]
    with pytest.raises(BundleError, match=r"crashed the interpreter in its trial run \(SIGSEGV, signal 11\)"):
        trial_run(crash / "model.tflite", runtime=expected_runtime)


def test_a_trial_run_past_its_time_is_killed(expected_runtime):
    with pytest.raises(TrialTimeout, match="did not finish its trial run within 0.001s"):
        trial_run(BUNDLE / "model.tflite", runtime=expected_runtime, timeout_s=0.001)  # a start alone takes longer


@pytest.mark.parametrize("name", ["", ".", "./", "a/./b", "a//b"])
def test_odd_member_names_are_refused_not_crashed_on(tmp_path, name):
    """Found by test_fuzz: a directory member named "" made the unpacker raise IndexError."""
    (tmp_path / "into").mkdir()
    with pytest.raises(BundleError):
        unpack(tar_gz([entry(name, kind=tarfile.DIRTYPE)]), tmp_path / "into", what="a", max_total=1 << 20)
