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
        "Everything goes into --output, which is replaced on each run.",
    )
    p.add_argument("-o", "--output", default="demo-out", help="the demo's directory, replaced on each run (default demo-out)")
    p.add_argument("--broker", choices=("auto", "local", "mosquitto", "embedded"), default="auto",
                   help="auto: the broker at 127.0.0.1:1883 if it answers, else mosquitto on a free port if installed, "
                        "else an embedded one in this process (default auto)")
    p.add_argument("--shift", default="field", help="the distribution shift of the stream (edgekit.shift; default field)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from ..demo import DemoConfig, run_demo

    if not args.verbose:  # one line per stage is the demo's output; library logs only when asked
        logging.getLogger().setLevel(logging.WARNING)
    run_demo(DemoConfig(output=args.output, broker=args.broker, shift=args.shift, seed=args.seed))
    return 0
