"""``edgekit import MODEL.tflite --labels LABELS [--data DATA] [--input-range R | --mean M --std S] -o BUNDLE``."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from ._bundle_options import add_input_range, add_sign_key

    p = subparsers.add_parser(
        "import",
        help="make a bundle from a .tflite classifier made elsewhere (float or int8)",
        description="Make a bundle from a .tflite image or array classifier exported by another tool (Teachable "
        "Machine, Model Maker, Edge Impulse, TF's converter): tensor specs from the model, preprocessing from the "
        "options (or the range a quantized input covers), softmax or logits from its last op. With --data, the "
        "bundle is evaluated and gets thresholds, reference statistics and a report as `convert` makes them.",
    )
    p.add_argument("model", metavar="MODEL", help="the .tflite file")
    p.add_argument("--labels", required=True,
                   help="class names in output order: comma list or a file with one per line (a Teachable Machine "
                        "labels.txt of '<index> <name>' lines works as it is)")
    p.add_argument("-o", "--output", required=True, metavar="BUNDLE_DIR", help="the bundle directory to write")
    p.add_argument("--data", help="'digits', an .npz, an image folder or photos:DIR (pictures are resized to the model's "
                                       "input) to evaluate on")
    add_input_range(p, whose=None)
    p.add_argument("--name", help="bundle name (default: the file's name)")
    p.add_argument("--version", default="1", help="bundle version (default 1)")
    p.add_argument("--baseline", metavar="OTHER_BUNDLE", help="a previous bundle to compare against (with --data)")
    p.add_argument("--runtime", action="append", dest="runtimes", metavar="RUNTIME",
                   help="time this runtime in the report (repeatable; default: every one installed)")
    p.add_argument("--force", action="store_true", help="replace BUNDLE_DIR if it exists")
    p.add_argument("--seed", type=int, default=0, help="split seed of --data (default 0)")
    add_sign_key(p)
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from ._bundle_options import output_and_key, sign

    key = output_and_key(args)  # before the work
    from ..convert.importer import import_tflite

    result = import_tflite(
        args.model, labels=args.labels, output=args.output, data=args.data, input_range=args.input_range,
        mean=args.mean, std=args.std, name=args.name, version=args.version, baseline=args.baseline,
        runtimes=args.runtimes, force=args.force, seed=args.seed,
    )
    for note in result.notes:
        print(note)
    if result.report is not None:
        print(result.report.to_markdown())
    m = result.manifest
    print(f"bundle: {result.bundle_path}  ({m.name} v{m.version}, {len(m.labels)} labels, input "
          f"{m.input.dtype} {list(m.input.shape)}, output {m.output_activation}, threshold {m.confidence_threshold})")
    sign(result.bundle_path, key)
    return 0
