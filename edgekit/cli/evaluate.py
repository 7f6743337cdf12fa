"""``edgekit evaluate BUNDLE --data DATA [--float MODEL] [--baseline OTHER_BUNDLE] [--runtime R] [-o DIR]``."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="evaluate an int8 bundle (vs its float model and a baseline) on a data set's test split",
        description="Evaluate a bundle through the interpreter the boards run: top-1, macro F1, per-class precision "
        "and recall, float/int8 agreement, sizes, latency per runtime; writes report.md, report.json and plots.",
    )
    p.add_argument("bundle", metavar="BUNDLE", help="a bundle directory or .tar.gz")
    p.add_argument("--data", required=True, help="'digits', an .npz or an image folder")
    p.add_argument("--float", dest="float_model", metavar="MODEL", help="the float model (.keras/.h5/SavedModel/.tflite)")
    p.add_argument("--baseline", metavar="OTHER_BUNDLE", help="a previous bundle to beat (default: majority class)")
    p.add_argument("--runtime", action="append", dest="runtimes", metavar="RUNTIME",
                   help="runtime to measure (repeatable; default: every one installed)")
    p.add_argument("-o", "--output", metavar="DIR", help="write report.md, report.json and plots here")
    p.add_argument("--force", action="store_true", help="replace DIR if it exists")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0, as convert uses)")
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from ..convert.bundle import atomic_dir, check_output

    if args.output:
        check_output(args.output, args.force)
    from ..data import is_image_folder, load_dataset
    from ..convert.evaluate import evaluate

    image_shape = None
    if is_image_folder(args.data):  # an image folder is decoded and resized as the bundle's boards do it
        from device_agent.update.manifest import load_bundle

        pre = load_bundle(args.bundle).manifest.preprocessing
        image_shape = tuple(pre.shape) if pre.kind == "image" and len(pre.shape) == 3 else None
    data = load_dataset(args.data, seed=args.seed, image_shape=image_shape)
    report = evaluate(args.bundle, data, float_model=args.float_model, baseline=args.baseline, runtimes=args.runtimes)
    if args.output:
        with atomic_dir(args.output, args.force) as tmp:
            report.write(tmp)
    print(report.to_markdown())
    if args.output:
        print(f"report: {args.output}/report.md")
    if report.diagnosis:
        print(f"WARNING: {report.diagnosis}")
    return 0
