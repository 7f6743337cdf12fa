"""``edgekit demo``: the whole loop on one machine, in a few minutes (docs/demo.md).

On digits (``make demo``) or, with ``workload="photos"`` (``edgekit demo --workload photos``), on real photographs
with the transfer-learning tutorial's nested MobileNetV2 and an agent that reads a folder of picture files
(edgekit.demo_workloads). On digits:

train the example CNN on real digits -> convert with QAT (bundle v1, signed
with a key made for the run; the agent trusts only that key) -> find or
start a broker -> start the collector -> an agent streams digits the model has
not seen, a shifted part among them -> the collector stores what it flags ->
those samples are labeled from the known ground truth (standing in for a
person) -> retrain (bundle v2) -> accuracy before and after, on a held-out
shifted test set and on the clean test set -> a promoted v2, signed as the
next release, is pushed back to the board, which verifies, swaps it in and runs it.

Everything lands in one directory (default ``./demo-out``), replaced on each
run: the data, the float model, both bundles with their reports, the agent's
outbox and results, and the SQLite sample store, so ``edgekit samples list``
and ``edgekit fleet status`` work on it afterwards.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional

import numpy as np
from device_agent.sources import ArraySource, Source

from .errors import EdgekitError

__all__ = ["DemoConfig", "DemoResult", "run_demo", "MARKER"]

log = logging.getLogger(__name__)

MARKER = ".edgekit-demo"


@dataclass(frozen=True)
class DemoConfig:
    """What the demo does; every field is keyword-only and checked. An epochs field left None takes the
    workload's own (edgekit.demo_workloads)."""

    output: Path = Path("demo-out")
    seed: int = 0
    broker: str = "auto"  # auto | local | mosquitto | embedded
    workload: str = "digits"  # digits | photos (edgekit.demo_workloads)
    train_size: int = 900  # digits the first model learns from
    stream_size: int = 500  # digits the agent sees (the rest of the 1,797 are the test sets)
    photos_per_class: int = 60  # photos: patches per class to train (80%) and check (20%) on
    photos_stream_per_class: int = 40  # photos: picture files per class in the agent's stream folder
    photos_test_per_class: int = 100  # photos: patches per class in the held-out test sets
    shifted_fraction: float = 0.6  # share of the stream under the shift
    shift: str = "field"
    base_epochs: Optional[int] = None
    qat_epochs: Optional[int] = None
    retrain_epochs: Optional[int] = None
    retrain_qat_epochs: Optional[int] = None
    feedback_share: float = 0.5
    random_fraction: float = 0.02  # the policy's unbiased random sample
    fleet: str = "demo"
    device: str = "demo-board-1"
    native_log: bool = True  # TensorFlow's and TFLite's own console messages go to OUTPUT/demo.log

    def __post_init__(self) -> None:
        from .demo_workloads import get_workload

        object.__setattr__(self, "output", Path(self.output))
        try:
            w = get_workload(self.workload)
        except ValueError as exc:
            raise EdgekitError(str(exc)) from None
        for key in ("base", "qat", "retrain", "retrain_qat"):
            if getattr(self, f"{key}_epochs") is None:
                object.__setattr__(self, f"{key}_epochs", w.epochs[key])
        if self.train_size < 100 or self.stream_size < 50:
            raise EdgekitError(f"train_size={self.train_size} / stream_size={self.stream_size}: give >= 100 / >= 50")
        if self.train_size + self.stream_size > 1797 - 100:
            raise EdgekitError(f"train_size + stream_size = {self.train_size + self.stream_size} leaves fewer than "
                               "100 of the 1,797 digits to test on")
        if min(self.photos_per_class, self.photos_stream_per_class, self.photos_test_per_class) < 5:
            raise EdgekitError("photos_per_class, photos_stream_per_class and photos_test_per_class: give >= 5 each")
        if not 0.0 <= self.shifted_fraction <= 1.0:
            raise EdgekitError(f"shifted_fraction={self.shifted_fraction} must be within [0, 1]")


@dataclass(frozen=True)
class DemoResult:
    output: Path
    broker: str
    accuracy: Mapping[str, Mapping[str, float]]  # {"v1"|"v2": {"shifted", "clean"}}
    counts: Mapping[str, int]
    verdict: str
    stages: Mapping[str, float] = field(default_factory=dict)  # seconds per stage
    seconds: float = 0.0


def _coverage(manifest) -> str:
    cov = (manifest.quantization or {}).get("qat_coverage")
    return f", QAT over {100 * cov['fraction_parameters']:.1f}% of the parameters" if cov else ""


def _prepare_output(out: Path) -> None:
    if out.exists():
        if not out.is_dir() or not ((out / MARKER).exists() or not any(out.iterdir())):
            raise EdgekitError(f"{out} exists and was not made by the demo; remove it or pass another --output")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("made by `edgekit demo`; replaced on each run\n", encoding="utf-8")


@contextlib.contextmanager
def _native_output_to(path: Path):
    """Send file descriptors 1 and 2 (where TensorFlow's C++ code writes) to ``path``;
    yield a writer for the real stdout. Python's own stdout/stderr objects follow
    the descriptors, so library logs land in the file too."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    real = os.fdopen(os.dup(saved_out), "w", buffering=1, encoding="utf-8", errors="replace")
    with open(path, "ab") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield lambda line: (real.write(line + "\n"), real.flush())
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved_out, 1)
            os.dup2(saved_err, 2)
            os.close(saved_out)
            os.close(saved_err)
            real.close()


class _AfterUpdate(Source):
    """A finite stream that first idles (the agent keeps servicing MQTT) until ``ready()`` says the
    pushed bundle runs, or ``wait_s`` passes; then it yields its rows like ArraySource."""

    def __init__(self, x: np.ndarray, uri: str, wait_s: float = 30.0):
        self._rows = ArraySource(x, uri=uri)
        self.ready: Callable[[], bool] = lambda: True
        self.wait_s = wait_s

    def items(self, stop):
        deadline = time.monotonic() + self.wait_s
        while not self.ready() and time.monotonic() < deadline and not stop.is_set():
            time.sleep(0.01)
            yield None
        yield from self._rows.items(stop)

    def close(self) -> None:
        self._rows.close()


class _Stages:
    """One line per stage: ``[i/n] what ... result (seconds)``."""

    def __init__(self, total: int, say: Callable[[str], None]):
        self.total, self.say, self.i, self.seconds = total, say, 0, {}

    def run(self, title: str, fn: Callable[[], object], result: Callable[[object], str] = lambda r: "") -> object:
        self.i += 1
        t0 = time.perf_counter()
        self.say(f"[{self.i}/{self.total}] {title} ...")
        value = fn()
        dt = time.perf_counter() - t0
        self.seconds[title] = dt
        detail = result(value)
        self.say(f"      done in {dt:.1f} s" + (f": {detail}" if detail else ""))
        return value


def run_demo(config: DemoConfig = DemoConfig(), say: Callable[[str], None] = print) -> DemoResult:
    """Run the loop end to end; ``say`` gets the progress lines (``print`` by default).

    With ``config.native_log`` (and ``say`` left as ``print``) the console shows only
    the demo's lines; everything TensorFlow prints goes to ``OUTPUT/demo.log``.
    """
    _prepare_output(Path(config.output))
    if config.native_log and say is print:
        with _native_output_to(Path(config.output) / "demo.log") as real_say:
            real_say(f"(TensorFlow's own messages go to {Path(config.output) / 'demo.log'})")
            return _run(config, real_say)
    return _run(config, say)


def _run(config: DemoConfig, say: Callable[[str], None]) -> DemoResult:
    from device_agent.config import load_config
    from device_agent.update.manifest import load_bundle

    from .broker import find_or_start_broker
    from .loop.collect import Collector
    from .convert.pipeline import convert
    from .data import load_dataset
    from .fleet.keys import init_keys, sign_bundle
    from .fleet.push import bundle_message, push_bundle
    from .demo_workloads import get_workload
    from .loop.retrain import bundle_accuracy, retrain
    from .shift import get_shift
    from .loop.store import open_store

    t_start = time.perf_counter()
    c = config
    out = c.output
    stages = _Stages(11, say)
    shift = get_shift(c.shift)
    w = get_workload(c.workload)

    # 1. data: one seeded split, so no input is used twice.
    d = stages.run(w.data_title, lambda: w.prepare(c, out, shift), lambda p: p.summary)
    data = load_dataset(d.data_spec, seed=c.seed, image_shape=d.image_shape)

    # 2. the example model
    model_path = out / "model" / f"{w.name}.keras"

    def train_model():
        model_path.parent.mkdir()
        return w.train(c, data, model_path)

    model = stages.run(f"{w.model_title} for {c.base_epochs} epochs", train_model,
                       lambda m: f"{m.count_params():,} parameters -> {model_path}")

    # 3. QAT + int8, signed with the owner's key: the board runs only bundles that key signed
    v1 = out / "bundle-v1"
    keys = init_keys(out / "keys")

    def convert_and_sign():
        r = convert(model, data, mode="qat", output=v1, epochs=c.qat_epochs, name=w.name, version="1",
                    progress=False, seed=c.seed)
        return r, sign_bundle(v1, keys.private)

    stages.run(
        f"convert with QAT ({c.qat_epochs} epoch{'s' if c.qat_epochs != 1 else ''}) to an int8 bundle, and sign it",
        convert_and_sign,
        lambda rs: (f"int8 top-1 {100 * rs[0].report.int8.accuracy:.1f}% (float "
                    f"{100 * rs[0].manifest.metrics['accuracy_float']:.1f}%) on the clean test split"
                    f"{_coverage(rs[0].manifest)}, "
                    f"confidence threshold {rs[0].manifest.confidence_threshold:.2f} -> {v1}; signed as release "
                    f"{rs[1].release} with key {keys.key_id[:12]}... ({keys.private}, new for this run)"),
    )

    # 4. broker
    broker = stages.run("find an MQTT broker", lambda: find_or_start_broker(out, prefer=c.broker),
                        lambda b: b.description)
    store_url = f"sqlite:///{out / 'samples.db'}"
    store = open_store(store_url)

    def clear_bundle(b) -> None:
        """An empty retained message clears the device's desired bundle (docs/protocol.md)."""
        push_bundle(b"", broker_url=b.url, fleet=c.fleet, devices=[c.device], protocol_version=b.protocol)
    collector: Optional[Collector] = None
    try:
        # 5. collector
        def start_collector() -> Collector:
            # A fresh client id and a short session: a shared broker keeps no queue for old demo runs.
            return Collector(broker.url, store, fleet=c.fleet, client_id=f"edgekit-demo-collector-{uuid.uuid4().hex[:12]}",
                             session_expiry_s=60, protocol=broker.protocol).start()

        collector = stages.run("start the collector", start_collector,
                               lambda col: f"subscribed to {', '.join(col.subscriptions())}; store {store_url}")

        # 6. the agent, on the board's code path (device_agent, no TensorFlow in it)
        agent_dir = out / "agent"
        agent_dir.mkdir()
        def agent_config(b, results: str, ack: str = "collector"):
            return load_config(
                bundle=str(v1), broker=b.url, device_id=c.device, fleet=c.fleet,
                results=str(agent_dir / results), outbox=str(agent_dir / "outbox.sqlite"), threads=1,
                policy={"random_fraction": c.random_fraction, "seed": c.seed},
                mqtt={"protocol": b.protocol, "ack": ack}, telemetry={"period_s": 1},
                update={"trusted_keys": [str(keys.public)]},  # as tools/install_agent.py --trusted-key sets it
            )

        agent_cfg = agent_config(broker, "results.jsonl")
        # A bundle left retained on this device's topic by an interrupted earlier run must not replace v1.
        clear_bundle(broker)
        n_stream = len(d.y_stream)

        def run_agent():
            from device_agent.agent import Agent

            with Agent(agent_cfg, source=d.source()) as agent:
                return agent.run()

        stats = stages.run(
            f"run the agent as device {c.fleet}/{c.device} over the stream of {n_stream} {w.things}", run_agent,
            lambda s: (f"{s.inferences} inferences on {s.runtime}, {s.flagged} flagged, {s.published} stored and "
                       f"acknowledged by the collector, {s.pending} left in the outbox"),
        )

        if stats.flagged and not stats.published:
            raise EdgekitError(f"the agent flagged {stats.flagged} samples but the collector acknowledged none; "
                               f"see {out / 'demo.log'} and try --broker embedded")

        def wait_collected() -> int:
            deadline = time.monotonic() + 30
            while store.count_samples(labeled=None) < stats.published and time.monotonic() < deadline:
                time.sleep(0.1)
            collector.wait_idle(0.5, timeout=10)
            return store.count_samples()

        n_stored = stages.run("wait for the collector to store them", wait_collected,
                              lambda n: f"{n} samples in {store_url}")
        if n_stored < stats.published:
            raise EdgekitError(f"the collector stored {n_stored} of {stats.published} published samples within 30 s")
    finally:
        if collector is not None:
            collector.stop()
        broker.stop()

    # 7. labels from the ground truth, standing in for a person
    def label() -> Dict[str, int]:
        # The agent's result lines name the sample id of each input it flagged: that is how a
        # sample is traced from the board to the store, and it keeps out anything another
        # client may have published on a shared broker.
        ours = set()
        with open(agent_dir / "results.jsonl", encoding="utf-8") as fh:
            for line in fh:
                sid = json.loads(line).get("sample_id")
                if sid:
                    ours.add(sid)
        records = [r for r in store.list_samples(fleet=c.fleet) if r.sample_id in ours]
        mapping, shifted, wrong = {}, 0, 0
        for r in records:
            i = d.position(r.source)
            truth = data.labels[int(d.y_stream[i])]
            mapping[r.sample_id] = truth
            shifted += int(d.stream_shifted[i])
            wrong += int(r.label_pred != truth)
        if not mapping:
            raise EdgekitError("the agent flagged nothing, so there is nothing to label; lower the threshold")
        store.set_labels(mapping, by="demo-ground-truth")
        return {"labeled": len(mapping), "shifted": shifted, "wrong": wrong}

    say(f"      (the next step stands in for a person: the demo knows the true class of each of the {w.things} it "
        "streamed and labels "
        "the flagged samples with it, as `edgekit samples label` would)")
    lab = stages.run(
        "label the flagged samples from the known ground truth", label,
        lambda r: (f"{r['labeled']} labeled; {r['shifted']} of them were shifted inputs "
                   f"({100 * float(d.stream_shifted.mean()):.0f}% of the stream was), "
                   f"v1 had {r['wrong']} of them wrong"),
    )
    store.close()

    # 8. retrain
    v2 = out / "bundle-v2"

    def retrain_and_sign():
        r = retrain(v1, float_model=w.retrain_float_model(v1, model_path), data=d.data_spec, feedback=store_url,
                    output=v2,
                    epochs=c.retrain_epochs, qat_epochs=c.retrain_qat_epochs, feedback_share=c.feedback_share,
                    seed=c.seed, progress=False)
        return r, sign_bundle(v2, keys.private)

    res, v2_signed = stages.run(
        f"retrain: fine-tune {c.retrain_epochs} epochs on the original data + feedback, QAT, int8, sign",
        retrain_and_sign,
        lambda rs: (f"bundle v{rs[0].version} -> {v2}, signed as release {rs[1].release}; "
                    f"verdict: {rs[0].verdict.word} ({rs[0].verdict.reason})"),
    )

    # 9. before and after, on test sets no step has seen
    def measure() -> Dict[str, Dict[str, float]]:
        return {
            name: {"shifted": bundle_accuracy(path, d.x_test_shifted, d.y_test),
                   "clean": bundle_accuracy(path, d.x_test, d.y_test)}
            for name, path in (("v1", v1), ("v2", v2))
        }

    acc = stages.run("measure v1 and v2 (int8, the board's interpreter) on the held-out test sets", measure)

    # 11. a promoted v2 goes back to the board: retained on its bundle topic, swapped in between inferences
    def ship() -> Dict[str, int]:
        if not res.verdict.promote:
            return {}
        b = find_or_start_broker(out, prefer=c.broker)
        try:
            _, payload = bundle_message(v2)
            for r in push_bundle(payload, broker_url=b.url, fleet=c.fleet, devices=[c.device],
                                 protocol_version=b.protocol):
                if not r.ok:
                    raise EdgekitError(f"pushing v2 to {r.topic} failed: {r.detail}")
            from device_agent.agent import Agent

            n = min(100, len(d.y_test))
            source = _AfterUpdate(d.x_test_shifted[:n], uri="demo-after-update")
            # No collector runs in this step: a sample leaves the outbox on the broker's PUBACK.
            with Agent(agent_config(b, "results-after-update.jsonl", ack="broker"), source=source) as agent:
                source.ready = lambda: agent.manifest.sha256 == res_sha
                agent.run()
        finally:
            clear_bundle(b)  # the demo leaves nothing retained on a shared broker
            b.stop()
        versions: Dict[str, int] = {}
        with open(agent_dir / "results-after-update.jsonl", encoding="utf-8") as fh:
            for line in fh:
                v = json.loads(line)["model_version"]
                versions[v] = versions.get(v, 0) + 1
        return versions

    res_sha = load_bundle(v2).manifest.sha256
    shipped = stages.run(
        f"ship v2 back to {c.fleet}/{c.device} (edgekit fleet push) and run it", ship,
        lambda v: (f"the board verified v{res.version} (its signature, release {v2_signed.release}, "
                   f"and model sha256), swapped it in between two inferences and ran "
                   f"{sum(v.values())} new shifted inputs on it ({', '.join(f'v{k}: {n}' for k, n in sorted(v.items()))})"
                   if v else f"not shipped: the retrain verdict was '{res.verdict.word}'"),
    )
    n_test = len(d.y_test)
    say("")
    say(f"accuracy of the int8 bundles on {n_test} held-out {w.things} that no step trained on")
    say(f"(shifted: {shift.describe()}, drawn afresh)")
    say(f"  {'test set':<10} {'before (v1)':>12} {'after (v2)':>12} {'change':>14}")
    for part in ("shifted", "clean"):
        a, b = acc["v1"][part], acc["v2"][part]
        say(f"  {part:<10} {100 * a:>11.1f}% {100 * b:>11.1f}% {100 * (b - a):>+8.1f} points")
    say(f"retrain verdict: {res.verdict.word} ({res.verdict.reason})")
    say("")
    total = time.perf_counter() - t_start
    say(f"the loop took {total:.0f} s. Reports:")
    say(f"  {v1 / 'report' / 'report.md'}   (v1: float vs int8)")
    say(f"  {v2 / 'retrain.md'}   (v2 vs v1, with the verdict)")
    say(f"  {v2 / 'report' / 'report.md'}   (v2: float vs int8, v1 as the baseline)")
    say("Look around:")
    say(f"  edgekit samples list --store {store_url} --fleet {c.fleet}")
    say(f"  edgekit fleet status --store {store_url} --stale-after 3600")
    say(f"  edgekit evaluate {v2} --data {d.data_spec} --baseline {v1}")
    say(f"  edgekit retrain {v2} --float-model {res.float_model_path} "
        f"--data {d.data_spec} --feedback {store_url} -o {out / 'bundle-v3'}")
    counts = {"stream": n_stream, "stream_shifted": int(d.stream_shifted.sum()), "inferences": stats.inferences,
              "flagged": stats.flagged, "published": stats.published, "stored": n_stored, **lab,
              "after_update": dict(shipped)}
    return DemoResult(output=out, broker=broker.kind, accuracy=acc, counts=counts, verdict=res.verdict.word,
                      stages=dict(stages.seconds), seconds=total)
