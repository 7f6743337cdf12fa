"""``edgekit collect``: run a collector until Ctrl-C or SIGTERM (or a duration, or until idle).

A stop request (SIGTERM from systemd or ``docker stop``, or Ctrl-C) is a flag
that ``edgekit``'s ``main()`` sets from its first line on (``_signals``), so
it is honoured at any moment: while the store opens, while the broker is
connecting or subscribing, and while collecting. The collector then stores
and acks what arrived, prints its counters and the command exits 0.
"""

from __future__ import annotations

import argparse
import time


def register(sub: argparse._SubParsersAction) -> None:
    from ..loop.store import DEFAULT_STORE

    p = sub.add_parser("collect", help="store what the boards send (samples, telemetry, status) from an MQTT broker",
                       description="Subscribe to a fleet's samples, telemetry and status (docs/protocol.md), validate "
                                   "every payload and store it; malformed payloads are counted and quarantined. After "
                                   "each commit it tells every board which of its samples it has (edgekit.ack/1), so "
                                   "the boards delete them. SIGTERM or Ctrl-C at any moment: store what arrived, "
                                   "print the counters, exit 0.")
    p.add_argument("--broker", default="mqtt://127.0.0.1:1883",
                   help="mqtt(s)://[user:pass@]host:port; the nodes of a clustered broker comma-separated "
                        "(the next is used when a connection drops)")
    p.add_argument("--store", default=DEFAULT_STORE, help=f"sqlite:///path.db or postgresql://... (default {DEFAULT_STORE})")
    p.add_argument("--fleet", help="only this fleet (default: every fleet)")
    p.add_argument("--client-id", default="edgekit-collector",
                   help="MQTT client id; keep it across restarts so the broker keeps what arrived meanwhile")
    p.add_argument("--share-group", help="join $share/<group>/... so several collectors split the fleet")
    p.add_argument("--session-expiry", type=int, default=3600, metavar="S",
                   help="seconds the broker keeps the session while the collector is away (default 3600)")
    p.add_argument("--max-payload-bytes", type=int, default=None, help="refuse bigger payloads (default 1 MiB)")
    p.add_argument("--ca-file", help="CA certificate for mqtts://")
    p.add_argument("--cert-file", help="client certificate for mqtts://")
    p.add_argument("--key-file", help="client key for mqtts://")
    p.add_argument("--protocol", choices=["5", "3.1.1"], default="5",
                   help="MQTT version (3.1.1 for brokers without MQTT 5: persistent session, no shared subscriptions)")
    p.add_argument("--allow-devices", metavar="CA_DIR|FILE",
                   help="take messages only from these devices: a CA directory or its enrolled.json (the boards "
                        "enrolled, in their fleet; re-read when it changes), or a file of fleet/device lines; "
                        "others are quarantined (not_allowed)")
    p.add_argument("--device-rate", type=float, metavar="N",
                   help="at most N messages a minute per device (token bucket); more are quarantined (rate_limited)")
    p.add_argument("--device-burst", type=int, metavar="N",
                   help="with --device-rate: messages a device may send at once (default N of --device-rate); "
                        "cover the backlog the broker holds while the collector is away")
    p.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    p.add_argument("--until-idle", type=float, metavar="S", help="stop once nothing arrived for S seconds")
    p.add_argument("--stats-every", type=float, default=30.0, metavar="S", help="print counters every S seconds")
    p.set_defaults(func=run, graceful_stop=True)


def run(args: argparse.Namespace) -> int:
    from ._signals import STOP

    from ..loop.collect import DEFAULT_MAX_PAYLOAD_BYTES, Collector, CollectorStats
    from ..loop.gate import DeviceGate
    from ..loop.store import open_store

    if STOP:  # asked to stop while starting: nothing was received, nothing to store
        print(CollectorStats().line(), flush=True)
        return 0
    gate = None
    if args.allow_devices or args.device_rate is not None:
        gate = DeviceGate(allow=args.allow_devices, rate_per_minute=args.device_rate, burst=args.device_burst)
    with open_store(args.store) as store:
        collector = Collector(
            args.broker, store, fleet=args.fleet, client_id=args.client_id, share_group=args.share_group,
            session_expiry_s=args.session_expiry,
            max_payload_bytes=args.max_payload_bytes or DEFAULT_MAX_PAYLOAD_BYTES,
            ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file, protocol=args.protocol,
            gate=gate,
        )
        try:
            collector.start(cancel=lambda: bool(STOP))
            if not STOP:
                print(f"collecting into {store.url} (Ctrl-C to stop)", flush=True)
            start = last = time.monotonic()
            while not STOP:
                if args.until_idle is not None and collector.wait_idle(args.until_idle, timeout=0.2):
                    break
                if args.until_idle is None:
                    time.sleep(0.2)
                now = time.monotonic()
                if args.duration is not None and now - start >= args.duration:
                    break
                if now - last >= args.stats_every:
                    print(collector.stats.line(), flush=True)
                    last = now
        finally:
            collector.stop()  # stores and acks what arrived; a no-op when start() never connected
        print(collector.stats.line(), flush=True)
    return 0
