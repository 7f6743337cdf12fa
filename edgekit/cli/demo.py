"""``edgekit demo``: the whole loop on one machine (what ``make demo`` runs)."""

from __future__ import annotations

import argparse
import logging


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="the whole loop on one machine: train, convert (QAT), agent, collector, relabel, retrain",
        description="Train the example CNN on real digits, convert it with QAT, find or start an MQTT broker, run "
        "the collector and an agent over a stream of digits with a shifted part, label what the agent flags from "
        "the known ground truth (standing in for a person), retrain, and print accuracy before and after. "
        "Everything goes into --output, which is replaced on each run. With --rollout, another demo: a canary "
        "rollout on a simulated fleet (a bad candidate stopped at its shadow canary, a good one promoted to every "
        "board).",
    )
    p.add_argument("-o", "--output", help="the demo's directory, replaced on each run (default demo-out; "
                                           "demo-photos-out with --workload photos; demo-rollout-out with --rollout)")
    p.add_argument("--broker", choices=("auto", "local", "mosquitto", "embedded"), default="auto",
                   help="auto: the broker at 127.0.0.1:1883 if it answers, else mosquitto on a free port if installed, "
                        "else an embedded one in this process (default auto)")
    p.add_argument("--workload", choices=("digits", "photos"), default="digits",
                   help="digits: the example CNN on 8x8 digits (make demo); photos: the transfer-learning tutorial's "
                        "nested MobileNetV2 on real photographs, the agent reading a folder of picture files "
                        "(a few minutes more; default digits)")
    p.add_argument("--shift", default="field", help="the distribution shift of the stream (edgekit.shift; default field)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--rollout", action="store_true",
                   help="the rollout demo instead: a simulated fleet of real agents on the broker; a bad candidate "
                        "(labels permuted) is stopped at its shadow canary, a good one (digits v2) promoted to every "
                        "board (docs/demo.md)")
    p.add_argument("--boards", type=int, default=6, help="with --rollout: boards in the simulated fleet (default 6)")
    p.add_argument("--bundle", metavar="DIR", help="with --rollout: what the fleet runs (default: the digits v1 "
                                                    "bundle of an edgekit checkout)")
    p.add_argument("--candidate", metavar="DIR", help="with --rollout: the good candidate (default: the digits v2 "
                                                       "bundle of an edgekit checkout)")
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from ..demo import DemoConfig, run_demo

    if not args.verbose:  # one line per stage is the demo's output; library logs only when asked
        logging.getLogger().setLevel(logging.WARNING)
    if args.rollout:
        if not args.verbose:  # the agents' warnings (unsigned bundles, no trusted keys) are the demo's point, not news
            logging.getLogger().setLevel(logging.ERROR)
            logging.getLogger("amqtt").setLevel(logging.CRITICAL)
        from ..demo_rollout import RolloutDemoConfig, run_rollout_demo

        result = run_rollout_demo(RolloutDemoConfig(output=args.output or "demo-rollout-out", broker=args.broker,
                                                    boards=args.boards, bundle=args.bundle, candidate=args.candidate))
        ok = result.bad.get("decision") == "aborted" and result.good.get("decision") == "promoted"
        return 0 if ok else 1
    from ..errors import EdgekitError

    if args.bundle or args.candidate:
        raise EdgekitError("--bundle and --candidate go with --rollout; the main demo trains its own bundles")
    default_out = "demo-out" if args.workload == "digits" else f"demo-{args.workload}-out"
    try:
        from ..shift import get_shift

        get_shift(args.shift)
    except ValueError as exc:
        raise EdgekitError(f"--shift: {exc}") from None
    run_demo(DemoConfig(output=args.output or default_out, broker=args.broker, shift=args.shift, seed=args.seed,
                        workload=args.workload))
    return 0
