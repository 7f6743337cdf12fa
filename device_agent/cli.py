"""``edgekit-agent``: run, check and bench on the board. A thin layer over the public functions.

Errors device_agent raises on purpose print as ``Type: message`` (one line)
and exit 1.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import List, Optional

from .errors import AgentError

__all__ = ["build_parser", "main"]

log = logging.getLogger("edgekit-agent")


def _overrides(args: argparse.Namespace) -> dict:
    return {
        "bundle": getattr(args, "bundle", None),
        "source": getattr(args, "source", None),
        "watch": True if getattr(args, "watch", False) else None,
        "broker": getattr(args, "broker", None),
        "device_id": getattr(args, "device_id", None),
        "fleet": getattr(args, "fleet", None),
        "results": getattr(args, "results", None),
        "outbox": getattr(args, "outbox", None),
    }


def _config(args: argparse.Namespace):
    from .config import load_config

    return load_config(args.config, **_overrides(args))


def cmd_run(args: argparse.Namespace) -> int:
    from .agent import Agent

    config = _config(args)
    if args.reset_bundle:
        from .update.updater import Updater

        forgot = Updater(config.state_dir, device=config.device.id).reset()
        log.info("%s; starting on the configured bundle %s",
                 "forgot the bundle an update installed" if forgot else "no installed bundle to forget",
                 config.bundle.path)
    stop = threading.Event()

    def _stop(signum, frame):
        log.info("signal %d: stopping after the current input", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    with Agent(config) as agent:
        stats = agent.run(stop)
    log.info(
        "done: %d inferences, %d flagged, %d published, %d dropped, %d pending, %d refused by the broker, errors %s",
        stats.inferences, stats.flagged, stats.published, stats.dropped, stats.pending, stats.rejected,
        dict(stats.errors) or "none",
    )
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Every part the agent needs, each with ok or what is wrong."""
    from .config import load_config

    failures = 0

    def report(ok: bool, what: str, detail: str) -> None:
        nonlocal failures
        failures += 0 if ok else 1
        print(f"{'ok  ' if ok else 'FAIL'} {what}: {detail}")

    try:
        config = load_config(args.config, **_overrides(args))
        report(True, "config", config.origin)
    except AgentError as exc:
        report(False, "config", str(exc))
        return 1
    bundle = None
    try:
        from .update.manifest import load_bundle

        if not config.bundle.path:
            raise AgentError("[bundle].path is empty; set it or pass --bundle DIR")
        bundle = load_bundle(config.bundle.path)
        m = bundle.manifest
        report(True, "bundle", f"{m.name} v{m.version} sha256 {m.sha256[:12]}... labels {len(m.labels)}")
    except AgentError as exc:
        report(False, "bundle", str(exc))
    if config.update.enabled:
        from .update.updater import Updater

        updater = Updater(config.state_dir, device=config.device.id)
        if updater.state.current is not None:
            installed = updater.load_pointer()
            if installed is not None:
                bundle = installed
                m = installed.manifest
                cur = updater.state.current
                trial = "committed" if cur.committed else f"not yet committed: attempt {cur.attempts} of " \
                                                           f"{config.update.max_attempts}"
                report(True, "update", f"{m.name} v{m.version} from {installed.path} runs instead of the configured "
                                       f"bundle ({trial}; --reset-bundle on run goes back)")
            else:
                report(False, "update", f"{updater.pointer_path} names a bundle that does not load; "
                                        "the configured bundle runs (see the warning above)")
        if updater.state.refused:
            r = updater.state.refused[-1]
            report(True, "update", f"{len(updater.state.refused)} pushed archive(s) refused for good, the last: "
                                   f"{r.name} v{r.version} ({r.reason[:160]})")
    _check_signature(config, bundle, report)
    if bundle is not None:
        try:
            from .bench import choose_runtime
            from .inference.interpreter import TFLiteModel

            runtime, threads = choose_runtime(config)
            with TFLiteModel.open(bundle.model_path, runtime, threads) as model:
                report(True, "runtime", f"{model.runtime}, {threads} threads, input {list(model.input_spec.shape)}")
        except AgentError as exc:
            report(False, "runtime", str(exc))
    try:
        from .sources import open_source

        if config.source.kind != "mqtt":
            open_source(config.source).close()
        report(True, "source", f"{config.source.kind} {config.source.path or config.source.topic}".strip())
    except AgentError as exc:
        report(False, "source", str(exc))
    try:
        from .delivery.outbox import Outbox

        with Outbox(config.outbox_path, max_bytes=config.outbox.max_bytes) as box:
            report(True, "outbox", f"{box.path}: {box.depth} samples, {box.bytes} bytes, {box.dropped} dropped so far")
    except AgentError as exc:
        report(False, "outbox", str(exc))
    if config.mqtt.broker:
        try:
            from .delivery.mqtt import Link

            link = Link(config.mqtt, client_id=f"edgekit-check-{config.device.id}").start()
            ok = link.wait_connected(args.timeout)
            error = link.last_error
            link.close()
            report(ok, "broker", config.mqtt.broker if ok else
                   f"{error or 'no connection'} within {args.timeout:g}s; check [mqtt].broker, the network and credentials")
        except AgentError as exc:
            report(False, "broker", str(exc))
    else:
        report(True, "broker", "none configured: samples stay in the outbox")
    return 1 if failures else 0


def _check_signature(config, bundle, report) -> None:
    """The bundle that would run is signed by a trusted key (or the board trusts none: it runs anything)."""
    if not config.update.trusted_keys:
        report(True, "signature", "no [update].trusted_keys: this board runs any bundle, signed or not")
        return
    try:
        from .update.signature import Verifier, load_public_key

        keys = [load_public_key(k) for k in config.update.trusted_keys]
        verifier = Verifier(keys, config.state_dir / f"releases-{config.device.id}.json")
        top, _ = verifier.highest()
        trusted = f"{len(keys)} trusted key(s) {', '.join(k.key_id[:12] for k in keys)}; highest release accepted: {top}"
        if bundle is None:
            report(True, "signature", trusted)
            return
        signed = verifier.verify_dir(bundle.path)
        report(True, "signature", f"release {signed.release} signed by key {signed.key_id[:12]}...; {trusted}")
    except AgentError as exc:
        report(False, "signature", str(exc))


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import bench_bundle, save_choice
    from .config import load_config
    from .update.manifest import load_bundle

    config = load_config(args.config, **_overrides(args))
    path = config.bundle.path
    if not path:
        raise AgentError("no bundle: pass --bundle DIR or set [bundle].path")
    bundle = load_bundle(path)
    threads = [int(t) for t in args.threads.split(",")] if args.threads else None
    timings = bench_bundle(bundle, runs=args.runs, threads=threads)
    print(f"{'runtime':<16}{'threads':>8}{'p50 ms':>10}{'p95 ms':>10}{'mean ms':>10}")
    for t in timings:
        print(f"{t.runtime:<16}{t.threads:>8}{t.p50_ms:>10.3f}{t.p95_ms:>10.3f}{t.mean_ms:>10.3f}")
    best = timings[0]
    print(f"fastest: runtime={best.runtime} threads={best.threads} ({best.p50_ms:.3f} ms per inference)")
    if not args.no_save:
        out = save_choice(config.bench_path, best, bundle.manifest.sha256, timings)
        print(f"saved to {out}; runtime = \"auto\" uses it")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgekit-agent", description="Run an edgekit bundle on this board.")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", help="TOML config (firmware_configs/<board>.toml)")
        sp.add_argument("--bundle", help="bundle directory or .tar.gz (overrides [bundle].path)")
        sp.add_argument("--device-id", help="overrides [device].id")
        sp.add_argument("--fleet", help="overrides [device].fleet")
        sp.add_argument("--outbox", help="outbox file (overrides [outbox].path)")

    run = sub.add_parser("run", help="classify the source and send unsure inputs home")
    common(run)
    run.add_argument("--source", help="folder, .npy or .npz (overrides [source].path, kind inferred)")
    run.add_argument("--watch", action="store_true", help="keep watching the folder for new files")
    run.add_argument("--broker", help="mqtt://host:port or mqtts://host:port, or the nodes of a cluster "
                                      "comma-separated (overrides [mqtt].broker)")
    run.add_argument("--results", help="JSON lines of every prediction: a file, or - for stdout")
    run.add_argument("--reset-bundle", action="store_true",
                     help="forget the bundle an update installed and start on the configured one (a retained "
                          "bundle message on the broker installs it again: push the old bundle to roll back)")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check", help="validate config, bundle, runtime, source, outbox and broker")
    common(check)
    check.add_argument("--source")
    check.add_argument("--broker")
    check.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the broker")
    check.set_defaults(func=cmd_check)

    bench = sub.add_parser("bench", help="time the bundle on every runtime and thread count; keep the fastest")
    common(bench)
    bench.add_argument("--runs", type=int, default=50)
    bench.add_argument("--threads", help="comma list of thread counts (default 1..cores)")
    bench.add_argument("--no-save", action="store_true", help="print only; do not store the choice")
    bench.set_defaults(func=cmd_bench)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except AgentError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
