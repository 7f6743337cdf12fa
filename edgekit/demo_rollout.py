"""``edgekit demo --rollout``: a canary rollout on a simulated fleet, in about a minute (docs/demo.md).

find or start a broker (as ``edgekit demo``) -> a fleet of real agents (threads of this process, real
interpreters, edgekit.fleet.sim) running bundle v1 on real digits -> a bad candidate (v1 with its labels
permuted: same model file, same latency, every answer another digit's name) pushed as a shadow canary, judged by
``edgekit fleet rollout status --auto`` and stopped at the canary, the rest of the fleet never seeing it -> a good
candidate (digits v2, retrained) pushed the same way, promoted, installed and committed on every board.

Each step runs the CLI a user would type; the demo prints the command and what it answered. Everything lands
in one directory (default ``./demo-rollout-out``), replaced on each run.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from .errors import EdgekitError

__all__ = ["RolloutDemoConfig", "RolloutDemoResult", "run_rollout_demo", "DATA"]

DATA = Path(__file__).resolve().parents[1] / "tests" / "device_agent" / "data"
"""Where a checkout keeps the digits bundles the demo defaults to (v1 and v2)."""
MARKER = ".edgekit-demo"


@dataclass(frozen=True)
class RolloutDemoConfig:
    output: Path = Path("demo-rollout-out")
    broker: str = "auto"  # auto | local | mosquitto | embedded
    boards: int = 6
    bundle: Optional[Path] = None  # what the fleet runs; default DATA/digits-bundle
    candidate: Optional[Path] = None  # the good candidate; default DATA/digits-bundle-v2
    fleet: str = "demo-rollout"
    wait_s: float = 120.0  # at most this long for each verdict and for the fleet to install the good candidate

    def __post_init__(self) -> None:
        object.__setattr__(self, "output", Path(self.output))
        if not 2 <= self.boards <= 100:
            raise EdgekitError(f"boards={self.boards}: give 2 to 100 (a cohort and the rest of the fleet)")


@dataclass
class RolloutDemoResult:
    output: Path
    broker: str
    devices: List[str]
    bad: Dict[str, Any] = field(default_factory=dict)  # decision, cohort, rest, rest_saw_it, running
    good: Dict[str, Any] = field(default_factory=dict)  # decision, cohort, committed {device: version}
    seconds: float = 0.0


def _prepare(out: Path) -> None:
    if out.exists():
        if not out.is_dir() or not ((out / MARKER).exists() or not any(out.iterdir())):
            raise EdgekitError(f"{out} exists and was not made by the demo; remove it or pass another --output")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("made by `edgekit demo --rollout`; replaced on each run\n", encoding="utf-8")


def _bundle(given: Optional[Path], name: str, flag: str) -> Path:
    path = Path(given) if given is not None else DATA / name
    if not (path / "manifest.json").is_file():
        raise EdgekitError(f"bundle {path} not found; run from an edgekit checkout or pass {flag} DIR (for example "
                           "demo-out/bundle-v1 and demo-out/bundle-v2 after `edgekit demo`)")
    return path


def _digits() -> np.ndarray:
    """The 1,797 scikit-learn digits as the boards' cameras give them: 8x8 grayscale uint8."""
    from sklearn.datasets import load_digits

    return np.round(load_digits().images * (255.0 / 16.0)).astype(np.uint8)[..., None]


def permute_labels(bundle: Path, out: Path) -> Path:
    """A copy of ``bundle`` with its labels shifted by one: the same model and latency, every answer wrong."""
    shutil.copytree(bundle, out)
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    manifest["version"] = f"{manifest['version']}-permuted"
    manifest["labels"] = manifest["labels"][1:] + manifest["labels"][:1]
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return out


def _cli(argv: List[str], say: Callable[[str], None], show: Callable[[str], bool] = lambda line: True) -> int:
    """Run ``edgekit ARGV`` in this process; print the command and the lines ``show`` keeps."""
    from .cli import main

    say("      $ edgekit " + " ".join(a if " " not in a else repr(a) for a in argv))
    buf, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(err):
        rc = main(argv)
    for line in (buf.getvalue() + err.getvalue()).splitlines():
        if show(line):
            say("        " + line)
    return rc


def _wait(check: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.1)
    return check()


def run_rollout_demo(config: RolloutDemoConfig = RolloutDemoConfig(),
                     say: Callable[[str], None] = print) -> RolloutDemoResult:
    """Run the rollout demo; ``say`` gets the progress lines."""
    from .broker import find_or_start_broker
    from .fleet.sim import Fleet

    t_start = time.perf_counter()
    c = config
    v1 = _bundle(c.bundle, "digits-bundle", "--bundle")
    v2 = _bundle(c.candidate, "digits-bundle-v2", "--candidate")
    out = c.output
    _prepare(out)
    total = 5
    step = iter(range(1, total + 1))

    def head(text: str) -> None:
        say(f"[{next(step)}/{total}] {text}")

    head("find an MQTT broker")
    broker = find_or_start_broker(out, prefer=c.broker)
    say(f"      {broker.description} ({broker.url}, MQTT {broker.protocol})")
    b = ["--broker", broker.url, "--protocol", broker.protocol]
    fleet = None
    try:
        head(f"start a fleet of {c.boards} boards on {v1.name}: real agents and interpreters, threads of this process")
        from .fleet.push import push_bundle

        # a bundle left retained on these topics by an interrupted earlier run must not reach the boards
        push_bundle(b"", broker_url=broker.url, fleet=c.fleet, devices=[f"pi-{i}" for i in range(c.boards)],
                    protocol_version=broker.protocol)
        fleet = Fleet(broker.url, out / "boards", c.boards, bundle=v1, x=_digits(), fleet=c.fleet,
                      protocol=broker.protocol, period_s=0.01)
        devices = fleet.devices
        if not _wait(lambda: all(a.stats.inferences >= 20 for a in fleet.agents.values()), c.wait_s):
            raise EdgekitError(f"the simulated boards did not start classifying within {c.wait_s:g} s; see the log")
        say(f"      {', '.join(devices)} classify digits with v{fleet.running(devices[0])}")
        targets = [a for d in devices for a in ("--device", d)]
        rule = ["--min-inferences", "200", "--min-board-inferences", "50", "--max-disagreement", "0.15",
                "--max-latency-ratio", "3"]
        verdict_lines = lambda line: line.startswith(("verdict:", "PROMOTE:", "ABORT:", "cohort:", "canary cohort",
                                                                "rollout state"))  # noqa: E731

        # the bad candidate: a shadow canary on a third of the fleet, stopped there
        bad = permute_labels(v1, out / "candidate-permuted")
        state = out / "rollout-bad.json"
        head(f"push a bad candidate ({bad.name}: v1 with its labels permuted) as a shadow canary to a third of the "
             "fleet, and let the rule decide")
        canary = f"{max(1, c.boards // 3)}"
        if _cli(["fleet", "push", str(bad), *b, "--fleet", c.fleet, *targets, "--canary", canary, "--shadow",
                 "--allow-unsigned", "--state", str(state)], say, verdict_lines) != 0:
            raise EdgekitError("the canary push of the bad candidate failed; see above")
        _cli(["fleet", "rollout", "status", *b, "--state", str(state), "--auto", "--until-decided", str(c.wait_s),
              *rule], say, verdict_lines)
        st = json.loads(state.read_text(encoding="utf-8"))
        cohort, rest = st["cohort"], st["rest"]
        _wait(lambda: all(fleet.agents[d].shadow is None for d in cohort), c.wait_s)
        result = RolloutDemoResult(out, broker.kind, devices)
        result.bad = {"decision": st["phase"], "cohort": cohort, "rest": rest,
                      "rest_saw_it": [d for d in rest if fleet.saw(d)],
                      "running": {d: fleet.running(d) for d in devices}, "why": st["history"][-1]["why"]}
        say(f"      the bad candidate: {st['phase']}; the rest of the fleet ({len(rest)} boards) never received it: "
            f"{'yes' if not result.bad['rest_saw_it'] else 'NO'}; every board still runs "
            f"{sorted(set(result.bad['running'].values()))}")

        # the good candidate: a shadow canary on half the fleet, promoted, installed everywhere
        state = out / "rollout-good.json"
        head(f"push a good candidate ({v2.name}, retrained) as a shadow canary to half the fleet")
        if _cli(["fleet", "push", str(v2), *b, "--fleet", c.fleet, *targets, "--canary", "50%", "--shadow",
                 "--allow-unsigned", "--state", str(state)], say, verdict_lines) != 0:
            raise EdgekitError("the canary push of the good candidate failed; see above")
        _cli(["fleet", "rollout", "status", *b, "--state", str(state), "--auto", "--until-decided", str(c.wait_s),
              *rule], say, verdict_lines)
        st = json.loads(state.read_text(encoding="utf-8"))
        from device_agent.update.manifest import load_bundle

        version = load_bundle(v2, verify=False).manifest.version
        head("wait for every board to install the promoted candidate and commit it after its probation")
        _wait(lambda: all(fleet.committed(d) == version for d in devices), c.wait_s)
        committed = {d: fleet.committed(d) for d in devices}
        result.good = {"decision": st["phase"], "cohort": st["cohort"], "committed": committed,
                       "why": st["history"][-1]["why"]}
        done = sum(v == version for v in committed.values())
        say(f"      the good candidate (v{version}): {st['phase']}; {done} of {len(devices)} boards run it committed: "
            + ", ".join(f"{d} v{v}" for d, v in committed.items()))
        say(f"      the rollouts' state files (candidate, cohort, history with why): {out / 'rollout-bad.json'}, "
            f"{out / 'rollout-good.json'}")
        push_bundle(b"", broker_url=broker.url, fleet=c.fleet, devices=devices, protocol_version=broker.protocol)
        result.seconds = time.perf_counter() - t_start
        say(f"done in {result.seconds:.0f} s")
        return result
    finally:
        if fleet is not None:
            fleet.close()
        broker.stop()
