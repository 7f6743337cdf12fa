"""``edgekit samples list|show|label|export``: look at, relabel and export what the fleet flagged."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone


def register(sub: argparse._SubParsersAction) -> None:
    from ..loop.store import DEFAULT_STORE

    p = sub.add_parser("samples", help="list, show, label and export collected samples")
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])
    cmds = p.add_subparsers(dest="samples_command", metavar="ACTION")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--store", default=DEFAULT_STORE, help=f"sqlite:///path.db or postgresql://... (default {DEFAULT_STORE})")

    def filters(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--device")
        sp.add_argument("--fleet")
        sp.add_argument("--model-version")
        sp.add_argument("--reason", choices=["low_confidence", "low_margin", "random", "manual"])
        sp.add_argument("--max-confidence", type=float)
        sp.add_argument("--min-confidence", type=float)

    ls = cmds.add_parser("list", help="one line per sample (or one JSON object per line with --json)")
    common(ls)
    filters(ls)
    g = ls.add_mutually_exclusive_group()
    g.add_argument("--labeled", dest="labeled", action="store_const", const=True, default=None)
    g.add_argument("--unlabeled", dest="labeled", action="store_const", const=False)
    ls.add_argument("--limit", type=int)
    ls.add_argument("--json", action="store_true", help="one JSON object per sample, a line each")
    ls.set_defaults(func=_list)

    show = cmds.add_parser("show", help="one sample's details and its input (ASCII art, or --image PNG)")
    common(show)
    show.add_argument("sample_id")
    show.add_argument("--image", metavar="PNG", help="write the input as an image file")
    show.add_argument("--scale", type=int, default=8, help="upscale factor for --image (default 8)")
    show.set_defaults(func=_show)

    lab = cmds.add_parser("label", help="label one sample (ID LABEL) or many (--csv FILE of id,label)")
    common(lab)
    lab.add_argument("sample_id", nargs="?")
    lab.add_argument("label", nargs="?")
    lab.add_argument("--csv", metavar="FILE", help="a CSV of id,label rows")
    lab.add_argument("--by", default="cli", help="who labeled (kept with the label)")
    lab.set_defaults(func=_label)

    ex = cmds.add_parser("export", help="write labeled samples as .npz (for edgekit convert --data) or a class folder")
    common(ex)
    filters(ex)
    ex.add_argument("-o", "--output", required=True)
    ex.add_argument("--format", choices=["npz", "folder"], default=None, help="default: npz when OUTPUT ends in .npz")
    ex.add_argument("--labels", help="comma-separated class names in index order")
    ex.add_argument("--bundle", help="take the class names from this bundle's manifest (default: the order the "
                                     "stored predictions show, which misses classes the model never predicted)")
    ex.add_argument("--test-fraction", type=float, default=None,
                    help="share held out as x_test (npz default 0.2, as `edgekit convert --data` needs both splits; "
                         "folder default 0)")
    ex.add_argument("--seed", type=int, default=0)
    ex.add_argument("--include-unlabeled", action="store_true", help="npz only: unlabeled samples get y=-1")
    ex.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    ex.set_defaults(func=_export)


def _filters(args: argparse.Namespace) -> dict:
    return {k: v for k, v in {
        "device": args.device, "fleet": args.fleet, "model_version": args.model_version, "reason": args.reason,
        "max_confidence": args.max_confidence, "min_confidence": args.min_confidence,
    }.items() if v is not None}


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _list(args: argparse.Namespace) -> int:
    from ..loop.store import open_store

    with open_store(args.store) as store:
        records = store.list_samples(labeled=args.labeled, limit=args.limit, **_filters(args))
    if args.json:
        for r in records:
            print(json.dumps(r.to_dict(), sort_keys=True))
        return 0
    print(f"{'sample_id':36}  {'device':16} {'model':10} {'pred':>8} {'conf':>6} {'label':>8}  reasons")
    for r in records:
        print(f"{r.sample_id:36}  {r.device[:16]:16} {r.model_version[:10]:10} {r.label_pred[:8]:>8} "
              f"{r.confidence:6.3f} {(r.label or '-')[:8]:>8}  {','.join(r.reasons)}")
    print(f"{len(records)} sample(s)", file=sys.stderr)
    return 0


def _show(args: argparse.Namespace) -> int:
    from ..loop.samples import render_ascii, save_image
    from ..loop.store import open_store

    with open_store(args.store) as store:
        r = store.get_sample(args.sample_id)
    d = r.to_dict()
    print(f"sample {r.sample_id}  device {r.fleet}/{r.device} seq {r.seq} at {_when(r.ts)} UTC")
    print(f"model {r.model_name} {r.model_version}  predicted {r.label_pred!r} confidence {r.confidence:.3f} "
          f"margin {r.margin:.3f} entropy {r.entropy:.3f}  reasons {','.join(r.reasons)}")
    top = ", ".join("{}:{:.3f}".format(k.get("label"), float(k.get("score", 0))) for k in r.top_k)
    print(f"top-k {top or '-'}")
    print(f"label {r.label or '(none)'}" + (f" by {r.labeled_by}" if r.labeled_by else ""))
    print(f"input {d['input']['dtype']} {d['input']['shape']}  source {json.dumps(r.source)}")
    if args.image:
        print(f"wrote {save_image(r, args.image, scale=args.scale)}")
    else:
        print(render_ascii(r.array()))
    return 0


def _label(args: argparse.Namespace) -> int:
    from ..errors import DataError
    from ..loop.samples import import_labels_csv
    from ..loop.store import open_store

    if args.csv and (args.sample_id or args.label):
        raise DataError("give either ID LABEL or --csv FILE, not both")
    if not args.csv and not (args.sample_id and args.label):
        raise DataError("give ID LABEL, or --csv FILE with id,label rows")
    with open_store(args.store) as store:
        if args.csv:
            n = import_labels_csv(store, args.csv, by=args.by)
        else:
            store.set_label(args.sample_id, args.label, by=args.by)
            n = 1
    print(f"labeled {n} sample(s)")
    return 0


def _export(args: argparse.Namespace) -> int:
    from ..errors import DataError
    from ..loop.samples import export
    from ..loop.store import open_store

    fmt = args.format or ("npz" if args.output.endswith(".npz") else "folder")
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    if args.bundle:
        from device_agent.update.manifest import load_bundle

        if labels:
            raise DataError("give --labels or --bundle, not both")
        labels = list(load_bundle(args.bundle).manifest.labels)
    with open_store(args.store) as store:
        out = export(store, args.output, fmt=fmt, labels=labels, test_fraction=args.test_fraction,
                     labeled_only=not args.include_unlabeled, seed=args.seed, force=args.force, **_filters(args))
    print(f"wrote {out}")
    if labels is None and fmt == "npz":
        import numpy as np

        with np.load(out) as z:
            inferred = [str(x) for x in z["labels"]]
        print(f"note: class names taken from the stored predictions ({len(inferred)}: {','.join(inferred)}); classes the "
              "model never predicted are missing, so pass --bundle DIR (or --labels) to keep the model's classes and "
              "their order", file=sys.stderr)
    return 0
