"""``edgekit fleet ca init|list``, ``edgekit fleet enroll``, ``edgekit fleet revoke``: who may talk to the broker."""

from __future__ import annotations

import argparse
import time


def register(cmds: argparse._SubParsersAction) -> None:
    """Add the identity actions to ``edgekit fleet``."""
    from ..fleet.identity import CA_DAYS, LEAF_DAYS, ROLES

    ca = cmds.add_parser("ca", help="the fleet's certificate authority: init, list",
                         description="The CA that signs the broker's and every client's certificate (docs/identity.md). "
                                     "Keep its directory (ca.key) on the workstation, never on the broker or a board.")
    ca.set_defaults(func=lambda a: (ca.print_help(), 2)[1])
    ca_cmds = ca.add_subparsers(dest="ca_command", metavar="ACTION")
    init = ca_cmds.add_parser("init", help="create a CA directory: ca.key (0600), ca.crt, crl.pem, enrolled.json")
    init.add_argument("dir", metavar="DIR")
    init.add_argument("--name", default="edgekit fleet CA", help="the CA's common name (default 'edgekit fleet CA')")
    init.add_argument("--days", type=int, default=CA_DAYS, help=f"validity in days (default {CA_DAYS})")
    init.add_argument("--force", action="store_true",
                      help="replace an existing CA (every certificate it issued stops working)")
    init.set_defaults(func=_ca_init)
    ls = ca_cmds.add_parser("list", help="every certificate the CA issued: name, role, fleet, validity, revoked")
    ls.add_argument("dir", metavar="DIR")
    ls.set_defaults(func=_ca_list)

    en = cmds.add_parser(
        "enroll", help="issue a key and certificate for a board (CN = its device id) or a host tool",
        description="Write OUT/client.key (0600), OUT/client.crt, OUT/ca.crt and OUT/identity.json, and add the "
                    "identity to the CA's enrolment list. Install a board's with "
                    "`tools/install_agent.py --identity OUT`; pass a host tool's with --ca-file/--cert-file/--key-file.")
    en.add_argument("name", metavar="NAME", help="a board's device id ([device].id), or a host identity's name")
    en.add_argument("--ca", required=True, metavar="DIR", help="the CA directory (edgekit fleet ca init)")
    en.add_argument("-o", "--output", required=True, metavar="OUT", help="new directory for the key and certificates")
    en.add_argument("--role", choices=ROLES, default="device",
                    help="device (a board), collector (edgekit collect), pusher (edgekit fleet push, commands) "
                         "or admin (reads and writes every fleet topic); default device")
    en.add_argument("--fleet", help="the board's fleet ([device].fleet, default 'default'); for a host tool, the only "
                                    "fleet it serves (default: every fleet of the broker)")
    en.add_argument("--days", type=int, default=LEAF_DAYS, help=f"validity in days (default {LEAF_DAYS})")
    en.add_argument("--renew", action="store_true",
                    help="issue a second certificate for an enrolled name (the first stays valid until revoked)")
    en.add_argument("--force", action="store_true", help="replace OUT if it exists")
    en.set_defaults(func=_enroll)

    rv = cmds.add_parser("revoke", help="revoke every certificate of NAME: the broker refuses it, the collector "
                                        "drops it from its allow-list",
                         description="Marks NAME revoked in the enrolment list and rewrites the CA's crl.pem. Copy "
                                     "crl.pem to the broker (or run edgekit broker-config again) and restart Mosquitto.")
    rv.add_argument("name", metavar="NAME")
    rv.add_argument("--ca", required=True, metavar="DIR")
    rv.add_argument("--role", choices=ROLES, help="when a board and a host tool share the name")
    rv.set_defaults(func=_revoke)


def _ca_init(args: argparse.Namespace) -> int:
    from ..fleet.identity import init_ca

    ca = init_ca(args.dir, name=args.name, days=args.days, force=args.force)
    print(f"CA {args.name!r} in {ca.path}: ca.crt (give it to the broker and every client), ca.key (keep it here, "
          f"0600), crl.pem, enrolled.json")
    return 0


def _ca_list(args: argparse.Namespace) -> int:
    from ..fleet.identity import open_ca

    now = time.time()
    rows = [("name", "role", "fleet", "cn", "serial", "valid until", "state")]
    for i in open_ca(args.dir).identities():
        state = "revoked" if i.revoked_at is not None else ("valid" if i.active(now) else "expired")
        rows.append((i.name, i.role, i.fleet or "*", i.cn, i.serial[:16], time.strftime("%Y-%m-%d", time.gmtime(i.not_after)),
                     state))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        print("  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip())
    return 0


def _enroll(args: argparse.Namespace) -> int:
    from ..fleet.identity import open_ca

    fleet = args.fleet if args.fleet or args.role != "device" else "default"
    e = open_ca(args.ca).enroll(args.name, args.output, role=args.role, fleet=fleet, days=args.days,
                                renew=args.renew, force=args.force)
    i = e.identity
    scope = f"fleet {i.fleet}" if i.fleet else "every fleet of the broker"
    print(f"enrolled {i.role} {i.name!r} (CN {i.cn!r}, {scope}, serial {i.serial[:16]}, valid until "
          f"{time.strftime('%Y-%m-%d', time.gmtime(i.not_after))}) into {e.dir}")
    if i.role == "device":
        print(f"install on the board: python3 tools/install_agent.py --identity {e.dir} --broker mqtts://BROKER:8883 ...")
    else:
        print(f"use with --broker mqtts://BROKER:8883 --ca-file {e.ca} --cert-file {e.cert} --key-file {e.key}; "
              f"run `edgekit broker-config` again so the broker knows the new identity")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from ..fleet.identity import open_ca

    ca = open_ca(args.ca)
    for i in ca.revoke(args.name, role=args.role):
        print(f"revoked {i.role} {i.name!r} (serial {i.serial[:16]})")
    print(f"now copy {ca.crl_file} to the broker (or run `edgekit broker-config` again) and restart Mosquitto")
    return 0
