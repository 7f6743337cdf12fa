"""The agent offline (no broker): predictions match the plain interpreter path; samples wait in the outbox."""

from __future__ import annotations

import json

import numpy as np

from device_agent.agent import Agent
from device_agent.inference.classify import classify
from device_agent.inference.interpreter import TFLiteModel
from device_agent.update.manifest import load_bundle
from device_agent.inference.preprocess import preprocess
from device_agent.sources import ArraySource

from conftest import BUNDLE


def test_predictions_match_the_reference_path_and_accuracy_holds(make_config, digits, tmp_path, expected_runtime):
    x, y = digits
    bundle = load_bundle(BUNDLE)
    m = bundle.manifest
    with TFLiteModel.open(bundle.model_path, expected_runtime) as model:
        ref = [classify(model(preprocess(xi, m.preprocessing)), m.labels, m.output_activation) for xi in x]
    # The agent takes a lookup-table shortcut for uint8 images; 2-D images go the general way.
    inputs = list(x) + [xi[:, :, 0] for xi in x[:20]]
    with Agent(make_config(""), source=ArraySource(inputs)) as agent:
        stats = agent.run()
        waiting = [json.loads(r.payload)["seq"] for r in agent.outbox.pending(limit=1000)]
    assert stats.runtime == expected_runtime and stats.inferences == len(inputs)
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    got = [(line["label"], line["confidence"]) for line in lines]
    want = [(p.label, round(p.confidence, 6)) for p in ref] + [(p.label, round(p.confidence, 6)) for p in ref[:20]]
    assert got == want
    accuracy = np.mean([line["label"] == str(t) for line, t in zip(lines, y)])
    assert accuracy > 0.9
    # Offline: what was flagged waits in the outbox, in order, for the next start with a broker.
    assert stats.pending == stats.flagged > 0 and stats.published == 0
    assert waiting == list(range(stats.flagged))
