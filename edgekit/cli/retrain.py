"""``edgekit retrain BUNDLE --float-model MODEL --data ORIGINAL --feedback STORE -o NEW_BUNDLE``."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from ._bundle_options import add_sign_key

    p = subparsers.add_parser(
        "retrain",
        help="fine-tune on the original data plus labeled feedback, convert (QAT, int8) and compare with the current bundle",
        description="Fine-tune the float model on the original data plus the labeled samples of a store, run QAT and "
        "convert to int8 with the version bumped, then compare the new bundle with the current one on held-out data "
        "(the original test split and held-out feedback, reported apart). The report says 'promote' or 'do not promote'.",
    )
    p.add_argument("bundle", metavar="BUNDLE", help="the current bundle (directory or .tar.gz): the baseline to beat")
    p.add_argument("--float-model", metavar="MODEL",
                   help="the float Keras model the bundle came from (.keras, .h5, SavedModel; default: the "
                        "float_model.keras that convert and retrain keep in the bundle directory)")
    p.add_argument("--data", required=True, metavar="ORIGINAL", help="the original data: 'digits', an .npz or an image folder")
    p.add_argument("--feedback", required=True, metavar="STORE_URL",
                   help="the sample store with labeled samples: sqlite:///path.db or postgresql://...")
    p.add_argument("-o", "--output", required=True, metavar="NEW_BUNDLE", help="the new bundle directory to write")
    p.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs (default 10)")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="Adam learning rate for fine-tuning (default 0.001)")
    p.add_argument("--qat-epochs", type=int, default=3, help="quantization-aware training epochs after fine-tuning (default 3)")
    p.add_argument("--freeze", type=int, default=0, metavar="N", help="keep the first N layers' weights (default 0)")
    p.add_argument("--holdout-fraction", type=float, default=0.3, metavar="F",
                   help="share of the feedback held out to judge the new model, split by sample id (default 0.3)")
    p.add_argument("--feedback-share", type=float, default=0.5, metavar="F",
                   help="the feedback is repeated to make up about this share of each epoch (default 0.5)")
    p.add_argument("--max-regression", type=float, default=1.0, metavar="POINTS",
                   help="accuracy points the new model may lose on the original test split and still be promoted (default 1)")
    p.add_argument("--version", help="the new version (default: the current one bumped, 1 -> 2, 1.3 -> 1.4)")
    p.add_argument("--seed", type=int, default=0, help="random seed, also for splitting the original data (default 0)")
    p.add_argument("--force", action="store_true", help="replace NEW_BUNDLE if it exists")
    p.add_argument("--no-progress", action="store_true", help="hide the training progress bars")
    add_sign_key(p)
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from ._bundle_options import output_and_key, sign

    key = output_and_key(args)  # before the slow imports
    from ..loop.retrain import retrain

    result = retrain(
        args.bundle, float_model=args.float_model, data=args.data, feedback=args.feedback, output=args.output,
        epochs=args.epochs, qat_epochs=args.qat_epochs, freeze=args.freeze, holdout_fraction=args.holdout_fraction,
        feedback_share=args.feedback_share, learning_rate=args.learning_rate, max_regression=args.max_regression, version=args.version,
        seed=args.seed, force=args.force, progress=not args.no_progress,
    )
    print(result.report_path.read_text(encoding="utf-8"))
    print(f"bundle v{result.version}: {result.bundle_path}  (report: {result.report_path}, "
          f"float model for the next retrain: {result.float_model_path})")
    print(f"verdict: {result.verdict.word}")
    sign(result.bundle_path, key)
    return 0
