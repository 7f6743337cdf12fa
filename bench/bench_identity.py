"""What identity costs, side by side in one run:

1. the collector's per-message identity work: the payload check alone, then with the device gate
   (allow-list from a CA's enrolment list of 500 boards, per-device rate limit) in front of it;
2. a client's connect (TCP + MQTT CONNECT/CONNACK) on a plain listener against the TLS listener with
   client certificates of ``edgekit broker-config``;
3. QoS 1 samples published and acknowledged, through the plain broker and through the TLS one.

Both brokers are private Mosquitto processes on free ports, started here.

    .venv/bin/python bench/bench_identity.py [--n 2000] [--connects 30] [--repeat 3]
"""

from __future__ import annotations

import argparse
import getpass
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from device_agent.delivery import protocol  # noqa: E402
from edgekit.fleet.broker_config import write_broker_config  # noqa: E402
from edgekit.fleet.identity import init_ca  # noqa: E402
from edgekit.loop.gate import DeviceGate  # noqa: E402
from edgekit.loop.validate import check_message  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mosquitto(conf: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"mosquitto -c {conf} did not listen on {port}")


def samples(n: int, device: str = "pi-0", fleet: str = "lab"):
    rng = np.random.default_rng(0)
    model = {"name": "bench", "version": "1", "sha256": "ab" * 32}
    pred = {"label": "3", "index": 3, "confidence": 0.41, "margin": 0.05, "entropy": 1.7,
            "top_k": [{"label": "3", "index": 3, "score": 0.41}]}
    return [(protocol.topic(fleet, device, "samples"), json.dumps(protocol.sample_payload(
        device=device, fleet=fleet, seq=i, model=model, prediction=pred, reasons=["low_confidence"],
        raw=rng.integers(0, 256, (8, 8, 1), dtype=np.uint8))).encode()) for i in range(n)]


def client(port: int, tls=None) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.max_queued_messages_set(0)
    if tls:
        c.tls_set(ca_certs=str(tls.ca), certfile=str(tls.cert), keyfile=str(tls.key))
    return c


def handshake_s(port: int, tls) -> float:
    """TCP connect + TLS handshake alone (no MQTT), with TCP_NODELAY: the cryptographic cost."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(tls.ca))
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    t0 = time.perf_counter()
    raw = socket.create_connection(("127.0.0.1", port))
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with ctx.wrap_socket(raw, server_hostname="127.0.0.1"):
        return time.perf_counter() - t0


def connect_s(port: int, tls=None) -> float:
    c = client(port, tls)
    done = threading.Event()
    c.on_connect = lambda *a: done.set()
    t0 = time.perf_counter()
    c.connect("127.0.0.1", port)
    c.loop_start()
    assert done.wait(10)
    dt = time.perf_counter() - t0
    c.disconnect()
    c.loop_stop()
    return dt


def publish_s(port: int, data, tls=None, window: int = 100) -> float:
    c = client(port, tls)
    acked = threading.Semaphore(0)
    c.on_publish = lambda *a: acked.release()
    done = threading.Event()
    c.on_connect = lambda *a: done.set()
    c.connect("127.0.0.1", port)
    c.loop_start()
    assert done.wait(10)
    c.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as the agent's Link does
    t0 = time.perf_counter()
    for i, (topic, payload) in enumerate(data):
        if i >= window:
            acked.acquire()
        c.publish(topic, payload, qos=1)
    for _ in range(min(window, len(data))):
        acked.acquire()
    dt = time.perf_counter() - t0
    c.disconnect()
    c.loop_stop()
    return dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--connects", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgekit-bench-id-") as tmp:
        d = Path(tmp)
        ca = init_ca(d / "ca")
        for i in range(500):  # a fleet of a few hundred boards on the allow-list
            ca.enroll(f"pi-{i}", d / "ids" / f"pi-{i}", fleet="lab")
        pi0 = type("Files", (), {"ca": d / "ids/pi-0/ca.crt", "cert": d / "ids/pi-0/client.crt",
                                 "key": d / "ids/pi-0/client.key"})

        # 1. the collector's identity work per message
        data = samples(args.n)
        gate = DeviceGate(allow=d / "ca", rate_per_minute=1e9, burst=10**9)

        def check_only_run() -> float:
            t0 = time.perf_counter()
            for topic, payload in data:
                check_message(topic, payload)
            return (time.perf_counter() - t0) / len(data)

        def with_gate_run() -> float:
            t0 = time.perf_counter()
            for topic, payload in data:
                gate.admit(topic)
                check_message(topic, payload)
            return (time.perf_counter() - t0) / len(data)

        def gate_alone_run() -> float:
            t0 = time.perf_counter()
            for topic, _ in data:
                gate.admit(topic)
            return (time.perf_counter() - t0) / len(data)

        check_only_run()  # warm-up: compiles the schema checks
        gate_alone = statistics.median(gate_alone_run() for _ in range(args.repeat))
        runs = [(check_only_run(), with_gate_run()) for _ in range(args.repeat)]  # alternated
        check_only = statistics.median(r[0] for r in runs)
        with_gate = statistics.median(r[1] for r in runs)

        # 2, 3: plain listener against the generated TLS configuration
        tls_port, plain_port = free_port(), free_port()
        cfg = write_broker_config(ca, d / "broker", hosts=["127.0.0.1"], port=tls_port, bind="127.0.0.1")
        user = f"user {getpass.getuser()}\n"
        (d / "tls.conf").write_text(user + cfg.conf.read_text())
        (d / "plain.conf").write_text(user + f"listener {plain_port} 127.0.0.1\nallow_anonymous true\n")
        procs = [start_mosquitto(d / "tls.conf", tls_port), start_mosquitto(d / "plain.conf", plain_port)]
        try:
            publish_s(plain_port, data[:200])  # warm-up
            publish_s(tls_port, data[:200], pi0)
            conns = [(connect_s(plain_port), connect_s(tls_port, pi0)) for _ in range(args.connects)]
            plain_c = statistics.median(c[0] for c in conns)
            tls_c = statistics.median(c[1] for c in conns)
            hs = statistics.median(handshake_s(tls_port, pi0) for _ in range(args.connects))
            pubs = [(publish_s(plain_port, data), publish_s(tls_port, data, pi0)) for _ in range(args.repeat)]
            plain_p = statistics.median(p[0] for p in pubs)
            tls_p = statistics.median(p[1] for p in pubs)
        finally:
            for p in procs:
                p.terminate()
                p.wait(10)

    print(f"identity bench (on this machine; {args.n} samples of 8x8 uint8, {args.connects} connects)")
    print(f"{'':38s} {'without':>12s} {'with':>12s} {'with/without':>12s}")
    print(f"{'collector check per message (us)':38s} {check_only * 1e6:12.1f} {with_gate * 1e6:12.1f} "
          f"{with_gate / check_only:12.2f}  (with = allow-list of 500 + rate limit in front)")
    print(f"{'  of which the gate alone (us)':38s} {'':12s} {gate_alone * 1e6:12.1f}")
    print(f"{'connect, median (ms)':38s} {plain_c * 1e3:12.2f} {tls_c * 1e3:12.2f} {tls_c / plain_c:12.2f}  "
          "(with = TLS, client certificate, ACL)")
    print(f"{'  of which TCP + TLS handshake (ms)':38s} {'':12s} {hs * 1e3:12.2f}  "
          "(TCP_NODELAY; the rest is paho's CONNECT after it)")
    print(f"{'QoS 1 publish + PUBACK (samples/s)':38s} {args.n / plain_p:12.0f} {args.n / tls_p:12.0f} "
          f"{plain_p / tls_p:12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
