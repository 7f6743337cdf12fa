"""Options and steps that every command writing a bundle shares (convert, distill, import, retrain): where the
bundle goes, the signing key, the input range, and what the conversion is told."""

from __future__ import annotations

import argparse
from typing import Any, Optional

SIGN_KEY_HELP = ("sign the new bundle with this private key (signing.key of `edgekit keys init`) as the key's next "
                 "release; boards with [update] trusted_keys run only signed bundles")


def add_sign_key(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sign-key", metavar="KEY", help=SIGN_KEY_HELP)


def add_input_range(p: Any, *, whose: Optional[str] = "model") -> None:
    """--input-range / --mean / --std on a parser or an argument group; ``whose`` own normalization they override."""
    from ..convert.inputs import INPUT_RANGES

    over = f" (overrides what the {whose}'s own Rescaling/Normalization says)" if whose else ""
    p.add_argument("--input-range", choices=tuple(INPUT_RANGES), metavar="RANGE",
                   help=f"the model input for raw pixels 0..255: {', '.join(INPUT_RANGES)}{over}")
    p.add_argument("--mean", type=float, help="model input = (raw - MEAN) / STD, in raw units (e.g. 127.5; with --std)")
    p.add_argument("--std", type=float, help="see --mean (e.g. 127.5)")


def add_conversion(p: argparse.ArgumentParser, *, what: str = "model") -> None:
    """What `convert` and `distill` tell the converter, for ``what`` ("model", "student") to be quantized."""
    p.add_argument("--calibration-samples", type=int, default=200,
                   help="representative inputs for int8 calibration (default 200)")
    p.add_argument("--name", help=f"bundle name (default: the {what}'s name)")
    p.add_argument("--version", default="1", help="bundle version (default 1)")
    p.add_argument("--labels", help="class names: comma list or a file with one per line (default: from the data)")
    p.add_argument("--baseline", metavar="OTHER_BUNDLE",
                   help="a previous bundle to compare against (default: majority class)")
    p.add_argument("--force", action="store_true", help="replace BUNDLE_DIR if it exists")
    p.add_argument("--fallback", choices=("ptq", "fail"), default="ptq",
                   help=f"when QAT cannot handle the {what}: convert with PTQ (default) or stop with an error")
    p.add_argument("--runtime", action="append", dest="runtimes", metavar="RUNTIME",
                   help="time this runtime in the report (repeatable; default: every one installed)")
    p.add_argument("--no-progress", action="store_true", help="hide the training progress bars")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def output_and_key(args: argparse.Namespace) -> Optional[Any]:
    """Refuse an existing output (without --force) and load --sign-key, before any slow import or work."""
    from ..convert.bundle import check_output

    check_output(args.output, args.force)
    if not getattr(args, "sign_key", None):
        return None
    from ..fleet.keys import load_signing_key

    return load_signing_key(args.sign_key)


def sign(bundle: Any, key: Optional[Any]) -> None:
    """Sign what was just written."""
    if key is None:
        return
    from ..errors import SigningError
    from ..fleet.keys import sign_bundle

    try:
        r = sign_bundle(bundle, key)
    except SigningError as exc:
        raise SigningError(f"{exc}; the bundle {bundle} is written but not signed: sign it with `edgekit sign`") from exc
    print(f"signed: release {r.release} with key {r.key_id[:16]}... ({r.path / 'signature.json'})")
