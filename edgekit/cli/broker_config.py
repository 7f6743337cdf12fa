"""``edgekit broker-config``: a Mosquitto configuration where each client speaks only for itself."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from ..fleet.identity import LEAF_DAYS

    p = sub.add_parser(
        "broker-config", help="write a Mosquitto config: TLS, a certificate per client, an ACL per identity",
        description="Write OUT/mosquitto.conf, OUT/acl.conf, a server certificate for the --host names, the CA and its "
                    "CRL. Clients need a certificate from the CA; its CN is their username: a board writes only "
                    "under edgekit/v1/<fleet>/<its id>/ and reads only its own cmd, bundle and ack; host identities "
                    "get their role's rights (docs/identity.md). Run: mosquitto -c OUT/mosquitto.conf")
    p.add_argument("--ca", required=True, metavar="DIR", help="the CA directory (edgekit fleet ca init)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="new directory for the configuration")
    p.add_argument("--host", action="append", required=True, metavar="NAME",
                   help="a DNS name or IP address clients use to reach the broker (repeat for several)")
    p.add_argument("--port", type=int, default=8883, help="TLS listener port (default 8883)")
    p.add_argument("--bind", metavar="ADDRESS", help="listen on this address only (default: every interface)")
    p.add_argument("--fleet", action="append", metavar="F",
                   help="a fleet the broker serves (repeat; default: every fleet the CA enrolled boards in)")
    p.add_argument("--any-fleet", action="store_true",
                   help="'+' for the fleet level: any fleet name (a board is still confined to its own device id)")
    p.add_argument("--board-read", action="append", default=[], metavar="TOPIC",
                   help="another topic boards may read (a [source] kind='mqtt' sensor topic; %%u = the board's id)")
    p.add_argument("--install-dir", metavar="DIR",
                   help="where OUT will live on the broker machine (the paths in mosquitto.conf; default OUT)")
    p.add_argument("--days", type=int, default=LEAF_DAYS, help=f"server certificate validity (default {LEAF_DAYS})")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import IdentityError
    from ..fleet.broker_config import write_broker_config
    from ..fleet.identity import open_ca

    if args.any_fleet and args.fleet:
        raise IdentityError("--any-fleet and --fleet exclude each other; pass one")
    cfg = write_broker_config(open_ca(args.ca), args.output, hosts=args.host, port=args.port, bind=args.bind,
                              fleets=args.fleet, any_fleet=args.any_fleet, install_dir=args.install_dir,
                              extra_board_read=args.board_read, days=args.days, force=args.force)
    print(f"wrote {cfg.conf} and {cfg.acl} (fleets: {', '.join(cfg.fleets)}; TLS on port {cfg.port} for "
          f"{', '.join(cfg.hosts)}); start it: mosquitto -c {cfg.conf}")
    return 0
