"""The collector's shortcuts answer exactly what the general code does: the input check without numpy
(validate._input_bytes against protocol.decode_input) and the remembered JSON of short lists (store._row)."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from collecting import sample
from device_agent.delivery import protocol
from device_agent.delivery.schemas import DTYPES
from edgekit.loop import validate
from edgekit.loop.store import base

TOPIC = protocol.topic("lab", "pi-1", "samples")
GOOD = base64.b64encode(bytes(range(64))).decode()


def _inputs():
    for dtype in DTYPES:
        size = np.dtype(dtype).itemsize
        yield {"dtype": dtype, "shape": [64 // size], "encoding": "base64", "data": GOOD}  # valid
        yield {"dtype": dtype, "shape": [64 // size + 1], "encoding": "base64", "data": GOOD}  # size mismatch
    for data in (GOOD[:-3], "!!!!" + GOOD[4:], GOOD + "\n", GOOD[:-4] + "é" * 4, "", "@@=="):
        yield {"dtype": "uint8", "shape": [64], "encoding": "base64", "data": data}
    for shape in ([8.0, 8], [8, 8.0], [True, 64], [64, True], [], [0], [8, 8, 1, 1]):
        yield {"dtype": "uint8", "shape": shape, "encoding": "base64", "data": GOOD}
    yield {"dtype": "uint8", "shape": [64], "data": GOOD}  # no encoding: base64 is the default
    yield {"dtype": "uint8", "shape": [64], "encoding": "hex", "data": GOOD}
    yield {"dtype": "complex64", "shape": [8], "encoding": "base64", "data": GOOD}
    yield {"dtype": 8, "shape": [64], "encoding": "base64", "data": GOOD}
    yield {"dtype": "uint8", "shape": [64], "encoding": "base64", "data": GOOD.encode()}


@pytest.mark.parametrize("inp", list(_inputs()), ids=lambda i: json.dumps(i, default=str)[:60])
def test_the_input_check_without_numpy_agrees_with_the_protocol(inp):
    try:
        expected = protocol.decode_input(inp)[0]
    except protocol.ProtocolError as exc:
        with pytest.raises(validate.Malformed) as bad:
            validate._input_bytes(dict(inp))
        assert (bad.value.reason, bad.value.detail) == ("bad_input", str(exc))
    else:
        assert validate._input_bytes(dict(inp)) == expected


def test_a_sample_stores_the_same_columns_as_the_general_encoding():
    payload = sample(3)
    payload["input"]["shape"] = [8.0, 8, 1]  # an integer written as a float is valid; it keeps its own text
    for reasons in (["low_confidence"], ["low_margin", "random"], ["low_confidence"]):
        payload["reasons"] = reasons
        _, obj = validate.check_message(TOPIC, json.dumps(payload).encode(), decode_input=True)
        row = base._row(obj, 1.0)
        assert row[14] == json.dumps(reasons) and row[16] == json.dumps(payload["source"])
        assert row[18] == "[8.0, 8, 1]" and row[19] == protocol.decode_input(payload["input"])[0]
        payload["input"]["shape"] = [8, 8, 1]
        assert base._row(validate.check_message(TOPIC, json.dumps(payload).encode(), decode_input=True)[1],
                         1.0)[18] == "[8, 8, 1]"
        payload["input"]["shape"] = [8.0, 8, 1]
    assert base._json_list([True, 1]) == "[true, 1]" and base._json_list([1, 1]) == "[1, 1]"
    assert base._json_list(()) == "[]" and base._row(dict(obj, source={}), 1.0)[16] == "{}"


def test_a_batch_of_pubacks_is_the_bytes_paho_sends_one_by_one():
    import paho.mqtt.client as mqtt

    from edgekit.loop.collect_write import puback

    mids = [1, 2, 255, 256, 4097, 65535]
    sent, packets = [], []
    for ack in (lambda c: [c.ack(mid, 1) for mid in mids], lambda c: puback(c, mids), lambda c: puback(c, mids[:1])):
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, manual_ack=True)
        ack(client)  # not connected: paho keeps the packets queued
        sent.append(b"".join(bytes(p["packet"]) for p in client._out_packet))
        packets.append(len(client._out_packet))
    assert sent[0] == sent[1] and sent[2] == sent[0][:4] and len(sent[0]) == 4 * len(mids)
    # the paho installed here is one whose private queue was checked: the batch really goes out as one write
    assert packets == [len(mids), 1, 1]
