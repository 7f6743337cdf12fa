"""``edgekit label``: a labeling page in the browser for what the fleet flagged."""

from __future__ import annotations

import argparse
import getpass
import re
import sys
import time
from datetime import datetime, timezone
from typing import Any, Dict, List


def register(sub: argparse._SubParsersAction) -> None:
    from ..loop.order import ORDERS
    from ..loop.store import DEFAULT_STORE

    p = sub.add_parser("label", help="label flagged samples in the browser, most useful first",
                       description="Serve a labeling page for the store's unlabelled samples: the model's guess "
                                   "pre-selected, one key a label, the most useful sample first (docs/labeling.md).")
    p.add_argument("--store", default=DEFAULT_STORE, help=f"sqlite:///path.db or postgresql://... (default {DEFAULT_STORE})")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only; "
                                                     "any other address needs the printed token)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    add_filters(p)
    p.add_argument("--user", default=None, help="your name in the label history (default: your login name; "
                                                "each person can change it in the page)")
    p.add_argument("--bundle", help="the bundle the boards run: its classes, and its float_model.keras to order "
                                    "by the model's own features (default: classes from the stored predictions, "
                                    "ordering by input thumbnails)")
    p.add_argument("--float-model", help="the Keras model the bundle came from, when it is not beside the bundle")
    p.add_argument("--labels", help="comma-separated class names in index order (instead of --bundle)")
    p.add_argument("--order", choices=ORDERS, default="informative", help="queue order (default informative: "
                                                                          "Cluster-Margin)")
    p.add_argument("--lease", type=float, default=300.0, help="seconds a sample stays with the person who has it "
                                                              "open, renewed while it is on screen (default 300)")
    p.add_argument("--token", help="the token that guards a page bound beyond localhost (default: a random one)")
    p.set_defaults(func=_label)


def add_filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fleet")
    p.add_argument("--device")
    p.add_argument("--model-version")
    p.add_argument("--since", type=parse_since, metavar="WHEN",
                   help="only samples received since WHEN: 2024-05-01, 2024-05-01T13:00 (UTC), or 90m / 12h / 7d ago")


def parse_since(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([mhd])\s*", text)
    if m:
        return time.time() - float(m.group(1)) * {"m": 60, "h": 3600, "d": 86400}[m.group(2)]
    try:
        dt = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (2024-05-01, 2024-05-01T13:00) or an age "
                                         "(90m, 12h, 7d)") from None
    return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()


def filters_of(args: argparse.Namespace) -> Dict[str, Any]:
    return {k: v for k, v in {"fleet": args.fleet, "device": args.device, "model_version": args.model_version,
                              "since": args.since}.items() if v is not None}


def classes_of(store: Any, args: argparse.Namespace, filters: Dict[str, Any]) -> List[str]:
    """--labels, else the bundle's labels, else the classes the stored predictions show."""
    from ..errors import DataError
    from ..loop.samples import class_order

    if args.labels and args.bundle:
        raise DataError("give --labels or --bundle, not both")
    if args.labels:
        return [s.strip() for s in args.labels.split(",") if s.strip()]
    if args.bundle:
        from device_agent.update.manifest import load_bundle

        return list(load_bundle(args.bundle).manifest.labels)
    records = store.list_samples(**filters)
    if not records:
        raise DataError(f"no samples match in {store.url}; run `edgekit collect` first or loosen the filters")
    classes = list(class_order([r for r in records if r.label is None] or records, None))
    print(f"classes from the stored predictions: {','.join(classes)} (pass --bundle DIR for the model's own list)",
          file=sys.stderr)
    return classes


def _label(args: argparse.Namespace) -> int:
    from ..loop.label import LabelServer, LabelService
    from ..loop.order import make_embedder
    from ..loop.store import open_store

    filters = filters_of(args)
    user = args.user or _login()
    with open_store(args.store) as store:
        classes = classes_of(store, args, filters)
        embed = make_embedder(args.bundle, args.float_model) if args.order == "informative" else None
        service = LabelService(store, classes=classes, filters=filters, order=args.order, embed=embed,
                               lease_seconds=args.lease)
        queue = service.refresh(force=True)
        server = LabelServer(service, args.host, args.port, token=args.token, default_user=user)
        print(f"edgekit label: {len(queue)} unlabelled sample(s) in {args.order} order from {store.url}"
              + (f" ({', '.join(f'{k}={v}' for k, v in filters.items())})" if filters else ""))
        print(f"open {server.url}" + ("" if server.token is None else "   (the token guards the page: keep it private)"))
        print("Ctrl-C to stop", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            print("stopped")
        finally:
            server.close()
    return 0


def _login() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name in some containers
        return "someone"
