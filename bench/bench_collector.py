"""Collector ingest rate into SQLite and PostgreSQL against a raw paho subscriber, in one run.

The same N QoS-1 sample payloads (~1 KB, built with device_agent.delivery.protocol)
go through the same broker (the local Mosquitto on 127.0.0.1:1883) to three
consumers in turn: a bare paho subscriber that only counts (the ceiling), the
collector writing into SQLite, and the collector writing into PostgreSQL. A
publisher keeps at most --window messages ahead of the consumer (Mosquitto
drops QoS 1 messages queued past max_queued_messages, 1000 by default), so
each rate is what the pipeline sustains end to end. Then the writer thread alone, without a broker:
CPU microseconds per message to validate and store batches of 256 (what the collector does between
receiving and acknowledging), into each store:

    .venv/bin/python bench/bench_collector.py [--n 5000] [--repeat 5] [--publisher both|thread|process]

The publisher runs in two places, each measured for all three consumers: a thread of this process (where
the issue's first figures came from: consumer and publisher then share one GIL, which holds the raw
subscriber back too) and a process of its own (as boards are: the consumer has its interpreter to itself,
so the ratio shows what the collector's own work costs). Each round runs the three consumers one after the
other; the figures are the best rate of each and the median of the rounds' ratios (this machine's load
drifts between rounds, and a ratio taken within one round is the steadier figure).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.subscribeoptions import SubscribeOptions

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from device_agent.delivery import protocol  # noqa: E402
from edgekit.loop.collect import Collector  # noqa: E402
from edgekit.mqtt_url import parse_broker_url  # noqa: E402
from edgekit.loop.store import open_store  # noqa: E402


def payloads(n: int, fleet: str) -> List[bytes]:
    rng = np.random.default_rng(0)
    model = {"name": "bench", "version": "1.0.0", "sha256": "ab" * 32}
    pred = {"label": "3", "index": 3, "confidence": 0.41, "margin": 0.05, "entropy": 1.7,
            "top_k": [{"label": "3", "index": 3, "score": 0.41}, {"label": "5", "index": 5, "score": 0.36}]}
    out = []
    for i in range(n):
        p = protocol.sample_payload(device=f"pi-{i % 8}", fleet=fleet, seq=i, model=model, prediction=pred,
                                    reasons=["low_confidence"], raw=rng.integers(0, 256, (20, 20, 1), dtype=np.uint8))
        out.append(json.dumps(p, separators=(",", ":")).encode())
    return out


def publish_paced(url: str, fleet: str, data: List[bytes], consumed: Callable[[], int], window: int) -> float:
    """Publish every payload with QoS 1, at most ``window`` ahead of the consumer; seconds until all consumed."""
    b = parse_broker_url(url)
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.max_queued_messages_set(0)
    pub.connect(b.host, b.port)
    pub.loop_start()
    start = time.perf_counter()
    for i, payload in enumerate(data):
        while i - consumed() >= window:
            time.sleep(0.0005)
        pub.publish(protocol.topic(fleet, f"pi-{i % 8}", "samples"), payload, qos=1)
    deadline = time.monotonic() + 120
    while consumed() < len(data):
        if time.monotonic() > deadline:
            raise SystemExit(f"consumer stopped at {consumed()}/{len(data)}; is the broker dropping messages?")
        time.sleep(0.0005)
    elapsed = time.perf_counter() - start
    pub.disconnect()
    pub.loop_stop()
    return elapsed


def _publish_child(url: str, fleet: str, n: int, window: int, consumed, elapsed) -> None:
    data = payloads(n, fleet)  # the same payloads (seeded), made here: nothing large crosses the pipe
    elapsed.value = publish_paced(url, fleet, data, lambda: consumed.value, window)


def publish(where: str, url: str, fleet: str, data: List[bytes], consumed: Callable[[], int], window: int) -> float:
    """:func:`publish_paced` in a thread of this process (``thread``) or in a process of its own (``process``:
    a thread here copies ``consumed()`` into shared memory every 0.5 ms for it to pace by)."""
    if where == "thread":
        return publish_paced(url, fleet, data, consumed, window)
    ctx = multiprocessing.get_context("spawn")
    shared, elapsed = ctx.Value("q", 0, lock=False), ctx.Value("d", 0.0, lock=False)
    done = threading.Event()

    def mirror() -> None:
        while not done.is_set():
            shared.value = consumed()
            time.sleep(0.0005)

    t = threading.Thread(target=mirror, daemon=True)
    t.start()
    child = ctx.Process(target=_publish_child, args=(url, fleet, len(data), window, shared, elapsed))
    child.start()
    child.join()
    done.set()
    t.join()
    if child.exitcode != 0 or not elapsed.value:
        raise SystemExit(f"the publisher process failed (exit code {child.exitcode})")
    return elapsed.value


def run_raw(url: str, fleet: str, data: List[bytes], window: int, where: str = "thread") -> float:
    b = parse_broker_url(url)
    count = [0]
    lock = threading.Lock()
    ready = threading.Event()

    def on_message(client, userdata, msg):
        with lock:
            count[0] += 1

    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-raw-{uuid.uuid4().hex[:8]}",
                      protocol=mqtt.MQTTv5)
    sub.on_message = on_message
    sub.on_subscribe = lambda *a: ready.set()
    sub.connect(b.host, b.port)
    sub.loop_start()
    sub.subscribe(protocol.subscription(fleet, "samples"), options=SubscribeOptions(qos=1))
    ready.wait(10)
    try:
        return len(data) / publish(where, url, fleet, data, lambda: count[0], window)
    finally:
        sub.disconnect()
        sub.loop_stop()


def run_collector(url: str, store_url: str, fleet: str, data: List[bytes], window: int,
                  where: str = "thread") -> float:
    with open_store(store_url) as store:
        c = Collector(url, store, fleet=fleet, client_id=f"bench-col-{uuid.uuid4().hex[:8]}", session_expiry_s=0)
        with c:
            rate = len(data) / publish(where, url, fleet, data, lambda: c.stats.handled, window)
        assert store.count_samples() == len(data), (store.count_samples(), c.stats)
        if hasattr(store, "drop"):
            store.drop()
    return rate


def writer_us(store_url: str, fleet: str, data: List[bytes]) -> float:
    """CPU us per message of the collector's writer (validate, insert, commit), no broker involved."""
    from edgekit.loop.collect import _Msg

    msgs = [_Msg(protocol.topic(fleet, f"pi-{i % 8}", "samples"), p, i + 1, 1, 1) for i, p in enumerate(data)]
    with open_store(store_url) as store:
        c = Collector("mqtt://127.0.0.1:1883", store, fleet=fleet)  # never started: _store_batch acks nothing
        t0 = time.thread_time()
        for i in range(0, len(msgs), 256):
            c._store_batch(msgs[i:i + 256])
        cpu = time.thread_time() - t0
        assert store.count_samples() == len(data)
        if hasattr(store, "drop"):
            store.drop()
    return cpu / len(data) * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    ap.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--window", type=int, default=500)
    ap.add_argument("--publisher", choices=("both", "thread", "process"), default="both")
    args = ap.parse_args()
    fleet = f"bench-{os.getpid()}"
    data = payloads(args.n, fleet)
    size = statistics.mean(len(p) for p in data)
    print(f"{args.n} QoS-1 sample payloads of {size:.0f} bytes via {args.broker}, {args.repeat} rounds")
    for where in (("thread", "process") if args.publisher == "both" else (args.publisher,)):
        print(f"publisher in {'a thread of this process' if where == 'thread' else 'a process of its own'}:")
        rates: Dict[str, List[float]] = {"raw paho subscriber": [], "collector -> SQLite": [],
                                         "collector -> PostgreSQL": []}
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.repeat):  # interleaved, so drift in machine load hits all three alike
                rates["raw paho subscriber"].append(run_raw(args.broker, fleet, data, args.window, where))
                rates["collector -> SQLite"].append(
                    run_collector(args.broker, f"sqlite:///{tmp}/bench-{r}.db", fleet, data, args.window, where))
                rates["collector -> PostgreSQL"].append(
                    run_collector(args.broker, f"{args.postgres}?schema=ek_bench_{uuid.uuid4().hex[:8]}", fleet,
                                  data, args.window, where))
        raws = rates["raw paho subscriber"]
        for name, values in rates.items():
            ratios = [v / raw for v, raw in zip(values, raws)]
            print(f"  {name:26} {max(values):8.0f} msg/s  (runs: {', '.join(f'{v:.0f}' for v in values)})  "
                  f"ratio to raw: best {max(values) / max(raws):.2f}x, median of rounds "
                  f"{statistics.median(ratios):.2f}x")
    with tempfile.TemporaryDirectory() as tmp:
        for name, url in (("SQLite", f"sqlite:///{tmp}/writer.db"),
                          ("PostgreSQL", f"{args.postgres}?schema=ek_bench_{uuid.uuid4().hex[:8]}")):
            us = min(writer_us(url.replace("writer.db", f"writer-{r}.db"), fleet, data) for r in range(args.repeat))
            print(f"  writer alone -> {name:11} {us:6.0f} us CPU per message (validate + store, best of {args.repeat})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
