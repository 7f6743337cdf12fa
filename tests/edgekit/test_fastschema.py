"""The compiled schema check gives jsonschema's verdict on valid payloads and on thousands of broken ones."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from collecting import sample, telemetry
from device_agent.delivery import protocol
from edgekit.loop.fastschema import Unsupported, compile_schema

_VALUES = [None, True, False, 0, 1, -1, 1.5, 2.0, float("nan"), "", "x", "online", "low_confidence", "edgekit.sample/1",
           "3f1d2c4e-8a7b-4c1d-9e2f-0a1b2c3d4e5f", "ab" * 32, "bad name!", [], [1], ["random"], {}, {"a": 1},
           [{"label": "1", "index": 1, "score": 0.5}], {"depth": 1, "bytes": 2, "dropped": -1}, "uint8", [8, 8, 1],
           [0], 10**20]


_BUNDLE = Path(__file__).resolve().parents[1] / "device_agent" / "data" / "digits-bundle"


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _mutate(obj, rng):
    obj = copy.deepcopy(obj)
    path = rng.choice([p for p in _paths(obj) if p])
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    action = rng.random()
    if action < 0.2 and isinstance(parent, dict):
        del parent[path[-1]]
    elif action < 0.3 and isinstance(parent, dict):
        parent["extra_" + str(rng.randint(0, 3))] = rng.choice(_VALUES)
    else:
        parent[path[-1]] = copy.deepcopy(rng.choice(_VALUES))
    return obj


def _bases():
    return {
        "edgekit.sample/1": sample(3, raw=np.zeros((2, 2, 1), np.uint8)),
        "edgekit.telemetry/1": dict(telemetry(), errors={"input": 2}, latency_ms={"p50": 0.1, "p95": None}),
        "edgekit.status/1": protocol.status_payload(device="d", fleet="f", state="online", model={"name": "m"}),
        "edgekit.prediction/1": protocol.prediction_payload(device="d", seq=1, label="3", confidence=0.5),
        "edgekit.cmd/1": {"schema": "edgekit.cmd/1", "cmd": "ping", "args": {}, "id": "1"},
        "edgekit.bundle/1": protocol.bundle_payload(_BUNDLE),
        "edgekit.ack/1": protocol.ack_payload(["3f1d2c4e-8a7b-4c1d-9e2f-0a1b2c3d4e5f"],
                                              ["6a2f0d91-7c3e-4b58-9f10-2e4d6c8a0b1c"], ts=1.5),
    }


@pytest.mark.parametrize("name", sorted(protocol.SCHEMAS))
def test_same_verdict_as_jsonschema(name):
    fast = compile_schema(protocol.SCHEMAS[name])
    ref = jsonschema.Draft202012Validator(protocol.SCHEMAS[name])
    rng = random.Random(name)
    base = _bases()[name]
    assert fast(base) and ref.is_valid(base)
    verdicts = {True: 0, False: 0}
    for _ in range(3000):
        obj = base
        for _ in range(rng.randint(1, 3)):
            obj = _mutate(obj, rng)
        expected = ref.is_valid(obj)
        assert fast(obj) == expected, obj
        verdicts[expected] += 1
    assert verdicts[False] > 500 and verdicts[True] > 50  # both kinds really exercised
    for other in (None, [], "x", 1, {}):
        assert fast(other) == ref.is_valid(other)


def test_an_unknown_keyword_is_refused_not_ignored():
    with pytest.raises(Unsupported, match="oneOf"):
        compile_schema({"type": "object", "properties": {"a": {"oneOf": [{"type": "string"}]}}})
