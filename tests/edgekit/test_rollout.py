"""A canary rollout end to end: real Mosquitto, four real agents (real interpreters, threads of one process)
classifying digits, the real CLI. A candidate whose labels are permuted is stopped at its shadow cohort; a
retrained model (digits v2, another seed) is promoted to the whole fleet and installed there."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from edgekit.cli import main

from fleetsim import BUNDLE, V2, Fleet

WAIT = 60


def wait_for(predicate, timeout: float) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def permuted(tmp_path: Path) -> Path:
    """v1 with its labels shifted by one: the same model file and latency, every answer another digit's name."""
    out = tmp_path / "permuted"
    shutil.copytree(BUNDLE, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["version"] = "1-permuted"
    manifest["labels"] = manifest["labels"][1:] + manifest["labels"][:1]
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def retained_bundles(port: int) -> dict:
    out = subprocess.run(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-t", "edgekit/v1/lab/+/bundle", "-v",
                          "--retained-only", "-W", "2"], capture_output=True, text=True, timeout=20)
    return {line.split(" ", 1)[0].split("/")[3]: json.loads(line.split(" ", 1)[1])
            for line in out.stdout.splitlines() if " " in line}


def test_a_disagreeing_candidate_is_stopped_at_the_canary_and_a_good_one_promoted(broker, tmp_path, capsys):
    fleet = Fleet(broker.url, tmp_path / "boards", 4)
    devices = [a for d in fleet.devices for a in ("--device", d)]
    state = tmp_path / "rollout.json"
    status = ["fleet", "rollout", "status", "--broker", broker.url, "--state", str(state), "--auto",
              "--until-decided", str(WAIT), "--min-inferences", "200", "--min-board-inferences", "50",
              "--max-disagreement", "0.15"]
    try:
        assert wait_for(lambda: all(a.stats.inferences >= 5 for a in fleet.agents.values()), WAIT)

        # 1. labels permuted: shadow on a cohort of 2, aborted by the disagreement bound
        bad = permuted(tmp_path)
        assert main(["fleet", "push", str(bad), "--broker", broker.url, "--fleet", "lab", *devices, "--canary", "2",
                     "--shadow", "--allow-unsigned", "--state", str(state)]) == 0
        rollout = json.loads(state.read_text())
        cohort, rest = rollout["cohort"], rollout["rest"]
        assert len(cohort) == 2 and sorted(cohort + rest) == fleet.devices and rollout["shadow"]
        capsys.readouterr()
        assert main(status) == 0
        out = capsys.readouterr().out
        assert "verdict: ABORT: disagreement" in out and "Wilson lower bound" in out, out
        assert "ABORT: cleared the shadow candidate from 2 cohort boards" in out, out
        assert json.loads(state.read_text())["phase"] == "aborted"
        assert wait_for(lambda: all(fleet.agents[d].shadow is None for d in cohort), WAIT), "shadow runs go on"
        assert retained_bundles(broker.port) == {}  # nothing left for a board that restarts
        assert all(fleet.running(d) == "1" for d in fleet.devices)
        assert all(not (tmp_path / "boards" / d / "bundles").exists() for d in rest)  # the rest never saw it

        # 2. a retrained model: shadow on half the fleet, promoted, installed everywhere
        assert main(["fleet", "push", str(V2), "--broker", broker.url, "--fleet", "lab", *devices, "--canary", "50%",
                     "--shadow", "--allow-unsigned", "--state", str(state)]) == 0
        capsys.readouterr()
        assert main(status) == 0
        out = capsys.readouterr().out
        assert "verdict: PROMOTE: all 2 cohort boards succeeded" in out, out
        assert "PROMOTE: digits v2 to 4 boards" in out, out
        assert set(retained_bundles(broker.port)) == set(fleet.devices)
        assert wait_for(lambda: all(fleet.agents[d].updater.state.current is not None
                                    and fleet.agents[d].updater.state.current.committed for d in fleet.devices), WAIT)
        assert all(fleet.running(d) == "2" for d in fleet.devices)
        history = json.loads(state.read_text())["history"]
        assert [h["action"] for h in history] == ["canary", "promote"] and "Wilson upper bound" in history[-1]["why"]

        # a promoted rollout is over: promote/abort again say so
        capsys.readouterr()
        assert main(["fleet", "rollout", "abort", "--broker", broker.url, "--state", str(state)]) == 1
        assert "already promoted" in capsys.readouterr().err
    finally:
        fleet.close()


def test_a_canary_whose_probation_fails_is_aborted_and_the_previous_bundle_pushed_back(broker, tmp_path, capsys):
    # Boards whose latency cap no model meets: every swapped-in bundle fails its probation and is taken back.
    fleet = Fleet(broker.url, tmp_path / "boards", 3, probation_latency_ms=1e-6)
    devices = [a for d in fleet.devices for a in ("--device", d)]
    state = tmp_path / "rollout.json"
    try:
        assert wait_for(lambda: all(a.stats.inferences >= 5 for a in fleet.agents.values()), WAIT)
        assert main(["fleet", "push", str(V2), "--broker", broker.url, "--fleet", "lab", *devices, "--canary", "1",
                     "--previous", str(BUNDLE), "--allow-unsigned", "--state", str(state)]) == 0
        (board,) = json.loads(state.read_text())["cohort"]
        capsys.readouterr()  # a second canary while this one runs is refused: its state would be lost
        assert main(["fleet", "push", str(V2), "--broker", broker.url, "--fleet", "lab", *devices, "--canary", "1",
                     "--allow-unsigned", "--state", str(state)]) == 1
        assert "is still in its canary" in capsys.readouterr().err
        capsys.readouterr()
        assert main(["fleet", "rollout", "status", "--broker", broker.url, "--state", str(state), "--auto",
                     "--until-decided", str(WAIT)]) == 0
        out = capsys.readouterr().out
        assert "verdict: ABORT: 1 of 1 boards tried failed (100% > 20%)" in out and "failed its probation" in out, out
        assert f"ABORT: pushed the previous bundle {BUNDLE}" in out, out
        assert fleet.agents[board].rollbacks == 1 and fleet.running(board) == "1"
        v2_archive = json.loads(state.read_text())["candidate"]["archive_sha256"]
        assert fleet.agents[board].updater.state.refusal(v2_archive) is not None
        retained = retained_bundles(broker.port)
        assert list(retained) == [board] and retained[board]["version"] == "1"  # what a restart gets: v1
        assert all(fleet.running(d) == "1" and fleet.agents[d].rollbacks == 0 for d in fleet.devices if d != board)
    finally:
        fleet.close()
