"""Both models on labelled samples: the exact McNemar test against values worked by hand and published, the rule
that uses it, and `edgekit fleet rollout status --store` on a real SQLite store of labelled real digits with the
real bundles (v1 current; a label-permuted candidate is aborted by McNemar, digits v2 is not)."""

from __future__ import annotations

import csv
import json
import math

import pytest

from collecting import sample
from device_agent.delivery import protocol
from edgekit.cli import main
from edgekit.fleet.labelled import Labelled, binomial_tail, mcnemar_exact
from edgekit.fleet.rollout import Rule, RolloutState, judge
from edgekit.loop.store import open_store
from fleetsim import BUNDLE, V2
from labeling import DIGITS
from test_rollout import permuted


def test_binomial_tail_and_mcnemar_against_hand_and_published_values():
    # P(X >= 15), X ~ Bin(20, 1/2) = (C(20,15)+...+C(20,20)) / 2^20 = (15504+4845+1140+190+20+1) / 1048576
    assert binomial_tail(15, 20) == 21700 / 1048576
    assert binomial_tail(0, 7) == 1.0 and binomial_tail(8, 7) == 0.0 and binomial_tail(7, 7) == 1 / 128
    # b=9, c=1: P(X >= 9 | n=10) = (10 + 1) / 1024; two-sided twice that
    worse, two = mcnemar_exact(9, 1)
    assert worse == pytest.approx(11 / 1024) and two == pytest.approx(22 / 1024)
    # Fagerland, Lydersen & Laake (2013), BMC Med Res Methodol 13:91, airway hyper-responsiveness example:
    # b = 1, c = 7: exact conditional McNemar p = 0.070 (two-sided)
    worse, two = mcnemar_exact(1, 7)
    assert round(two, 3) == 0.070 and two == pytest.approx(18 / 256)
    assert worse == pytest.approx(1 - 1 / 256)  # the candidate being right more often is no sign it is worse
    # no discordant pair: nothing to see; equal counts: p_worse above 1/2
    assert mcnemar_exact(0, 0) == (1.0, 1.0)
    assert mcnemar_exact(30, 30)[0] > 0.5 and mcnemar_exact(30, 30)[1] == 1.0
    # large n stays exact and finite: 600 vs 400 is far beyond chance
    assert 0 < mcnemar_exact(600, 400)[0] < 1e-9 and math.isfinite(mcnemar_exact(5000, 5000)[0])
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 3)


def _rollout(shadow=False):
    return RolloutState(fleet="lab", candidate={"name": "d", "version": "2", "sha256": "s", "archive_sha256": "a"},
                        cohort=["pi-0"], rest=["pi-1"], shadow=shadow, canary="1", started=1.0)


def _lab(b, c, n=100):
    worse, two = mcnemar_exact(b, c)
    return Labelled("the cohort's boards since the rollout started", n, 90, 90 - b + c, b, c, worse, two, 0, "v1", "v2")


def test_the_rule_aborts_on_mcnemar_only_with_enough_labelled_samples():
    good_board = ({"pi-0": {"model": {"name": "d", "version": "2", "sha256": "s"}}},
                  {"pi-0": {"model": {"name": "d", "version": "2", "sha256": "s"}, "inferences": 500}})
    rule = Rule(min_labelled=30, mcnemar_alpha=0.05)
    v = judge(_rollout(), *good_board, rule, _lab(12, 2))  # p(12 of 14 against) = 0.0065
    assert v.decision == "abort" and "worse on labelled samples" in v.reasons[0] and "McNemar" in v.reasons[0]
    assert v.figures["labelled"]["b"] == 12 and v.figures["labelled"]["candidate_accuracy"] == 0.8
    v = judge(_rollout(), *good_board, rule, _lab(6, 2))  # p = 0.145: not significant, promoted, and says so
    assert v.decision == "promote" and any("accuracy v1 0.900, candidate v2 0.860" in r for r in v.reasons), v.reasons
    v = judge(_rollout(), *good_board, rule, _lab(12, 2, n=20))  # too few labelled samples: not judged
    assert v.decision == "promote" and any("not judged" in r for r in v.reasons)
    assert judge(_rollout(), *good_board, rule).decision == "promote"  # no store: as before
    assert judge(_rollout(), *good_board, Rule(mcnemar_alpha=0.001), _lab(12, 2)).decision == "promote"


N = 80


def _store(tmp_path, cohort):
    """N real digits flagged by the cohort's boards, labelled with their true class through `edgekit samples label`."""
    url = f"sqlite:///{tmp_path / 'samples.db'}"
    rows = []
    with open_store(url) as store:
        for i in range(N):
            p = sample(i, device=cohort[i % len(cohort)], raw=DIGITS["x"][i])
            store.put_sample(p, "t")
            rows.append((p["sample_id"], str(int(DIGITS["y"][i]))))
    path = tmp_path / "labels.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    assert main(["samples", "label", "--store", url, "--csv", str(path)]) == 0
    return url


@pytest.mark.parametrize("candidate, verdict", [("permuted", "abort"), ("v2", "wait")])
def test_status_with_a_store_aborts_a_candidate_worse_on_labelled_samples(broker, tmp_path, capsys, candidate,
                                                                           verdict):
    cand = permuted(tmp_path) if candidate == "permuted" else V2
    state = tmp_path / "rollout.json"
    assert main(["fleet", "push", str(cand), "--broker", broker.url, "--fleet", "lab", "--device", "pi-0", "--device",
                 "pi-1", "--device", "pi-2", "--canary", "2", "--previous", str(BUNDLE), "--allow-unsigned",
                 "--state", str(state)]) == 0
    cohort = json.loads(state.read_text())["cohort"]
    url = _store(tmp_path, cohort)
    capsys.readouterr()
    assert main(["fleet", "rollout", "status", "--broker", broker.url, "--state", str(state), "--wait", "1",
                 "--store", url, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    lab = out["figures"]["labelled"]
    assert out["decision"] == verdict, out["reasons"]
    assert lab["n"] == N and lab["samples"] == "the cohort's boards since the rollout started"
    assert lab["current_accuracy"] > 0.85  # v1 on real digits through the board's preprocessing and interpreter
    if candidate == "permuted":
        assert lab["candidate_accuracy"] < 0.2 and lab["p_worse"] < 1e-6
        assert "worse on labelled samples" in out["reasons"][0]
        capsys.readouterr()
        assert main(["fleet", "rollout", "status", "--broker", broker.url, "--state", str(state), "--wait", "1",
                     "--store", url, "--auto"]) == 0
        text = capsys.readouterr().out
        assert "exact McNemar p (candidate worse)" in text and f"ABORT: pushed the previous bundle {BUNDLE}" in text
        assert json.loads(state.read_text())["phase"] == "aborted"
    else:
        assert lab["candidate_accuracy"] > 0.85 and lab["p_worse"] > 0.05
        assert not any("worse on labelled" in r for r in out["reasons"])


def test_fewer_labelled_samples_from_the_cohort_than_the_minimum_uses_all_and_says_so(broker, tmp_path, capsys):
    state = tmp_path / "rollout.json"
    assert main(["fleet", "push", str(V2), "--broker", broker.url, "--fleet", "lab", "--device", "pi-0", "--canary",
                 "1", "--shadow", "--allow-unsigned", "--state", str(state)]) == 0
    url = _store(tmp_path, ["pi-0"])
    capsys.readouterr()  # a shadow push recorded no --previous: the status names what it needs
    assert main(["fleet", "rollout", "status", "--broker", broker.url, "--state", str(state), "--wait", "1",
                 "--store", url]) == 1
    assert "needs the bundle the boards run now" in capsys.readouterr().err
    s = RolloutState.load(state)
    s.started = protocol.now() + 3600  # every sample predates the rollout
    s.save(state)
    assert main(["fleet", "rollout", "status", "--broker", broker.url, "--state", str(state), "--wait", "1",
                 "--store", url, "--previous", str(BUNDLE), "--json"]) == 0
    lab = json.loads(capsys.readouterr().out)["figures"]["labelled"]
    assert lab["n"] == N and lab["samples"].startswith("all labelled samples of fleet lab: the cohort sent 0")
