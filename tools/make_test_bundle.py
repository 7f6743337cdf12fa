"""Regenerate tests/device_agent/data/digits-bundle/ with the real converter.

A narrow digits CNN (so the bundle stays under 100 KB), trained on
scikit-learn's digits, converted with PTQ to full int8. The report is left
out of the test bundle (only model.tflite + manifest.json are kept); the
device tests read this bundle, so its format must stay the released one.

    .venv/bin/python tools/make_test_bundle.py [--out DIR]

The update tests need a second, different model (the agent keys updates on
the model's sha256): a different seed and version make one.

    .venv/bin/python tools/make_test_bundle.py --seed 1 --version 2 \
        --out tests/device_agent/data/digits-bundle-v2
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "tests" / "device_agent" / "data" / "digits-bundle"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--width", type=int, default=16, help="CNN width (16 -> about 22k parameters)")
    parser.add_argument("--seed", type=int, default=0, help="weights and shuffling seed (a new seed, a new model)")
    parser.add_argument("--version", default="1", help="the manifest's version")
    args = parser.parse_args(argv)

    from edgekit.convert import convert
    from edgekit.data import load_dataset
    from edgekit.models import digits_cnn, train

    data = load_dataset("digits")
    model = digits_cnn(width=args.width, seed=args.seed)
    train(model, data, args.epochs, progress=False, seed=args.seed)
    result = convert(model, data, mode="ptq", output=args.out, force=True, name="digits", version=args.version,
                     progress=False)
    shutil.rmtree(args.out / "report", ignore_errors=True)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"{args.out}: {size} bytes, int8 top-1 {100 * result.report.int8.accuracy:.2f}%, "
          f"threshold {result.manifest.confidence_threshold}, margin {result.manifest.margin_threshold}")
    if size >= 100_000:
        print(f"bundle is {size} bytes, over the 100 KB budget; lower --width", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
