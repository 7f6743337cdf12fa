"""The point of the loop: labels spent on the board's low-confidence samples buy more than random ones.

For each seed, from the 1,797 real digits:

* 800 train the example CNN (edgekit.models), which is converted to int8 with
  QAT (edgekit.convert), as a board would run it;
* 600 form the *pool*: inputs the fleet meets in the field, under a
  distribution shift (edgekit.shift, "field": rotation, translation, contrast,
  noise) the model never saw; nobody has labeled them;
* the other 397 are held out; under the same kind of shift (another seed)
  they are the shifted test set, clean they are the clean test set.

With the same labeling budget (default 100) two strategies pick from the pool:

* ``low-confidence``: the budget lowest int8 confidences, as the agent's policy
  flags them: the int8 bundle through device_agent.inference.interpreter.TFLiteModel
  and device_agent.inference.classify, the board's own code path;
* ``random``: the same number chosen uniformly.

Each labeled set goes through edgekit.loop.retrain.fine_tune (the code `edgekit
retrain` runs) from the same base model; a third arm fine-tunes with no new
labels, to show what the labels add. Accuracy is top-1 of the fine-tuned float
model on the held-out shifted test set (and on the clean one); with ``--int8``
each fine-tuned model is also converted with QAT on the same mix, as ``edgekit
retrain`` does, and the int8 bundle is scored through the board's interpreter.

    .venv/bin/python bench/bench_loop.py [--seeds 5] [--budget 100] [--epochs 10] [--int8]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=5, help="repetitions, each with its own split, model and shift (default 5)")
    p.add_argument("--budget", type=int, default=100, help="labels each strategy may spend (default 100)")
    p.add_argument("--pool", type=int, default=600, help="unlabeled shifted inputs to choose from (default 600)")
    p.add_argument("--train", type=int, default=800, help="inputs the base model trains on (default 800)")
    p.add_argument("--shift", default="field", help="edgekit.shift.SHIFTS name (default field)")
    p.add_argument("--severity", type=float, default=1.0, help="scale the shift (default 1)")
    p.add_argument("--clean-fraction", type=float, default=0.0,
                   help="share of the pool left unshifted, as a fleet also sees ordinary inputs (default 0)")
    p.add_argument("--random-mix", type=float, default=0.0,
                   help="share of the low-confidence budget spent on random picks, as the policy's random_fraction (default 0)")
    p.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs (default 10)")
    p.add_argument("--feedback-share", type=float, default=0.5, help="fine_tune's feedback share per epoch (default 0.5)")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="fine_tune's Adam learning rate (default 0.001)")
    p.add_argument("--int8", action="store_true",
                   help="also convert each fine-tuned model with QAT (as edgekit retrain does) and score the int8 bundle")
    p.add_argument("--base-epochs", type=int, default=15, help="epochs to train the base model (default 15)")
    p.add_argument("--qat-epochs", type=int, default=1, help="QAT epochs of the base model's int8 conversion (default 1)")
    return p.parse_args(argv)


def int8_confidence(bundle_path: Path, x_raw: np.ndarray) -> np.ndarray:
    """Top-1 confidence of each input, the way the agent computes it on the board."""
    from device_agent.inference.classify import classify
    from device_agent.inference.interpreter import TFLiteModel
    from device_agent.update.manifest import load_bundle
    from device_agent.inference.preprocess import preprocess

    b = load_bundle(bundle_path)
    m = b.manifest
    with TFLiteModel.open(b.model_path) as model:
        return np.array([classify(model(preprocess(r, m.preprocessing)), m.labels, m.output_activation).confidence
                         for r in x_raw])


def one_seed(seed: int, args: argparse.Namespace, x: np.ndarray, y: np.ndarray, full) -> dict:
    from edgekit.convert import convert
    from edgekit.data import Dataset
    from edgekit.models import digits_cnn, train
    from edgekit.loop.retrain import fine_tune
    from edgekit.shift import apply_shift, get_shift

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    tr, pool, te = order[: args.train], order[args.train: args.train + args.pool], order[args.train + args.pool:]
    ds = Dataset(x[tr], y[tr], x[te], y[te], full.labels, full.preprocessing, f"digits-{seed}")
    shift = get_shift(args.shift).scaled(args.severity)
    t0 = time.perf_counter()
    model = digits_cnn(seed=seed)
    train(model, ds, args.base_epochs, seed=seed, progress=False)
    with tempfile.TemporaryDirectory(prefix="bench-loop-") as tmp:
        res = convert(model, ds, mode="qat", output=Path(tmp) / "v1", epochs=args.qat_epochs, progress=False,
                      report=False, seed=seed, runtimes=["ai_edge_litert"])
        x_pool = apply_shift(x[pool], shift, seed=seed)
        n_clean = int(round(args.clean_fraction * len(pool)))
        x_pool[:n_clean] = x[pool][:n_clean]
        x_pool = np.round(x_pool)  # what a camera hands the board: whole pixel values
        y_pool = y[pool]
        conf = int8_confidence(res.bundle_path, x_pool)
    x_shift_test = np.round(apply_shift(x[te], shift, seed=seed + 10_000))
    n_mix = int(round(args.random_mix * args.budget))
    low = np.argsort(conf, kind="stable")[: args.budget - n_mix]
    if n_mix:
        rest = np.setdiff1d(np.arange(len(pool)), low)
        low = np.concatenate([low, rng.choice(rest, n_mix, replace=False)])
    rand = rng.choice(len(pool), args.budget, replace=False)

    def acc(m, xs, ys) -> float:
        return float(np.mean(m.predict(ds.model_inputs(xs), verbose=0, batch_size=256).argmax(1) == ys))

    out = {"seed": seed, "base": acc(model, x_shift_test, y[te]), "base_clean": acc(model, x[te], y[te]),
           "pool_confidence_low": float(conf[low].mean()), "pool_confidence_random": float(conf[rand].mean())}
    arms = {"low": low, "random": rand, "none": np.array([], dtype=np.int64)}
    for name, idx in arms.items():
        tuned, info = fine_tune(model, ds.model_inputs(ds.x_train), ds.y_train, ds.model_inputs(x_pool[idx]),
                                y_pool[idx], epochs=args.epochs, feedback_share=args.feedback_share,
                                learning_rate=args.learning_rate, seed=seed)
        out[name] = acc(tuned, x_shift_test, y[te])
        out[name + "_clean"] = acc(tuned, x[te], y[te])
        out[name + "_shifted_picked"] = float(np.mean(idx >= n_clean)) if len(idx) else 0.0
        if args.int8 and name != "none":
            from edgekit.loop.retrain import bundle_accuracy

            k = max(1, info["feedback_repeats"])
            mixed = Dataset(np.concatenate([ds.x_train] + [x_pool[idx]] * k),
                            np.concatenate([ds.y_train] + [y_pool[idx]] * k), ds.x_test, ds.y_test,
                            ds.labels, ds.preprocessing, ds.name)
            with tempfile.TemporaryDirectory(prefix="bench-loop-") as tmp:
                b = convert(tuned, mixed, mode="qat", output=Path(tmp) / name, epochs=3, progress=False,
                            report=False, seed=seed, runtimes=["ai_edge_litert"]).bundle_path
                out[name + "_int8"] = bundle_accuracy(b, x_shift_test, y[te])
    out["seconds"] = time.perf_counter() - t0
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from edgekit.data import load_dataset
    from edgekit.shift import get_shift

    full = load_dataset("digits")
    x = np.concatenate([full.x_train, full.x_test])
    y = np.concatenate([full.y_train, full.y_test])
    if args.train + args.pool >= len(x) - 50:
        print(f"--train {args.train} + --pool {args.pool} leave too few of {len(x)} digits to test on", file=sys.stderr)
        return 2
    shift = get_shift(args.shift).scaled(args.severity)
    print(f"loop bench: budget {args.budget} labels from a pool of {args.pool} "
          f"({100 * (1 - args.clean_fraction):.0f}% shifted: {shift.describe()}), "
          f"base model on {args.train} digits, test on {len(x) - args.train - args.pool} held-out digits, "
          f"fine-tune {args.epochs} epochs at lr {args.learning_rate:g}, feedback share {args.feedback_share}, "
          f"random mix {args.random_mix}")
    print(f"{'seed':>4} {'before':>7} {'low-conf':>9} {'random':>7} {'no labels':>9} {'low-random':>10} "
          f"{'clean: low':>10} {'random':>7} {'conf picked low/rand':>21} {'s':>4}")
    rows = []
    for seed in range(args.seeds):
        r = one_seed(seed, args, x, y, full)
        rows.append(r)
        print(f"{seed:>4} {r['base']:>7.3f} {r['low']:>9.3f} {r['random']:>7.3f} {r['none']:>9.3f} "
              f"{r['low'] - r['random']:>+10.3f} {r['low_clean']:>10.3f} {r['random_clean']:>7.3f} "
              f"{r['pool_confidence_low']:>10.2f}/{r['pool_confidence_random']:.2f} {r['seconds']:>4.0f}", flush=True)

    def ms(key: str) -> str:
        v = np.array([r[key] for r in rows])
        return f"{v.mean():.3f} +- {v.std(ddof=1) if len(v) > 1 else 0.0:.3f}"

    diff = np.array([r["low"] - r["random"] for r in rows])
    wins = int(np.sum(diff > 0))
    print()
    print(f"accuracy on the shifted test set, mean +- std over {len(rows)} seeds:")
    print(f"  before retraining            {ms('base')}")
    print(f"  no new labels (control)      {ms('none')}")
    print(f"  {args.budget} random labels            {ms('random')}")
    print(f"  {args.budget} low-confidence labels    {ms('low')}")
    print(f"  low-confidence - random      {diff.mean():+.3f} +- {diff.std(ddof=1) if len(diff) > 1 else 0.0:.3f} "
          f"(low-confidence ahead in {wins}/{len(rows)} seeds)")
    print(f"clean test set: before {ms('base_clean')}, random {ms('random_clean')}, low-confidence {ms('low_clean')}")
    if args.int8:
        d8 = np.array([r["low_int8"] - r["random_int8"] for r in rows])
        print(f"int8 after QAT (3 epochs, same mix), shifted test set: random {ms('random_int8')}, "
              f"low-confidence {ms('low_int8')}, difference {d8.mean():+.3f} +- "
              f"{d8.std(ddof=1) if len(d8) > 1 else 0.0:.3f} (ahead in {int(np.sum(d8 > 0))}/{len(rows)} seeds)")
    if args.clean_fraction:
        print(f"shifted share of the picks: low-confidence {ms('low_shifted_picked')}, random {ms('random_shifted_picked')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
