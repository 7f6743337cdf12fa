"""``edgekit distill TEACHER --student example|tiny|FILE --data DATA --mode qat|ptq -o BUNDLE_DIR``."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..convert.distill import DEFAULT_ALPHA, DEFAULT_EPOCHS, DEFAULT_TEMPERATURE
    from ._bundle_options import add_conversion, add_input_range, add_sign_key

    p = subparsers.add_parser(
        "distill",
        help="train a small student on a big teacher's soft labels, convert it to an int8 bundle, compare with the "
             "student trained alone",
        description="Knowledge distillation: train the student on the teacher's softened outputs plus the true labels "
                    "(Hinton loss), and the same student alone on the labels as a control (same initial weights, data and "
                    "epochs); convert the distilled student to an int8 bundle exactly as `edgekit convert` does. The report "
                    "puts teacher, control and distilled student (float and int8) side by side and says whether "
                    "distillation beat the control. See docs/shrink.md.",
    )
    p.add_argument("teacher", metavar="TEACHER", help="the teacher: a .keras/.h5 file, a SavedModel directory, or 'example' "
                                                      "(trains the example model on DATA first, --teacher-epochs)")
    p.add_argument("--student", default="tiny", metavar="example|tiny|FILE",
                   help="'tiny' (default: the example CNN at a quarter of its filters, or MobileNetV2 alpha 0.1 for images "
                        "of 32x32 and more), 'example' (the example CNN, or MobileNetV2 alpha 0.35), or a Keras model file "
                        "(trained from the weights it holds)")
    p.add_argument("--data", required=True, help="'digits', an .npz (x_train, y_train, x_test, y_test) or an image folder")
    p.add_argument("--mode", choices=("qat", "ptq"), default="qat", help="quantization of the student (default qat)")
    p.add_argument("-o", "--output", required=True, metavar="BUNDLE_DIR", help="the bundle directory to write")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                   help=f"softens the teacher's and the student's outputs (default {DEFAULT_TEMPERATURE:g})")
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                   help=f"weight of the true labels; the soft targets get 1 - alpha (default {DEFAULT_ALPHA:g})")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS,
                   help=f"training epochs of the student, distilled and alone (default {DEFAULT_EPOCHS})")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="Adam learning rate of the student (default 0.001)")
    p.add_argument("--teacher-epochs", type=int, default=15, help="epochs to train the 'example' teacher (default 15)")
    p.add_argument("--qat-epochs", type=int, default=3, help="QAT fine-tuning epochs of the student (default 3)")
    add_conversion(p, what="student")
    add_input_range(p.add_argument_group("input range (default: follows the teacher; docs/cli-convert.md)"),
                    whose="teacher")
    add_sign_key(p)
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from ._bundle_options import output_and_key, sign

    key = output_and_key(args)  # before the slow imports
    from ..convert.distill import distill
    from ..data import is_image_folder, load_dataset
    from .convert import _static_input_shape

    teacher, image_shape = args.teacher, None
    if teacher != "example" and is_image_folder(args.data):  # pictures are resized to the teacher's input
        from ..convert.load import load_model
        from ..errors import ModelError

        try:
            teacher = load_model(teacher)
        except ModelError as exc:
            raise ModelError(f"teacher: {exc}") from exc
        image_shape = _static_input_shape(teacher)
    data = load_dataset(args.data, seed=args.seed, image_shape=image_shape)
    result = distill(
        teacher, data, output=args.output, student=args.student, mode=args.mode, temperature=args.temperature,
        alpha=args.alpha, epochs=args.epochs, learning_rate=args.learning_rate, teacher_epochs=args.teacher_epochs,
        qat_epochs=args.qat_epochs, calibration_samples=args.calibration_samples, name=args.name, version=args.version,
        labels=args.labels, baseline=args.baseline, force=args.force, fallback=args.fallback,
        progress=not args.no_progress, runtimes=args.runtimes, seed=args.seed, input_range=args.input_range,
        mean=args.mean, std=args.std,
    )
    for layer, action in result.fallbacks:
        print(f"fallback: {layer}: {action}")
    print(result.report.to_markdown())
    t, c = result.arm("teacher"), result.arm("control")
    d, q = result.arm("distilled"), result.arm("distilled", "int8")
    print(f"teacher {100 * t.accuracy:.2f}% ({t.params:,} parameters) | student alone {100 * c.accuracy:.2f}% | "
          f"distilled {100 * d.accuracy:.2f}% float, {100 * q.accuracy:.2f}% int8 ({q.params:,} parameters, "
          f"1/{t.params / max(1, q.params):.1f}; download {q.download_bytes:,} bytes)")
    print("distillation " + ("beats" if result.beats_control else "does NOT beat") + " the student trained alone")
    print(f"bundle: {result.bundle_path}  (report: {result.bundle_path / 'report' / 'report.md'})")
    sign(result.bundle_path, key)
    return 0
