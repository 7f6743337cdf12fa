"""``edgekit samples list|show|label|export``: look at, relabel and export what the fleet flagged."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone


def register(sub: argparse._SubParsersAction) -> None:
    from ..loop.interchange import IMPORT_FORMATS
    from ..loop.order import ORDERS
    from ..loop.store import DEFAULT_STORE
    from .label import parse_since

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
        sp.add_argument("--since", type=parse_since, metavar="WHEN",
                        help="received since WHEN: 2024-05-01, 2024-05-01T13:00 (UTC), or 90m / 12h / 7d ago")

    def ordering(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--order", choices=ORDERS, default="arrival",
                        help="informative: most useful to label first (Cluster-Margin, as `edgekit label`); margin, "
                             "confidence: lowest first; arrival (default); random")
        sp.add_argument("--float-model", help="--order informative: the Keras model the --bundle came from, when its "
                                              "float_model.keras is not beside it")

    ls = cmds.add_parser("list", help="one line per sample (or one JSON object per line with --json)")
    common(ls)
    filters(ls)
    g = ls.add_mutually_exclusive_group()
    g.add_argument("--labeled", dest="labeled", action="store_const", const=True, default=None)
    g.add_argument("--unlabeled", dest="labeled", action="store_const", const=False)
    ls.add_argument("--limit", type=int)
    ordering(ls)
    ls.add_argument("--bundle", help="--order informative: order by this bundle's float model's features")
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

    ex = cmds.add_parser("export", help="write labeled samples as .npz (for edgekit convert --data) or a class folder; "
                                        "or samples to label for Label Studio, FiftyOne or a CSV")
    common(ex)
    filters(ex)
    ex.add_argument("-o", "--output", required=True)
    ex.add_argument("--format", choices=["npz", "folder", "label-studio", "fiftyone", "csv"], default=None,
                    help="npz / folder: labeled samples as training data (default: npz when OUTPUT ends in .npz, "
                         "else folder); label-studio / fiftyone / csv: samples to label, the model's prediction as "
                         "a pre-annotation (docs/labeling.md)")
    g = ex.add_mutually_exclusive_group()
    g.add_argument("--labeled", dest="labeled", action="store_const", const=True, default=None,
                   help="labeled samples only (npz / folder default)")
    g.add_argument("--unlabeled", dest="labeled", action="store_const", const=False,
                   help="unlabeled samples only (label-studio / fiftyone / csv default)")
    g.add_argument("--all", dest="labeled", action="store_const", const="all",
                   help="label-studio / fiftyone / csv: labeled and unlabeled")
    ordering(ex)
    ex.add_argument("--limit", type=int, help="the first N samples of --order only")
    ex.add_argument("--image-url", metavar="PREFIX",
                    help="label-studio: images as files under OUTPUT/images/, referenced as PREFIX<sample_id>.png "
                         "(e.g. /data/local-files/?d=edgekit/images/); default: embedded as data URIs")
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

    im = cmds.add_parser("import", help="label samples from a Label Studio, FiftyOne, CSV or class-folder export")
    common(im)
    im.add_argument("path", help="Label Studio JSON / JSON-MIN export, FiftyOne labels.json (or its folder), a CSV "
                                 "with sample_id,label columns, or a class-folder tree / .zip (CVAT ImageNet)")
    im.add_argument("--format", choices=IMPORT_FORMATS, default=None, help="default: from the path")
    im.add_argument("--by", help="who labelled (default: what the tool says, e.g. label-studio:<annotator>)")
    im.add_argument("--bundle", help="check every label is one of this bundle's classes")
    im.add_argument("--labels", help="comma-separated class names to check the labels against")
    im.set_defaults(func=_import)


def _filters(args: argparse.Namespace) -> dict:
    return {k: v for k, v in {
        "device": args.device, "fleet": args.fleet, "model_version": args.model_version, "reason": args.reason,
        "max_confidence": args.max_confidence, "min_confidence": args.min_confidence, "since": args.since,
    }.items() if v is not None}


def _ordered(records: list, args: argparse.Namespace) -> list:
    """``records`` in --order, the first --limit of them."""
    from ..loop.order import make_embedder, order_samples

    if args.order != "arrival":
        embed = make_embedder(getattr(args, "bundle", None), args.float_model) if args.order == "informative" else None
        records = order_samples(records, args.order, embed=embed)
    limit = getattr(args, "limit", None)
    return records[:limit] if limit is not None else records


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _list(args: argparse.Namespace) -> int:
    from ..loop.store import open_store

    with open_store(args.store) as store:
        records = store.list_samples(labeled=args.labeled, limit=args.limit if args.order == "arrival" else None,
                                     **_filters(args))
    records = _ordered(records, args)
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
        history = store.label_history(args.sample_id)
    d = r.to_dict()
    print(f"sample {r.sample_id}  device {r.fleet}/{r.device} seq {r.seq} at {_when(r.ts)} UTC")
    print(f"model {r.model_name} {r.model_version}  predicted {r.label_pred!r} confidence {r.confidence:.3f} "
          f"margin {r.margin:.3f} entropy {r.entropy:.3f}  reasons {','.join(r.reasons)}")
    top = ", ".join("{}:{:.3f}".format(k.get("label"), float(k.get("score", 0))) for k in r.top_k)
    print(f"top-k {top or '-'}")
    print(f"label {r.label or '(none)'}" + (f" by {r.labeled_by}" if r.labeled_by else ""))
    for e in history:  # newest first: who changed it when, and from what
        print(f"  {_when(e.labeled_at)} UTC  {e.labeled_by or '?'}: {e.label or '(none)'}"
              f"  (was {e.previous_label or '(none)'}; {e.action})")
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
    if fmt in ("label-studio", "fiftyone", "csv"):
        return _export_for_tool(args, fmt, labels)
    if args.labeled is False or args.labeled == "all":
        raise DataError(f"--format {fmt} writes training data: labeled samples (npz: --include-unlabeled adds the "
                        "others with y=-1)")
    if args.image_url:
        raise DataError("--image-url is for --format label-studio")
    with open_store(args.store) as store:
        records = None
        if args.order != "arrival" or args.limit is not None:
            records = _ordered(store.list_samples(labeled=None if args.include_unlabeled else True, **_filters(args)),
                               args)
        out = export(store, args.output, fmt=fmt, labels=labels, test_fraction=args.test_fraction,
                     labeled_only=not args.include_unlabeled, seed=args.seed, force=args.force, records=records,
                     **_filters(args))
    print(f"wrote {out}")
    if labels is None and fmt == "npz":
        import numpy as np

        with np.load(out) as z:
            inferred = [str(x) for x in z["labels"]]
        print(f"note: class names taken from the stored predictions ({len(inferred)}: {','.join(inferred)}); classes the "
              "model never predicted are missing, so pass --bundle DIR (or --labels) to keep the model's classes and "
              "their order", file=sys.stderr)
    return 0


def _export_for_tool(args: argparse.Namespace, fmt: str, labels: "list | None") -> int:
    from ..loop.interchange import export_for_labeling
    from ..loop.samples import class_order
    from ..loop.store import open_store

    which = {None: False, False: False, True: True, "all": None}[args.labeled]
    with open_store(args.store) as store:
        records = _ordered(store.list_samples(labeled=which, **_filters(args)), args)
        classes = labels if labels is not None else list(class_order(store.list_samples(**_filters(args)), None))
        out = export_for_labeling(records, args.output, fmt, classes=classes, image_url=args.image_url,
                                  force=args.force)
    what = {"label-studio": "tasks.json (import it into a project) and label_config.xml (paste it into the project's "
                            "Labeling Interface)",
            "fiftyone": "data/ and labels.json (fo.Dataset.from_dir(..., fo.types.FiftyOneImageClassificationDataset))",
            "csv": "labels.csv and images/ (correct the label column, then `edgekit samples import`)"}[fmt]
    print(f"wrote {len(records)} sample(s) to {out}: {what}")
    if labels is None:
        print(f"note: classes taken from the stored predictions ({','.join(classes)}); pass --bundle DIR for the "
              "model's own list", file=sys.stderr)
    return 0


def _import(args: argparse.Namespace) -> int:
    from ..errors import DataError
    from ..loop.interchange import import_labels
    from ..loop.store import open_store

    classes = [s.strip() for s in args.labels.split(",")] if args.labels else None
    if args.bundle:
        from device_agent.update.manifest import load_bundle

        if classes:
            raise DataError("give --labels or --bundle, not both")
        classes = list(load_bundle(args.bundle).manifest.labels)
    with open_store(args.store) as store:
        res = import_labels(store, args.path, fmt=args.format, by=args.by, classes=classes)
    skipped = ", ".join(f"{n} {why}" for why, n in res["skipped"].items())
    print(f"{res['format']}: labeled {res['labeled']} sample(s), {res['unchanged']} already had that label"
          + (f"; skipped {skipped}" if skipped else ""))
    return 0
