"""The rollout's statistics and verdict, on known values (no broker: the figures are what boards would send)."""

from __future__ import annotations

import pytest

from edgekit.errors import EdgekitError
from edgekit.fleet.rollout import RolloutState, Rule, choose_cohort, judge, wilson_bounds

A = "a" * 64


def test_wilson_bounds_match_published_values():
    # Two-sided 95% Wilson intervals as tabulated (Newcombe 1998, Table I; Brown, Cai & DasGupta 2001).
    lo, hi = wilson_bounds(10, 100, 0.95, one_sided=False)
    assert (round(lo, 4), round(hi, 4)) == (0.0552, 0.1744)
    lo, hi = wilson_bounds(0, 10, 0.95, one_sided=False)
    assert lo == pytest.approx(0, abs=1e-12) and round(hi, 4) == 0.2775
    lo, hi = wilson_bounds(81, 263, 0.95, one_sided=False)  # Newcombe's 81/263 example: 0.2553 to 0.3662
    assert (round(lo, 4), round(hi, 4)) == (0.2553, 0.3662)
    # One-sided 95% (z = 1.645): zero events in n gives z^2 / (n + z^2), the "rule of three" region.
    assert wilson_bounds(0, 100)[1] == pytest.approx(1.6448536**2 / (100 + 1.6448536**2), rel=1e-6)
    assert wilson_bounds(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_bounds(5, 3)


def test_the_cohort_is_deterministic_and_sized_as_asked():
    fleet = [f"pi-{i}" for i in range(20)]
    a = choose_cohort(fleet, "3", A)
    assert len(a) == 3 and a == choose_cohort(list(reversed(fleet)), "3", A)  # order does not matter
    assert choose_cohort(fleet, "3", "b" * 64) != a  # another candidate, another cohort
    assert len(choose_cohort(fleet, "10%", A)) == 2 and len(choose_cohort(fleet, "1%", A)) == 1
    assert choose_cohort(fleet, "10%", A) == a[:2]  # a bigger cohort contains the smaller one
    assert sorted(choose_cohort(fleet, "50", A)) == sorted(fleet)  # more than the fleet: the whole fleet
    for bad in ("0", "-1", "x", "0%", "150%"):
        with pytest.raises(EdgekitError, match="not a cohort size"):
            choose_cohort(fleet, bad, A)


def rollout(shadow=True, cohort=("a", "b", "c")):
    return RolloutState(fleet="f", candidate={"name": "digits", "version": "3", "sha256": "c" * 64,
                                              "archive_sha256": A, "path": "/x"},
                        cohort=list(cohort), rest=["d", "e"], shadow=shadow)


def shadow_tele(n, agree, errors=0, p95=1.0, cur=1.0, archive=A):
    return {"model": {"name": "digits", "version": "2", "sha256": "b" * 64},
            "shadow": {"archive_sha256": archive, "inferences": n, "agree": agree, "errors": errors,
                       "latency_ms": {"p50": p95, "p95": p95}, "current_latency_ms": {"p50": cur, "p95": cur},
                       "low_confidence_rate": 0.1, "confidence_mean": 0.9}}


STATUS = {"state": "online"}


def test_a_candidate_that_agrees_is_promoted_only_with_enough_evidence():
    rule = Rule(max_disagreement=0.05, min_inferences=300, min_board_inferences=50)
    st = {d: STATUS for d in "abc"}
    # 2 of 300 disagree: one-sided 95% upper bound 0.0199 <= 0.05
    v = judge(rollout(), st, {"a": shadow_tele(100, 99), "b": shadow_tele(100, 100), "c": shadow_tele(100, 99)}, rule)
    assert v.decision == "promote" and v.figures["disagree"] == 2 and v.figures["inferences"] == 300
    assert v.figures["disagreement_upper"] == pytest.approx(wilson_bounds(2, 300)[1], abs=1e-6)
    # the same rate over too few inferences: wait
    v = judge(rollout(), st, {"a": shadow_tele(60, 60), "b": shadow_tele(60, 59), "c": shadow_tele(60, 60)}, rule)
    assert v.decision == "wait" and "180 of 300 shadow inferences" in v.reasons[-1]
    # 12 of 300 (4%): under the limit, but its upper bound (0.063) is not: wait for more
    v = judge(rollout(), st, {"a": shadow_tele(100, 96), "b": shadow_tele(100, 96), "c": shadow_tele(100, 96)}, rule)
    assert v.decision == "wait" and "upper bound 0.063" in v.reasons[-1]
    # a board still silent: wait
    v = judge(rollout(), {"a": STATUS}, {"a": shadow_tele(400, 400)}, rule)
    assert v.decision == "wait" and "b: silent" in v.reasons[0]


def test_a_candidate_that_disagrees_or_fails_boards_is_aborted():
    rule = Rule()
    st = {d: STATUS for d in "abc"}
    # labels permuted: nearly every answer differs; the lower bound is far above 5%
    v = judge(rollout(), st, {"a": shadow_tele(40, 2), "b": shadow_tele(40, 1), "c": shadow_tele(10, 0)}, rule)
    assert v.decision == "abort" and "Wilson lower bound" in v.reasons[-1]
    # a board dropped the candidate: 1 of 1 tried failed (> 20%)
    failed = {"state": "online", "last_update_archive": A, "last_update_error": "shadow candidate digits v3 dropped"}
    v = judge(rollout(), {"a": failed}, {}, rule)
    assert v.decision == "abort" and "1 of 1 boards tried failed" in v.reasons[0] and "dropped" in v.reasons[0]
    # slower on most boards (3 ms vs 1 ms, floor 1 ms): the median ratio 3.0 is above 1.5
    v = judge(rollout(), st, {"a": shadow_tele(100, 100, p95=3.0), "b": shadow_tele(100, 100, p95=3.0),
                              "c": shadow_tele(100, 100)}, rule)
    assert v.decision == "abort" and "median p95 latency ratio over 3 boards, 3.00" in v.reasons[0]
    # one busy board's stalls are not a slower model: the median is 1.0
    v = judge(rollout(), st, {"a": shadow_tele(100, 100, p95=9.0), "b": shadow_tele(100, 100),
                              "c": shadow_tele(100, 100)}, Rule(min_inferences=300))
    assert v.decision == "promote" and v.figures["latency_ratio_median"] == 1.0
    # sub-millisecond noise: 0.3 ms vs 0.1 ms is 0.3 against the 1 ms floor
    v = judge(rollout(), st, {d: shadow_tele(100, 100, p95=0.3, cur=0.1) for d in "abc"}, rule)
    assert v.decision == "promote" and v.figures["latency_ratio_median"] == 0.3
    # with abort_min=4, one failed board among three tried is not enough to abort, nor to promote
    failed = {"state": "online", "last_update_archive": A, "last_update_error": "dropped"}
    v = judge(rollout(), dict(st, a=failed), {"b": shadow_tele(100, 100), "c": shadow_tele(100, 100)},
              Rule(abort_min=4))
    assert v.decision == "wait"
    # another candidate's figures do not count for this one
    v = judge(rollout(), st, {d: shadow_tele(500, 500, archive="f" * 64) for d in "abc"}, rule)
    assert v.decision == "wait" and v.figures["inferences"] == 0


def test_a_canary_is_promoted_when_every_board_passed_probation_and_aborted_when_boards_went_back():
    cand = {"name": "digits", "version": "3", "sha256": "c" * 64}
    on = {"state": "online", "model": cand}
    passed = {"model": cand, "probation": None, "inferences": 500, "latency_ms": {"p95": 1.0}}
    probation = {"model": cand, "probation": {"inferences": 5, "errors": 0, "elapsed_s": 1.0}}
    r = rollout(shadow=False, cohort=("a", "b"))
    assert judge(r, {"a": on, "b": on}, {"a": passed, "b": passed}, Rule()).decision == "promote"
    v = judge(r, {"a": on, "b": on}, {"a": passed, "b": probation}, Rule())
    assert v.decision == "wait" and "b: running (on probation)" in v.reasons[0]
    back = {"state": "online", "model": {"name": "digits", "version": "2", "sha256": "b" * 64},
            "last_update_archive": A, "last_update_error": "bundle digits v3 failed its probation: ..."}
    v = judge(r, {"a": on, "b": back}, {"a": passed, "b": {}}, Rule())
    assert v.decision == "abort" and "1 of 2 boards tried failed (50% > 20%)" in v.reasons[0]


def test_rule_and_state_refuse_nonsense(tmp_path):
    with pytest.raises(EdgekitError, match="max_disagreement"):
        Rule(max_disagreement=2)
    with pytest.raises(EdgekitError, match="no rollout at"):
        RolloutState.load(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("[1]")
    with pytest.raises(EdgekitError, match="not an edgekit-rollout/1 file"):
        RolloutState.load(tmp_path / "bad.json")
    r = rollout()
    r.note("canary", "test")
    assert RolloutState.load(r.save(tmp_path / "r.json")) == r
