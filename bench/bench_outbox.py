"""The board's delivery path against a raw paho QoS-1 publisher, side by side in one run.

N payloads of --size bytes go to the local Mosquitto (127.0.0.1:1883) three ways, interleaved
--repeat times so drift in machine load hits all alike: a bare paho client publishing QoS 1 with
--window messages in flight (the ceiling), and the board's path: ``Outbox.put`` (one committed
SQLite transaction per sample) or ``Outbox.add`` (the agent's loop: one transaction per block of
``[outbox].batch`` = 32 samples), each followed by ``Publisher.pump``,
until every row is acknowledged and deleted, with ``[mqtt].ack = "broker"`` and ``[outbox].sync``
normal and full. Needs only the board side (.venv-device is enough):

    .venv-device/bin/python bench/bench_outbox.py [--n 5000] [--repeat 3] [--profile out.prof]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from device_agent.config import MqttConfig  # noqa: E402
from device_agent.delivery.mqtt import Link  # noqa: E402
from device_agent.delivery.outbox import Outbox, Publisher  # noqa: E402


def raw(cfg: MqttConfig, payload: bytes, n: int, window: int) -> float:
    done, acked = threading.Event(), [0]

    def on_publish(c, u, mid, rc, props):
        acked[0] += 1
        if acked[0] == n:
            done.set()

    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-raw-{uuid.uuid4().hex[:8]}", protocol=paho.MQTTv5)
    c.max_inflight_messages_set(window)
    c.on_publish = on_publish
    c.connect(cfg.host, cfg.port)
    c.loop_start()
    t0 = time.perf_counter()
    for _ in range(n):
        c.publish("bench/raw", payload, qos=1)
    if not done.wait(120):
        raise SystemExit(f"raw publisher: {acked[0]}/{n} PUBACKs in 120 s")
    elapsed = time.perf_counter() - t0
    c.disconnect()
    c.loop_stop()
    return n / elapsed


def through_outbox(cfg: MqttConfig, payload: bytes, n: int, window: int, sync: str, profile=None,
                   blocks: bool = False) -> float:
    with tempfile.TemporaryDirectory() as tmp, Outbox(Path(tmp) / "o.sqlite", sync=sync) as box:
        put = box.add if blocks else box.put  # blocks: the agent's path, one transaction per [outbox].batch
        link = Link(cfg, client_id=f"bench-outbox-{uuid.uuid4().hex[:8]}").start()
        link.wait_connected(10)
        pub = Publisher(box, link, window=window)
        if profile is not None:
            profile.enable()
        t0 = time.perf_counter()
        for i in range(n):
            put("bench/outbox", payload, f"id-{i}", seq=box.next_seq())
            if box.commit_due():
                box.commit()
            pub.pump()
        box.commit()
        deadline = time.monotonic() + 120
        while box.depth:
            pub.pump(0.005)
            if time.monotonic() > deadline:
                raise SystemExit(f"outbox still holds {box.depth} rows after 120 s")
        elapsed = time.perf_counter() - t0
        if profile is not None:
            profile.disable()
        link.close()
        return n / elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--window", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--profile", help="write a cProfile of the last sync=normal outbox run here")
    args = ap.parse_args()
    cfg = MqttConfig(broker=args.broker, max_inflight=args.window)
    payload = os.urandom(args.size // 2 + 1).hex().encode()[:args.size]
    rates = {"raw paho QoS 1": [], "outbox + publisher (sync=normal)": [], "outbox + publisher (sync=full)": [],
             "blocks of 32 + publisher (normal)": [], "blocks of 32 + publisher (full)": []}
    prof = None
    for r in range(args.repeat):
        rates["raw paho QoS 1"].append(raw(cfg, payload, args.n, args.window))
        if args.profile and r == args.repeat - 1:
            import cProfile
            prof = cProfile.Profile()
        rates["outbox + publisher (sync=normal)"].append(
            through_outbox(cfg, payload, args.n, args.window, "normal", prof))
        rates["outbox + publisher (sync=full)"].append(through_outbox(cfg, payload, args.n, args.window, "full"))
        rates["blocks of 32 + publisher (normal)"].append(
            through_outbox(cfg, payload, args.n, args.window, "normal", blocks=True))
        rates["blocks of 32 + publisher (full)"].append(
            through_outbox(cfg, payload, args.n, args.window, "full", blocks=True))
    print(f"{args.n} QoS-1 messages of {args.size} bytes via {args.broker}, {args.window} in flight, "
          f"best of {args.repeat}")
    ceiling = max(rates["raw paho QoS 1"])
    for name, values in rates.items():
        best = max(values)
        print(f"  {name:34} {best:8.0f} msg/s  (runs: {', '.join(f'{v:.0f}' for v in values)})  "
              f"ratio to raw {best / ceiling:.2f}x")
    if prof is not None:
        prof.dump_stats(args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
