"""The point of the loop: which samples a person labels decides what the labels buy.

For each seed, from the 1,797 real digits:

* 800 train the example CNN (edgekit.models), which is converted to int8 with
  QAT (edgekit.convert), as a board would run it;
* 600 form the *pool*: inputs the fleet meets in the field, under a
  distribution shift (edgekit.shift, "field": rotation, translation, contrast,
  noise) the model never saw; nobody has labeled them;
* the other 397 are held out; under the same kind of shift (another seed)
  they are the shifted test set, clean they are the clean test set.

Three orders pick which pool samples a person labels first; each is scored at
several budgets (default 25, 50, 100 and 200 labels, the first N of its order):

* ``random``: uniformly at random (one permutation a seed, so a bigger budget
  holds the smaller one);
* ``low-confidence``: lowest int8 top-1 confidence first, as the agent's policy
  flags them: the int8 bundle through device_agent.inference.interpreter.TFLiteModel
  and device_agent.inference.classify, the board's own code path;
* ``informative``: edgekit.loop.order's Cluster-Margin order, the order
  ``edgekit label`` and ``samples export --order informative`` use: the float
  model's penultimate-layer embedding clustered once, then round-robin over
  clusters in int8-margin order;
* ``informative-thumb`` (with ``--arms``): the same with the cheap thumbnail
  embedding ``edgekit label`` falls back to without a float model.

Each labeled set goes through edgekit.loop.retrain.fine_tune (the code ``edgekit
retrain`` runs) from the same base model; a control fine-tunes with no new labels
(budget 0). Accuracy is top-1 of the fine-tuned float model on the shifted test set.
A label's *gain* is the accuracy over that control. Random is also scored at
``--random-extra`` budgets, so the bench can say how many random labels match
each order's gain at 100 (linear interpolation of the mean curves), and how many
labels the informative order needs to reach random's gain at 100.

The run is slow on a shared machine; run it in parts and summarize together::

    .venv/bin/python bench/bench_loop.py --seeds 5                       # all at once (seeds 10-14)
    .venv/bin/python bench/bench_loop.py --seed-start 10 --seeds 2 --save part1.json
    .venv/bin/python bench/bench_loop.py --seed-start 12 --seeds 3 --save part2.json
    .venv/bin/python bench/bench_loop.py --summarize part1.json part2.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ARMS = ("random", "low-confidence", "informative", "informative-thumb")


def _ints(text: str) -> List[int]:
    return sorted({int(v) for v in text.split(",") if v.strip()})


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=5, help="repetitions, each with its own split, model and shift (default 5)")
    p.add_argument("--seed-start", type=int, default=10,
                   help="first seed (run the bench in parts; default 10: seeds 0-4 chose edgekit.loop.order's "
                        "cluster size and window, so the figures come from others)")
    p.add_argument("--budgets", type=_ints, default=[25, 50, 100, 200], help="labels per arm, comma-separated "
                                                                             "(default 25,50,100,200)")
    p.add_argument("--random-extra", type=_ints, default=[300, 400],
                   help="more budgets for random only, to find what matches the other arms (default 300,400)")
    p.add_argument("--arms", default="random,low-confidence,informative",
                   help=f"comma-separated, of {','.join(ARMS)} (default random,low-confidence,informative)")
    p.add_argument("--pool", type=int, default=600, help="unlabeled shifted inputs to choose from (default 600)")
    p.add_argument("--train", type=int, default=800, help="inputs the base model trains on (default 800)")
    p.add_argument("--shift", default="field", help="edgekit.shift.SHIFTS name (default field)")
    p.add_argument("--severity", type=float, default=1.0, help="scale the shift (default 1)")
    p.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs (default 10)")
    p.add_argument("--feedback-share", type=float, default=0.5, help="fine_tune's feedback share per epoch (default 0.5)")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="fine_tune's Adam learning rate (default 0.001)")
    p.add_argument("--base-epochs", type=int, default=15, help="epochs to train the base model (default 15)")
    p.add_argument("--qat-epochs", type=int, default=1, help="QAT epochs of the base model's int8 conversion (default 1)")
    p.add_argument("--cluster-size", type=float, default=None, help="informative: samples per cluster (default: "
                                                                    "edgekit.loop.order's)")
    p.add_argument("--cm-batch", type=int, default=None, help="informative: batch (default: edgekit.loop.order's)")
    p.add_argument("--cm-window", type=int, default=None, help="informative: window (default: edgekit.loop.order's)")
    p.add_argument("--save", metavar="JSON", help="write the per-seed results here (to summarize parts together)")
    p.add_argument("--summarize", nargs="+", metavar="JSON", help="print the summary of saved parts and exit")
    args = p.parse_args(argv)
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in args.arms if a not in ARMS]
    if bad:
        p.error(f"--arms: unknown {bad}; choose from {list(ARMS)}")
    return args


def int8_predictions(bundle_path: Path, x_raw: np.ndarray):
    """(confidence, margin, top-k scores by class) of each input, the way the agent computes them on the board."""
    from device_agent.inference.classify import classify
    from device_agent.inference.interpreter import TFLiteModel
    from device_agent.inference.preprocess import preprocess
    from device_agent.update.manifest import load_bundle

    b = load_bundle(bundle_path)
    m = b.manifest
    conf, margin, scores = [], [], np.zeros((len(x_raw), len(m.labels)))
    with TFLiteModel.open(b.model_path) as model:
        for i, r in enumerate(x_raw):
            pred = classify(model(preprocess(r, m.preprocessing)), m.labels, m.output_activation)
            conf.append(pred.confidence)
            margin.append(pred.margin)
            for k in pred.top_k:
                scores[i, k.index] = k.score
    return np.array(conf), np.array(margin), scores


def orders(args, model, ds, x_pool, conf, margin, scores, seed) -> Dict[str, np.ndarray]:
    from edgekit.loop.order import cluster, cluster_margin_order, penultimate_model, thumbnail_features

    rng = np.random.default_rng(seed)
    out = {"random": rng.permutation(len(x_pool)), "low-confidence": np.argsort(conf, kind="stable")}
    cm = {k: v for k, v in (("batch", args.cm_batch), ("window", args.cm_window)) if v}
    csize = {"cluster_size": args.cluster_size} if args.cluster_size else {}
    if "informative" in args.arms:
        emb = penultimate_model(model).predict(ds.model_inputs(x_pool), verbose=0, batch_size=256)
        out["informative"] = cluster_margin_order(margin, cluster(emb, seed=seed, **csize), **cm)
    if "informative-thumb" in args.arms:
        emb = thumbnail_features(list(x_pool), scores)
        out["informative-thumb"] = cluster_margin_order(margin, cluster(emb, seed=seed, **csize), **cm)
    return out


def one_seed(seed: int, args: argparse.Namespace, x: np.ndarray, y: np.ndarray, full) -> dict:
    from edgekit.convert import convert
    from edgekit.data import Dataset
    from edgekit.loop.retrain import fine_tune
    from edgekit.models import digits_cnn, train
    from edgekit.shift import apply_shift, get_shift

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    tr, pool, te = order[: args.train], order[args.train: args.train + args.pool], order[args.train + args.pool:]
    ds = Dataset(x[tr], y[tr], x[te], y[te], full.labels, full.preprocessing, f"digits-{seed}")
    shift = get_shift(args.shift).scaled(args.severity)
    t0 = time.perf_counter()
    model = digits_cnn(seed=seed)
    train(model, ds, args.base_epochs, seed=seed, progress=False)
    x_pool = np.round(apply_shift(x[pool], shift, seed=seed))  # what a camera hands the board: whole pixel values
    y_pool = y[pool]
    with tempfile.TemporaryDirectory(prefix="bench-loop-") as tmp:
        res = convert(model, ds, mode="qat", output=Path(tmp) / "v1", epochs=args.qat_epochs, progress=False,
                      report=False, seed=seed, runtimes=["ai_edge_litert"])
        conf, margin, scores = int8_predictions(res.bundle_path, x_pool)
    x_test = np.round(apply_shift(x[te], shift, seed=seed + 10_000))
    picks = orders(args, model, ds, x_pool, conf, margin, scores, seed)

    def acc(idx: np.ndarray) -> float:
        tuned, _ = fine_tune(model, ds.model_inputs(ds.x_train), ds.y_train, ds.model_inputs(x_pool[idx]),
                             y_pool[idx], epochs=args.epochs, feedback_share=args.feedback_share,
                             learning_rate=args.learning_rate, seed=seed)
        pred = tuned.predict(ds.model_inputs(x_test), verbose=0, batch_size=256).argmax(1)
        return float(np.mean(pred == y[te]))

    base = float(np.mean(model.predict(ds.model_inputs(x_test), verbose=0, batch_size=256).argmax(1) == y[te]))
    out = {"seed": seed, "before": base, "none": acc(np.array([], dtype=np.int64)), "acc": {}, "wrong": {}}
    pred_pool = scores.argmax(1)
    for arm in args.arms:
        budgets = sorted(set(args.budgets) | (set(args.random_extra) if arm == "random" else set()))
        for b in budgets:
            idx = picks[arm][: min(b, len(x_pool))]
            out["acc"][f"{arm}@{b}"] = acc(idx)
            # what the labels were spent on: how many were inputs the board got wrong
            out["wrong"][f"{arm}@{b}"] = float(np.mean(pred_pool[idx] != y_pool[idx]))
    out["seconds"] = time.perf_counter() - t0
    return out


def _interp_budget(curve: Dict[int, float], target: float) -> Optional[float]:
    """The smallest budget where the piecewise-linear curve (budget -> gain) first reaches target."""
    pts = sorted(curve.items())
    for (b0, g0), (b1, g1) in zip(pts, pts[1:]):
        if g0 >= target:
            return float(b0)
        if g1 >= target:
            return b0 + (b1 - b0) * (target - g0) / (g1 - g0)
    return float(pts[-1][0]) if pts and pts[-1][1] >= target else None


def summarize(rows: Sequence[dict], budgets: Sequence[int], arms: Sequence[str]) -> None:
    n = len(rows)

    def mean_sd(values: Sequence[float]) -> str:
        v = np.array(values, dtype=float)
        return f"{v.mean():.3f} +- {v.std(ddof=1) if len(v) > 1 else 0.0:.3f}"

    print(f"\naccuracy on the shifted test set, mean +- std over {n} seeds "
          f"(before retraining {mean_sd([r['before'] for r in rows])}, "
          f"fine-tuned with no labels {mean_sd([r['none'] for r in rows])}):")
    all_b = sorted({int(k.split("@")[1]) for r in rows for k in r["acc"]})
    print(f"{'labels':>8} " + " ".join(f"{a:>21}" for a in arms))
    for b in all_b:
        cells = []
        for a in arms:
            vals = [r["acc"].get(f"{a}@{b}") for r in rows]
            cells.append(f"{mean_sd([v for v in vals if v is not None]):>21}" if all(v is not None for v in vals)
                         else f"{'':>21}")
        print(f"{b:>8} " + " ".join(cells))

    def curve(arm: str) -> Dict[int, float]:
        pts = {0: 0.0}
        for b in all_b:
            vals = [r["acc"].get(f"{arm}@{b}") for r in rows]
            if all(v is not None for v in vals):
                pts[b] = float(np.mean([v - r["none"] for v, r in zip(vals, rows)]))
        return pts

    curves = {a: curve(a) for a in arms}
    print("\ngain over the no-label control (mean), and the share of picks the board had got wrong:")
    for a in arms:
        cells = "  ".join(f"@{b}: {curves[a][b]:+.3f} ({np.mean([r['wrong'][f'{a}@{b}'] for r in rows]):.0%} wrong)"
                          for b in sorted(curves[a]) if b)
        print(f"  {a:<18} {cells}")
    if 100 not in curves.get("random", {}):
        return
    top = max(curves["random"])
    print("\nrandom labels needed to match each order's gain at 100 labels:")
    for a in arms:
        if 100 not in curves[a]:
            continue
        need = _interp_budget(curves["random"], curves[a][100])
        text = f"{need:.0f}" if need is not None else f"more than {top} (random's best, at {top}, is " \
                                                      f"{curves['random'][top]:+.3f})"
        ratio = f" ({need / 100:.1f}x)" if need is not None else ""
        print(f"  {a:<18} gain {curves[a][100]:+.3f} at 100 -> random needs {text}{ratio}")
    target = curves["random"][100]
    print(f"\nlabels each order needs to reach random's gain at 100 ({target:+.3f}); target for informative: <= 33:")
    for a in arms:
        need = _interp_budget(curves[a], target)
        print(f"  {a:<18} {'%.0f' % need if need is not None else 'not reached within ' + str(max(curves[a]))}"
              + (f" labels ({need / 100:.2f} of random's)" if need is not None else ""))


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.summarize:
        rows = [row for path in args.summarize for row in json.loads(Path(path).read_text())["rows"]]
        arms = [a for a in ARMS if any(k.startswith(a + "@") for r in rows for k in r["acc"])]
        summarize(rows, args.budgets, arms)
        return 0
    from edgekit.data import load_dataset
    from edgekit.shift import get_shift

    full = load_dataset("digits")
    x = np.concatenate([full.x_train, full.x_test])
    y = np.concatenate([full.y_train, full.y_test])
    if args.train + args.pool >= len(x) - 50:
        print(f"--train {args.train} + --pool {args.pool} leave too few of {len(x)} digits to test on", file=sys.stderr)
        return 2
    shift = get_shift(args.shift).scaled(args.severity)
    print(f"loop bench: budgets {args.budgets} (random also {args.random_extra}) from a pool of {args.pool} shifted "
          f"inputs ({shift.describe()}), base model on {args.train} digits, test on "
          f"{len(x) - args.train - args.pool} held-out digits under the shift, fine-tune {args.epochs} epochs at "
          f"lr {args.learning_rate:g}, feedback share {args.feedback_share}; arms {', '.join(args.arms)}")
    rows = []
    for seed in range(args.seed_start, args.seed_start + args.seeds):
        r = one_seed(seed, args, x, y, full)
        rows.append(r)
        cells = " ".join(f"{k}={v:.3f}" for k, v in r["acc"].items() if int(k.split("@")[1]) in args.budgets)
        print(f"seed {seed}: before {r['before']:.3f}, no labels {r['none']:.3f}; {cells} ({r['seconds']:.0f} s)",
              flush=True)
        if args.save:
            Path(args.save).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1, default=str))
    summarize(rows, args.budgets, args.arms)
    return 0


if __name__ == "__main__":
    sys.exit(main())
