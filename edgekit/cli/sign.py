"""``edgekit sign BUNDLE_DIR --key KEY [--release N]``: sign a bundle in place."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sign", help="sign a bundle in place (manifest.json gets its release, signature.json is written)",
        description="Sign BUNDLE_DIR with a private key from `edgekit keys init`: the manifest's 'release' is set "
                    "(default: one above the key's last release and the bundle's own) and signature.json, an Ed25519 "
                    "signature over the exact bytes of manifest.json, is written beside it. The model is checked "
                    "against the manifest's sha256, never opened. See docs/bundle.md, 'Signature'.")
    p.add_argument("bundle", metavar="BUNDLE_DIR", help="the bundle directory (from edgekit convert/retrain)")
    p.add_argument("--key", required=True, metavar="KEY", help="the private key file (signing.key)")
    p.add_argument("--release", type=int, metavar="N",
                   help="the release number (default: one above the key's last); boards refuse one below a release "
                        "they accepted")
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from ..fleet.keys import sign_bundle

    r = sign_bundle(args.bundle, args.key, release=args.release)
    print(f"signed {r.name} v{r.version} as release {r.release} with key {r.key_id[:16]}... "
          f"({r.path / 'signature.json'})")
    return 0
