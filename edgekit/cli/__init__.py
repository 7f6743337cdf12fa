"""``edgekit`` command line: a thin layer over the public functions.

Each subcommand lives in its own module here with a ``register(subparsers)``
function; heavy imports (TensorFlow) happen inside the handlers, so
``edgekit --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import List, Optional

from .. import __version__

_COMMANDS = ("convert", "import_tflite", "distill", "evaluate", "collect", "samples", "label", "retrain", "fleet", "broker_config", "keys",
             "sign", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgekit",
        description="Convert Keras models to int8 TFLite bundles, collect what boards flag, relabel and retrain.",
    )
    parser.add_argument("--version", action="version", version=f"edgekit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run one command. As the program (``argv`` None) SIGTERM/SIGINT stay a stop request until the
    process ends; a caller passing ``argv`` gets its own signal handlers back afterwards."""
    # First thing: a SIGTERM from here on is a stop request, never a kill mid-way (see _signals).
    from ._signals import STOP, install, restore

    previous = install()
    try:
        return _main(argv, STOP)
    finally:
        if argv is not None:
            restore(previous)


def _main(argv: Optional[List[str]], stop) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from device_agent.errors import AgentError

    from ..errors import EdgekitError

    try:
        if not getattr(args, "graceful_stop", False):
            stop.raise_on_signal()
        return int(args.func(args) or 0)
    except (EdgekitError, AgentError) as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
