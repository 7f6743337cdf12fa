"""``edgekit fleet status``: the boards the collector has heard from; ``edgekit fleet push`` / ``rollback``: the
model they run."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    from ..loop.store import DEFAULT_STORE

    p = sub.add_parser("fleet", help="the boards: status, push a bundle, identities (ca, enroll, revoke)")
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])
    cmds = p.add_subparsers(dest="fleet_command", metavar="ACTION")
    st = cmds.add_parser("status", help="a table: last seen, online, model, inferences, low-confidence rate, "
                                        "outbox, dropped, temperature, drift (confidence PSI)")
    st.add_argument("--store", default=DEFAULT_STORE, help=f"sqlite:///path.db or postgresql://... (default {DEFAULT_STORE})")
    st.add_argument("--fleet", help="only this fleet")
    st.add_argument("--stale-after", type=float, default=300.0, metavar="S",
                    help="a board silent this long counts as offline even if its status says online (default 300)")
    st.add_argument("--json", action="store_true", help="one JSON object per device, a line each")
    st.set_defaults(func=_status)

    from device_agent.delivery.protocol import DEFAULT_MAX_BUNDLE_BYTES

    pu = cmds.add_parser(
        "push", help="send a bundle to boards: retained on each board's bundle topic, installed between two inferences",
        description="Publish BUNDLE as the model the boards should run (a retained edgekit.bundle/1 message, QoS 1, "
                    "on edgekit/v1/<fleet>/<device>/bundle). A board that is offline gets it when it connects. "
                    "Boards with [update] trusted_keys run only bundles signed by one of those keys: a signed bundle "
                    "goes as it is, --sign-key signs an unsigned one first, and an unsigned one is refused unless "
                    "--allow-unsigned. Going back to an older bundle is `edgekit fleet rollback`. See docs/protocol.md, "
                    "'Model updates'.")
    pu.add_argument("bundle", metavar="BUNDLE", help="bundle directory (from edgekit convert/retrain) or its .tar.gz")
    pu.add_argument("--sign-key", metavar="KEY",
                    help="sign the bundle with this private key (signing.key of `edgekit keys init`) unless this key "
                         "signed it already")
    pu.add_argument("--allow-unsigned", action="store_true",
                    help="push an unsigned bundle anyway (only boards without [update].trusted_keys run it)")
    _targets(pu, DEFAULT_STORE, DEFAULT_MAX_BUNDLE_BYTES)
    pu.set_defaults(func=_push)

    rb = cmds.add_parser(
        "rollback", help="send an older bundle back to boards, signed again as a new release",
        description="Roll boards back to BUNDLE: it is signed again in place as a new release (a board never installs "
                    "a release below one it accepted, so going back is a signed act) and pushed like `edgekit fleet "
                    "push`. Boards that still keep it under their state dir reuse it without unpacking.")
    rb.add_argument("bundle", metavar="BUNDLE", help="the bundle directory to go back to")
    rb.add_argument("--sign-key", metavar="KEY", required=True, help="the private key to sign it with (signing.key)")
    rb.add_argument("--release", type=int, metavar="N",
                    help="the new release number (default: one above the key's last)")
    _targets(rb, DEFAULT_STORE, DEFAULT_MAX_BUNDLE_BYTES)
    rb.set_defaults(func=_rollback)

    from .fleet_identity import register as register_identity

    register_identity(cmds)  # ca init|list, enroll, revoke


def _targets(p: argparse.ArgumentParser, default_store: str, default_max: int) -> None:
    """Where a push goes and how: broker, fleet, devices, limits, TLS, dry run."""
    p.add_argument("--broker", required=True, help="mqtt://[user:pass@]host:1883 or mqtts://host:8883")
    p.add_argument("--fleet", required=True, help="the boards' fleet ([device].fleet in their config)")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--device", action="append", metavar="ID", help="a board's device id (repeat for several)")
    who.add_argument("--all-devices", action="store_true", help="every device of the fleet the store has seen")
    p.add_argument("--store", default=default_store, help=f"with --all-devices: the collector's store (default {default_store})")
    p.add_argument("--max-bytes", type=int, default=default_max,
                   help=f"refuse a bundle archive bigger than this (default {default_max}; "
                        "the boards' [update].max_bytes must allow it too)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S", help="seconds to wait for the broker (default 30)")
    p.add_argument("--protocol", choices=["5", "3.1.1"], default="5", help="MQTT version (default 5)")
    p.add_argument("--ca-file", help="CA certificate for mqtts://")
    p.add_argument("--cert-file", help="client certificate for mqtts://")
    p.add_argument("--key-file", help="client key for mqtts://")
    p.add_argument("--dry-run", action="store_true", help="verify and pack the bundle, print what would be sent "
                                                          "(signs nothing)")


def _status(args: argparse.Namespace) -> int:
    import time

    from ..fleet.status import fleet_status, format_table
    from ..loop.store import open_store

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


def _rollback(args: argparse.Namespace) -> int:
    return _push(args, resign=True)


def _push(args: argparse.Namespace, resign: bool = False) -> int:
    from ..errors import EdgekitError
    from ..fleet.push import bundle_message, push_bundle, sign_for_push
    from ..fleet.status import fleet_status
    from ..loop.store import open_store

    signed = sign_for_push(args.bundle, key=args.sign_key, allow_unsigned=getattr(args, "allow_unsigned", False),
                           resign=resign, release=getattr(args, "release", None), dry_run=args.dry_run)
    payload, data = bundle_message(args.bundle, max_bytes=args.max_bytes)
    if args.all_devices:
        with open_store(args.store) as store:
            devices = [r["device"] for r in fleet_status(store, fleet=args.fleet)]
        if not devices:
            raise EdgekitError(f"the store {args.store} has seen no device in fleet {args.fleet!r}; "
                               "name them with --device ID, or run `edgekit collect` first")
    else:
        devices = list(dict.fromkeys(args.device))
    what = (f"{payload['name']} v{payload['version']} (model sha256 {payload['sha256'][:12]}..., "
            f"{payload['size']:,} bytes, {signed})")
    if args.dry_run:
        from device_agent.delivery.protocol import topic

        for d in devices:
            print(f"would push {what} to {topic(args.fleet, d, 'bundle')} (retained, QoS 1)")
        return 0
    results = push_bundle(data, broker_url=args.broker, fleet=args.fleet, devices=devices, timeout=args.timeout,
                          protocol_version=args.protocol, ca_file=args.ca_file, cert_file=args.cert_file,
                          key_file=args.key_file)
    for r in results:
        print(f"{'pushed' if r.ok else 'FAILED'} {what} to {r.topic}: {r.detail}")
    return 0 if all(r.ok for r in results) else 1
