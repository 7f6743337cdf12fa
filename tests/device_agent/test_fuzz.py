"""Fuzzing what comes off the network: the bundle, cmd and sensor parsers (hypothesis, bounded).

Each parser must either return a well-formed value or raise the package's own error with one line
(``ProtocolError``, ``BundleError``, ``InputError``): never another exception (a RecursionError, a
MemoryError, a KeyError), never an allocation past the limits, never a file outside its directory.

``EDGEKIT_FUZZ_EXAMPLES`` sets the examples per test (default 300, what CI runs); run with
``--hypothesis-show-statistics`` to see how many each one tried, e.g.::

    EDGEKIT_FUZZ_EXAMPLES=5000 .venv-device/bin/python -m pytest tests/device_agent/test_fuzz.py \\
        --hypothesis-show-statistics
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_agent import limits
from device_agent.config import PolicyConfig
from device_agent.delivery import protocol
from device_agent.errors import BundleError, InputError, ProtocolError
from device_agent.inference.preprocess import preprocess
from device_agent.sampling.policy import Policy
from device_agent.sources import decode_reading
from device_agent.update.archive import unpack
from device_agent.update.manifest import Manifest, load_bundle

import craft
from fuzzing import (BUNDLE_VALUES, CMD_VALUES, DIGITS, EXIF_BLOCKS, MANIFEST, MANIFEST_EDITS, SENSOR_VALUES, edited,
                     nested)

FUZZ = settings(max_examples=int(os.environ.get("EDGEKIT_FUZZ_EXAMPLES", "300")), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


@FUZZ
@given(CMD_VALUES)
def test_fuzz_cmd(payload):
    policy = Policy(PolicyConfig(), confidence_threshold=0.5, margin_threshold=0.1, seen=lambda d: False)
    try:
        cmd = protocol.parse_cmd(payload)
    except ProtocolError as exc:
        assert "\n" not in str(exc)
        return
    assert cmd["cmd"] in protocol.COMMANDS and isinstance(cmd["args"], dict)
    assert limits.json_depth(payload) <= limits.MAX_JSON_DEPTH and len(payload) <= limits.MAX_CMD_BYTES
    if cmd["cmd"] == "set_thresholds":  # what the agent does with it (it turns these into ProtocolError)
        try:
            policy.set_thresholds(cmd["args"].get("confidence"), cmd["args"].get("margin"))
        except (TypeError, ValueError):
            return
        assert 0 <= policy.confidence_threshold <= 1 and 0 <= policy.margin_threshold <= 1


@FUZZ
@given(SENSOR_VALUES, st.booleans())
def test_fuzz_sensor(payload, exact):
    try:
        x = decode_reading(payload, DIGITS.raw_dtype, DIGITS.shape, exact)
    except InputError as exc:
        assert "\n" not in str(exc)
        return
    assert isinstance(x, np.ndarray) and x.size <= limits.MAX_ELEMENTS
    try:
        out = preprocess(x, DIGITS)
    except InputError:
        return
    assert out.shape[:2] == tuple(DIGITS.shape[:2]) and np.all(np.isfinite(out))


def stage_without_interpreter(payload: bytes, into: Path):
    """What Updater.stage does before any interpreter: message checks, archive, manifest, model sha256."""
    meta, archive = protocol.parse_bundle(payload, max_bytes=1 << 20)
    root = unpack(archive, into, what="bundle archive", max_total=8 << 20)
    return load_bundle(root)


@FUZZ
@given(BUNDLE_VALUES)
def test_fuzz_bundle(payload):
    with tempfile.TemporaryDirectory() as tmp:
        into = Path(tmp) / "staging"
        into.mkdir()
        try:
            bundle = stage_without_interpreter(payload, into)
        except (ProtocolError, BundleError) as exc:
            assert "\n" not in str(exc)
        else:
            assert bundle.manifest.sha256 == hashlib.sha256(bundle.model_path.read_bytes()).hexdigest()
        written = [p for p in Path(tmp).rglob("*")]
        assert all(p.is_relative_to(into) for p in written)  # nothing outside the staging directory
        assert all(not p.is_symlink() and len(p.relative_to(into).parts) <= 2 for p in written)
        assert len([p for p in written if p.is_file()]) <= 3


@pytest.mark.filterwarnings("ignore::UserWarning:PIL")  # Pillow's notes on the bad blocks it reads
@FUZZ
@given(EXIF_BLOCKS)
def test_fuzz_picture_exif(block):
    """A camera's picture with a crafted EXIF block decodes upright or is refused in one line."""
    from device_agent.inference.preprocess import decode_image

    data = craft.jpeg_with_exif(block)
    try:
        arr = decode_image(data, "rgb")
    except InputError as exc:
        assert "\n" not in str(exc)
    else:
        assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
        assert sorted(arr.shape[:2]) == [6, 10]  # as stored, or turned a quarter: nothing else


@pytest.mark.parametrize("order", [b"II", b"MM"])
@pytest.mark.parametrize("orientation, shape", [(1, (6, 10)), (3, (6, 10)), (6, (10, 6)), (8, (10, 6)), (9, (6, 10))])
def test_the_exif_block_of_the_fuzzer_turns_pictures(order, orientation, shape):
    """The fuzzer's blocks reach the orientation code: a well-formed one turns the 10 x 6 picture as it says."""
    from device_agent.inference.preprocess import decode_image

    arr = decode_image(craft.jpeg_with_exif(craft.exif_block(order, 1, 0x0112, 3, 1, orientation, b"")), "rgb")
    assert arr.shape == shape + (3,)


@FUZZ
@given(MANIFEST_EDITS)
def test_fuzz_manifest(edits):
    manifest = edited(edits)
    try:
        m = Manifest.from_dict(manifest)
    except BundleError as exc:
        assert "\n" not in str(exc)
        return
    # what was accepted is within every limit the agent relies on
    assert 0 <= m.confidence_threshold <= 1 and 0 <= m.margin_threshold <= 1
    assert np.prod([d for d in m.preprocessing.shape if d > 0] or [1]) <= limits.MAX_ELEMENTS
    assert np.isfinite(m.preprocessing.scale) and m.preprocessing.scale != 0
    assert "/" not in m.model_file and m.model_file not in ("..", ".")


def test_json_depth_agrees_with_the_json_module():
    """The cheap bracket scan measures what json.loads would recurse into (strings do not count)."""
    samples = [b"{}", b"[]", b"[[[]]]", b'{"a": "[[[[[[", "b": [1, [2, {"c": "]]]"}]]}', b'"\\\\"', b'["\\"[[["]',
               json.dumps(MANIFEST).encode(), json.dumps(nested(40)).encode()]
    for s in samples:
        assert limits.json_depth(s) == _depth(json.loads(s)), s


def _layouts(x: np.ndarray):
    """The same picture as a source may hand it over: contiguous, Fortran-ordered, or a strided copy-free view."""
    return st.sampled_from([x, np.asfortranarray(x), np.flip(np.flip(x, 0).copy(), 0), x[:, :, :]])


# What a sensor, a camera or a file may feed the loop: uint8 pictures of the bundle's shape (any values, any memory
# layout: the lookup-table fast path), and everything else (other shapes, dtypes, NaN/inf: the general path).
_SHAPE = tuple(DIGITS.shape)
LOOP_INPUTS = st.lists(st.one_of(
    st.binary(min_size=int(np.prod(_SHAPE)), max_size=int(np.prod(_SHAPE))).map(
        lambda b: np.frombuffer(b, np.uint8).reshape(_SHAPE)).flatmap(_layouts),
    st.tuples(st.integers(1, 12), st.integers(1, 12), st.sampled_from([1, 3])).map(
        lambda s: np.zeros(s, np.uint8)),
    st.sampled_from([np.float32, np.float64, np.int8, np.uint16]).flatmap(
        lambda t: st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=64, max_size=64).map(
            lambda v: np.asarray(v, np.float64).astype(t, casting="unsafe").reshape(_SHAPE))),
), min_size=1, max_size=6)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # casting NaN/inf to integers, as a hostile source does
@settings(FUZZ, max_examples=min(FUZZ.max_examples, 60))
@given(LOOP_INPUTS)
def test_fuzz_the_loop_inputs(make_config, inputs):
    """Every input is classified or counted as refused, the loop goes on; a uint8 picture of the bundle's shape gets
    exactly the label of the general path (preprocess + float input), whatever its memory layout."""
    from device_agent.agent import Agent
    from device_agent.inference.classify import classify
    from device_agent.inference.interpreter import TFLiteModel
    from device_agent.sources import ArraySource

    from conftest import BUNDLE

    bundle = load_bundle(BUNDLE)
    m = bundle.manifest
    with tempfile.TemporaryDirectory() as tmp:
        cfg = make_config("", outbox={"path": f"{tmp}/outbox.sqlite"}, results={"path": f"{tmp}/results.jsonl"})
        with Agent(cfg, source=ArraySource(list(inputs))) as agent:
            stats = agent.run()
        lines = [json.loads(ln) for ln in Path(f"{tmp}/results.jsonl").read_text().splitlines()]
    assert stats.inferences == len(lines)
    assert stats.inferences + stats.errors.get("input", 0) + stats.errors.get("inference", 0) == len(inputs)
    with TFLiteModel.open(bundle.model_path, cfg.runtime.name) as model:
        for line in lines:
            x = inputs[line["source"]["index"]]
            if x.dtype == np.uint8 and x.shape == _SHAPE:
                ref = classify(model(preprocess(np.ascontiguousarray(x), m.preprocessing)), m.labels,
                               m.output_activation)
                assert line["label"] == ref.label


def _contrast(manifest: dict) -> None:
    """Twice the contrast around mid-grey (``raw * 2/255 - 0.5``): a camera whose pictures come out washed out."""
    manifest["version"] = "1-contrast"
    manifest["preprocessing"].update(scale=2 / 255, offset=-0.5)


@pytest.fixture(scope="module")
def contrast_bundle(tmp_path_factory) -> Path:
    """The digits bundle with :func:`_contrast` preprocessing (same model, same sha256). Its 8-bit table clips at
    both ends and maps several bytes to one: neither nothing to do nor a bit flip, so the agent picks
    ``bytes.translate`` for it by itself."""
    from conftest import BUNDLE

    return craft.edited_bundle(tmp_path_factory.mktemp("translate"), _contrast, source=BUNDLE)


def _any_layout(x: np.ndarray):
    """The same picture in every memory layout a source may hand over: C or Fortran order, rows or both axes
    flipped (negative strides), rows and columns swapped in memory, one channel of a wider picture, every other
    pixel of a bigger one."""
    def strided(a):
        big = np.zeros((a.shape[0] * 2 + 1, a.shape[1] * 3, a.shape[2] + 2), np.uint8)
        big[1::2, ::3, 1:-1] = a
        return big[1::2, ::3, 1:-1]

    def channel_of_rgb(a):
        rgb = np.zeros(a.shape[:2] + (3,), np.uint8)
        rgb[:, :, 1:2] = a
        return rgb[:, :, 1:2]

    return st.sampled_from([x, np.asfortranarray(x), np.flip(np.flip(x, 0).copy(), 0),
                            np.flip(np.flip(x, (0, 1)).copy(), (0, 1)),
                            np.ascontiguousarray(x.transpose(1, 0, 2)).transpose(1, 0, 2), channel_of_rgb(x),
                            strided(x)])


_PIXELS = int(np.prod(_SHAPE))
_PICTURES = st.one_of(  # uint8 pictures of the bundle's shape: the translate path
    st.binary(min_size=_PIXELS, max_size=_PIXELS).map(lambda b: np.frombuffer(b, np.uint8).reshape(_SHAPE)),
    st.sampled_from([0, 63, 64, 127, 128, 191, 192, 255]).map(  # where the contrast table clips and steps
        lambda v: np.full(_SHAPE, v, np.uint8)),
).flatmap(_any_layout)
TRANSLATE_INPUTS = st.lists(st.one_of(
    _PICTURES, _PICTURES,  # twice as often as anything else
    # almost such a picture: the same bytes as int8, without the channel axis, three channels, a batch axis,
    # two channels, flat, another size (the general path, or refused in one line)
    _PICTURES.map(lambda x: x.view(np.int8)),
    _PICTURES.map(lambda x: x[:, :, 0]),
    _PICTURES.map(lambda x: np.repeat(x, 3, axis=2)),
    _PICTURES.map(lambda x: x[None]),
    _PICTURES.map(lambda x: np.concatenate([x, x], axis=2)),
    _PICTURES.map(lambda x: x.reshape(-1)),
    st.tuples(st.integers(1, 12), st.integers(1, 12), st.sampled_from([1, 3])).flatmap(
        lambda s: st.binary(min_size=int(np.prod(s)), max_size=int(np.prod(s))).map(
            lambda b: np.frombuffer(b, np.uint8).reshape(s))),
    # the bundle's shape in another dtype, NaN and infinities included
    st.sampled_from([np.float32, np.float64, np.int8, np.uint16, np.int64, np.bool_]).flatmap(
        lambda t: st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=_PIXELS,
                           max_size=_PIXELS).map(
            lambda v: np.asarray(v, np.float64).astype(t, casting="unsafe").reshape(_SHAPE))),
), min_size=1, max_size=8)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # casting NaN/inf to integers, as a hostile source does
@settings(FUZZ, max_examples=min(FUZZ.max_examples, 50))
@given(TRANSLATE_INPUTS)
def test_fuzz_the_translate_lookup_against_the_general_path(make_config, contrast_bundle, inputs):
    """A bundle whose 8-bit table is neither nothing to do nor a bit flip is looked up with bytes.translate; every
    uint8 picture of its shape is classified, with exactly the label and confidence of the general path
    (preprocess + float input), whatever its values and memory layout; anything else is classified the same way or
    counted as refused, and the loop goes on."""
    from device_agent.agent import Agent
    from device_agent.inference.classify import classify
    from device_agent.inference.interpreter import TFLiteModel
    from device_agent.sources import ArraySource

    bundle = load_bundle(contrast_bundle)
    m = bundle.manifest
    with tempfile.TemporaryDirectory() as tmp:
        cfg = make_config("", outbox={"path": f"{tmp}/outbox.sqlite"}, results={"path": f"{tmp}/results.jsonl"})
        cfg = replace(cfg, bundle=replace(cfg.bundle, path=str(contrast_bundle)))
        with Agent(cfg, source=ArraySource(list(inputs))) as agent:
            # the path under test, picked by the agent from the table (a change of that choice fails here)
            assert (agent.manifest.version, agent._lut_kind) == ("1-contrast", "translate")
            stats = agent.run()
        lines = [json.loads(ln) for ln in Path(f"{tmp}/results.jsonl").read_text().splitlines()]
    assert stats.inferences == len(lines)
    assert stats.inferences + stats.errors.get("input", 0) + stats.errors.get("inference", 0) == len(inputs)
    pictures = {i for i, x in enumerate(inputs) if x.dtype == np.uint8 and x.shape == _SHAPE}
    assert pictures <= {line["source"]["index"] for line in lines}  # the lookup refuses no picture
    with TFLiteModel.open(bundle.model_path, cfg.runtime.name) as model:
        for line in lines:
            i = line["source"]["index"]
            ref = classify(model(preprocess(np.ascontiguousarray(inputs[i]), m.preprocessing)), m.labels,
                           m.output_activation)
            assert (line["label"], line["confidence"]) == (ref.label, round(ref.confidence, 6)), \
                (i, inputs[i].dtype, inputs[i].shape, inputs[i].strides)


def _depth(v) -> int:
    return 1 + max([_depth(x) for x in (v.values() if isinstance(v, dict) else v)] or [0]) \
        if isinstance(v, (dict, list)) else 0


_TRICKY = st.text(alphabet='[]{}"\\ a\n', max_size=12)  # strings of what the depth scan must not count
JSON_VALUES = st.recursive(st.none() | st.integers() | _TRICKY,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TRICKY, inner, max_size=3),
                           max_leaves=20)


@given(JSON_VALUES, st.data())
@settings(FUZZ)
def test_fuzz_json_depth_on_whole_and_cut_off_json(value, data):
    """Whatever a board or a client sends: for whole JSON the depth scan gives exactly what json.loads recurses
    into; cut off anywhere (an unterminated string, say), never more than the whole had, never more than it opens."""
    text = json.dumps(value).encode()
    assert limits.json_depth(text) == _depth(value)
    cut = text[:data.draw(st.integers(0, len(text)))]
    assert limits.json_depth(cut) <= min(_depth(value), cut.count(b"[") + cut.count(b"{"))
