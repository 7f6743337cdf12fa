"""The confidence policy alone (unit tests: a Prediction in, a decision out)."""

from __future__ import annotations

import numpy as np

from device_agent.inference.classify import classify
from device_agent.config import PolicyConfig
from device_agent.sampling.policy import Policy

LABELS = [str(i) for i in range(3)]


def pred(*p):
    return classify(np.array(p, dtype=np.float32), LABELS)


def policy(**kw):
    seen = kw.pop("seen", None)
    return Policy(PolicyConfig(**kw), confidence_threshold=0.6, margin_threshold=0.2, seen=seen)


def test_thresholds_flag_low_confidence_and_low_margin():
    p = policy()
    assert p.decide(pred(0.9, 0.05, 0.05), "a", 0).flagged is False
    d = p.decide(pred(0.5, 0.4, 0.1), "b", 0)
    assert d.flagged and d.reasons == ("low_confidence", "low_margin")
    d = policy(margin_threshold=0.5).decide(pred(0.7, 0.3, 0.0), "c", 0)
    assert d.reasons == ("low_margin",)


def test_config_overrides_the_manifest_thresholds():
    p = policy(confidence_threshold=1.0, margin_threshold=0.0)
    assert p.decide(pred(0.99, 0.01, 0.0), "a", 0).reasons == ("low_confidence",)


def test_random_fraction_is_seeded_and_near_its_rate():
    p1, p2 = policy(random_fraction=0.1, seed=7), policy(random_fraction=0.1, seed=7)
    d1 = [p1.decide(pred(1, 0, 0), str(i), 0).flagged for i in range(2000)]
    d2 = [p2.decide(pred(1, 0, 0), str(i), 0).flagged for i in range(2000)]
    assert d1 == d2
    assert 150 < sum(d1) < 250


def test_rate_limits_per_minute_and_per_class():
    p = policy(max_per_minute=3)
    flags = [p.decide(pred(0.4, 0.3, 0.3), str(i), 100.0 + i).flagged for i in range(5)]
    assert flags == [True, True, True, False, False]
    assert p.skipped["rate_limited"] == 2
    assert p.decide(pred(0.4, 0.3, 0.3), "late", 161.0).flagged  # the first one left the window

    p = policy(max_per_class_per_hour=2)
    flags = [p.decide(pred(0.4, 0.3, 0.3), f"a{i}", i).flagged for i in range(3)]
    assert flags == [True, True, False]
    assert p.decide(pred(0.3, 0.4, 0.3), "other-class", 3).flagged


def test_identical_inputs_already_sent_are_skipped():
    sent = {"dup"}
    p = policy(seen=sent.__contains__)
    d = p.decide(pred(0.4, 0.3, 0.3), "dup", 0)
    assert not d.flagged and d.skipped == "duplicate"
    assert p.decide(pred(0.4, 0.3, 0.3), "new", 0).flagged
    assert policy(seen=sent.__contains__, dedupe=False).decide(pred(0.4, 0.3, 0.3), "dup", 0).flagged
