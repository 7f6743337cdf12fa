"""``edgekit keys init DIR``: a signing key pair; ``edgekit keys id KEY``: which key a file holds."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keys", help="signing keys: boards with [update] trusted_keys run only bundles they signed")
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])
    cmds = p.add_subparsers(dest="keys_command", metavar="ACTION")
    init = cmds.add_parser(
        "init", help="write a new Ed25519 key pair: DIR/signing.key (private, 0600) and DIR/signing.pub",
        description="Write a new Ed25519 signing key pair. DIR/signing.key is private (mode 0600; keep it off the "
                    "boards, on the machine that signs releases); DIR/signing.pub goes to every board "
                    "([update] trusted_keys, or tools/install_agent.py --trusted-key). Existing files are never "
                    "overwritten. See docs/bundle.md, 'Signature'.")
    init.add_argument("directory", metavar="DIR", help="where to write the two files (created if missing)")
    init.add_argument("--continue-from", metavar="OLD_KEY",
                      help="rotating keys: start this key's release counter where OLD_KEY's (signing.key) stopped")
    init.set_defaults(func=_init)
    ident = cmds.add_parser("id", help="print the key id (sha256 of the raw public key) of key files",
                            description="Print the key id a signature.json names and a board's telemetry lists, "
                                        "for public (signing.pub) or private (signing.key) key files.")
    ident.add_argument("keys", nargs="+", metavar="KEY", help="signing.pub or signing.key files")
    ident.set_defaults(func=_id)


def _init(args: argparse.Namespace) -> int:
    from ..fleet.keys import init_keys, last_release

    pair = init_keys(args.directory, continue_from=args.continue_from)
    print(f"private key: {pair.private} (mode 0600: keep it secret, off the boards)")
    print(f"public key:  {pair.public} (copy it to every board: [update] trusted_keys)")
    print(f"key id:      {pair.key_id}")
    if args.continue_from:
        print(f"release counter continues from {last_release(pair.private)}")
    print(f"sign a bundle: edgekit sign BUNDLE_DIR --key {pair.private}")
    return 0


def _id(args: argparse.Namespace) -> int:
    from ..fleet.keys import public_key_id

    for key in args.keys:
        print(f"{public_key_id(key)}  {key}")
    return 0
