"""`edgekit demo --rollout` over the embedded broker: a simulated fleet of real agents; the label-permuted
candidate is stopped at its shadow canary and never reaches the rest, digits v2 is promoted and committed on
every board."""

from __future__ import annotations

import json

import pytest

from edgekit.cli import main
from edgekit.demo_rollout import RolloutDemoConfig, run_rollout_demo
from edgekit.errors import EdgekitError


def test_a_bad_candidate_stops_at_the_canary_and_a_good_one_reaches_every_board(tmp_path):
    lines = []
    result = run_rollout_demo(RolloutDemoConfig(output=tmp_path / "out", broker="embedded", boards=4, wait_s=90),
                              say=lines.append)
    text = "\n".join(lines)
    assert result.broker == "embedded" and result.devices == ["pi-0", "pi-1", "pi-2", "pi-3"]
    bad = result.bad
    assert bad["decision"] == "aborted" and "disagreement" in bad["why"] and "Wilson lower bound" in bad["why"]
    assert len(bad["cohort"]) == 1 and len(bad["rest"]) == 3
    assert bad["rest_saw_it"] == []  # the rest of the fleet never received the bad candidate
    assert set(bad["running"].values()) == {"1"}  # the cohort ran it as a shadow only; v1 decided throughout
    good = result.good
    assert good["decision"] == "promoted" and "Wilson upper bound" in good["why"]
    assert good["committed"] == {d: "2" for d in result.devices}  # installed and past its probation everywhere
    assert "verdict: ABORT: disagreement" in text and "verdict: PROMOTE: all 2 cohort boards succeeded" in text
    assert "$ edgekit fleet rollout status" in text and "4 of 4 boards run it committed" in text
    assert [ln.split("]")[0] for ln in lines if ln.startswith("[")] == [f"[{i}/5" for i in range(1, 6)]
    history = json.loads((tmp_path / "out" / "rollout-bad.json").read_text())["history"]
    assert [h["action"] for h in history] == ["canary", "abort"]


def test_the_rollout_demo_refuses_what_it_cannot_run(tmp_path, capsys):
    with pytest.raises(EdgekitError, match="pass --bundle DIR"):
        run_rollout_demo(RolloutDemoConfig(output=tmp_path / "out", bundle=tmp_path / "nothing"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(EdgekitError, match="was not made by the demo"):
        run_rollout_demo(RolloutDemoConfig(output=tmp_path / "mine"))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    assert main(["demo", "--candidate", str(tmp_path)]) == 1
    assert "--bundle and --candidate go with --rollout" in capsys.readouterr().err
