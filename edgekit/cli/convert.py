"""``edgekit convert MODEL --data DATA --mode qat|ptq -o BUNDLE_DIR``."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    from ._bundle_options import add_conversion, add_input_range, add_sign_key

    p = subparsers.add_parser(
        "convert",
        help="convert a Keras model to an int8 TFLite bundle (QAT or PTQ) and evaluate it",
        description="Convert a Keras model (.keras, .h5, SavedModel dir, or 'example' to train the example digits CNN) "
        "to a full-integer int8 TFLite bundle, then evaluate float vs int8 on the test split.",
    )
    p.add_argument("model", metavar="MODEL", help="a .keras/.h5 file, a SavedModel directory, or 'example'")
    p.add_argument("--data", required=True, help="'digits', an .npz (x_train, y_train, x_test, y_test), an image folder, "
                   "or photos:DIR (the photo example, written into DIR when missing)")
    p.add_argument("--mode", choices=("qat", "ptq"), default="qat", help="quantization-aware training or post-training (default qat)")
    p.add_argument("-o", "--output", required=True, metavar="BUNDLE_DIR", help="the bundle directory to write")
    p.add_argument("--epochs", type=int, default=3, help="QAT fine-tuning epochs (default 3)")
    p.add_argument("--train-epochs", type=int, default=15, help="epochs to train the 'example' model first (default 15)")
    add_conversion(p)
    add_input_range(p.add_argument_group("input range (default: follows the model; docs/cli-convert.md)"))
    add_sign_key(p)
    g = p.add_argument_group("pruning (docs/shrink.md)")
    g.add_argument("--prune", type=float, metavar="SPARSITY",
                   help="magnitude-prune this fraction of the Conv/Dense weights to zero while fine-tuning, before "
                        "quantizing (within (0, 1), e.g. 0.5); QAT then keeps the zeros")
    g.add_argument("--prune-structure", metavar="MxN",
                   help="structured pruning instead: M zeros in every N consecutive input-channel weights, e.g. 2x4 "
                        "(sparsity M/N; --prune may be left out)")
    g.add_argument("--prune-schedule", choices=("polynomial", "constant"), default="polynomial",
                   help="sparsity grows from 0 over 60%% of the steps (polynomial, default) or starts at the target (constant)")
    g.add_argument("--prune-epochs", type=int, default=4, help="fine-tuning epochs while pruning (default 4)")
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from ._bundle_options import output_and_key, sign

    key = output_and_key(args)  # before the slow imports
    prune = None
    if args.prune is not None or args.prune_structure is not None:
        from ..convert.prune import PruneSpec

        prune = PruneSpec(args.prune, args.prune_structure, schedule=args.prune_schedule, epochs=args.prune_epochs)
    from ..convert.pipeline import convert
    from ..data import is_image_folder, load_dataset

    model = args.model
    image_shape = None
    if model != "example" and is_image_folder(args.data):  # an image folder is resized to the model's input
        from ..convert.load import load_model

        model = load_model(model)
        image_shape = _static_input_shape(model)
    data = load_dataset(args.data, seed=args.seed, image_shape=image_shape)
    if model == "example":
        from ..models import digits_cnn, train

        model = digits_cnn(num_classes=data.num_classes, input_shape=data.input_shape, seed=args.seed)
        print(f"training the example CNN ({model.count_params():,} parameters) on {data.name} for {args.train_epochs} epochs")
        train(model, data, args.train_epochs, seed=args.seed, progress=not args.no_progress)
    result = convert(
        model,
        data,
        mode=args.mode,
        output=args.output,
        epochs=args.epochs,
        calibration_samples=args.calibration_samples,
        name=args.name,
        version=args.version,
        labels=args.labels,
        baseline=args.baseline,
        force=args.force,
        fallback=args.fallback,
        progress=not args.no_progress,
        runtimes=args.runtimes,
        seed=args.seed,
        prune=prune,
        input_range=args.input_range,
        mean=args.mean,
        std=args.std,
    )
    for layer, action in result.fallbacks:
        print(f"fallback: {layer}: {action}")
    print(result.report.to_markdown())
    print(f"bundle: {result.bundle_path}  (report: {result.bundle_path / 'report' / 'report.md'})")
    from ..convert.quantize import coverage_warning

    loud = coverage_warning(result.manifest.quantization)
    print(f"input: {result.manifest.quantization.get('input', {}).get('detail', '?')}")
    for line in (loud, result.report.diagnosis and f"WARNING: {result.report.diagnosis}"):
        if line:  # last, where it is seen after the long report
            print(line)
    sign(result.bundle_path, key)
    return 0


def _static_input_shape(model):
    """The model's input shape without the batch axis, or None when a dimension is unknown."""
    try:
        shape = tuple(model.input_shape[1:])
    except (AttributeError, RuntimeError, TypeError):
        return None
    return shape if shape and all(isinstance(d, int) for d in shape) else None
