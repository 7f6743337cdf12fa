"""``edgekit fleet status``: the boards the collector has heard from."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    from ..store import DEFAULT_STORE

    p = sub.add_parser("fleet", help="the devices seen by the collector")
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])
    cmds = p.add_subparsers(dest="fleet_command", metavar="ACTION")
    st = cmds.add_parser("status", help="a table: last seen, online, model, inferences, low-confidence rate, "
                                        "outbox, dropped, temperature")
    st.add_argument("--store", default=DEFAULT_STORE, help=f"sqlite:///path.db or postgresql://... (default {DEFAULT_STORE})")
    st.add_argument("--fleet", help="only this fleet")
    st.add_argument("--stale-after", type=float, default=300.0, metavar="S",
                    help="a board silent this long counts as offline even if its status says online (default 300)")
    st.add_argument("--json", action="store_true", help="one JSON object per device, a line each")
    st.set_defaults(func=_status)


def _status(args: argparse.Namespace) -> int:
    import time

    from ..fleet import fleet_status, format_table
    from ..store import open_store

    now = time.time()
    with open_store(args.store) as store:
        rows = fleet_status(store, fleet=args.fleet, stale_after_s=args.stale_after, now=now)
    if args.json:
        for r in rows:
            print(json.dumps(r, sort_keys=True))
    elif not rows:
        print("no devices seen yet; is `edgekit collect` running against the fleet's broker?")
    else:
        print(format_table(rows, now))
    return 0
