"""NATS servers with JetStream and MQTT 3.1.1 on free ports: one, or a cluster of three on one machine.

NATS speaks MQTT 3.1.1 (no MQTT 5, no shared subscriptions) and keeps MQTT state in JetStream:
sessions, QoS 1 messages in flight to subscribers, retained messages. In a cluster those streams are
replicated (up to 3 replicas), so a persistent session and its unacknowledged QoS 1 messages survive
the loss of one node.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import List, Optional

from broker import free_port, port_open


class NatsServer:
    """``nats-server -c <conf>``: a client port, an MQTT port, JetStream in ``workdir``; optionally clustered."""

    def __init__(self, workdir: Path, name: str = "n1", cluster_port: Optional[int] = None,
                 routes: Optional[List[int]] = None, extra_mqtt: str = ""):
        if shutil.which("nats-server") is None:
            raise RuntimeError("nats-server is not installed; apt-get install nats-server (.ci/run does it)")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.port, self.mqtt_port = free_port(), free_port()
        self.conf = self.workdir / "nats.conf"
        lines = [
            f"server_name: {name}",
            f"listen: 127.0.0.1:{self.port}",
            f'jetstream {{ store_dir: "{self.workdir / "js"}" }}',
            f"mqtt {{ listen: 127.0.0.1:{self.mqtt_port}\n{extra_mqtt} }}",
            f'log_file: "{self.workdir / "nats.log"}"',
        ]
        if cluster_port is not None:
            route_list = ", ".join(f"nats-route://127.0.0.1:{p}" for p in routes or [])
            lines.append(f"cluster {{ name: edgekit, listen: 127.0.0.1:{cluster_port}, routes: [{route_list}] }}")
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    @property
    def log(self) -> str:
        path = self.workdir / "nats.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, timeout: float = 20.0) -> "NatsServer":
        self.proc = subprocess.Popen(["nats-server", "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if port_open(self.mqtt_port):
                if not mqtt_ready(self.mqtt_port, max(1.0, deadline - time.monotonic())):
                    raise RuntimeError(f"nats-server {self.name} refuses MQTT sessions:\n{self.log[-2000:]}")
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server {self.name} exited with {self.proc.returncode}:\n{self.log[-2000:]}")
            time.sleep(0.05)
        raise RuntimeError(f"nats-server {self.name} did not listen on {self.mqtt_port} within {timeout}s")

    def kill(self) -> None:
        """SIGKILL: the node is gone, nothing saved, no goodbye to its peers."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


class NatsCluster:
    """Three NATS servers routed to each other on one machine (JetStream needs 3 for replicas R3)."""

    def __init__(self, workdir: Path, size: int = 3, extra_mqtt: str = ""):
        ports = [free_port() for _ in range(size)]
        self.nodes = [NatsServer(Path(workdir) / f"n{i + 1}", name=f"n{i + 1}", cluster_port=ports[i],
                                 routes=[p for j, p in enumerate(ports) if j != i], extra_mqtt=extra_mqtt)
                      for i in range(size)]

    def start(self) -> "NatsCluster":
        procs = []
        for node in self.nodes:  # all at once: each waits for its routes before JetStream is ready
            node.proc = subprocess.Popen(["nats-server", "-c", str(node.conf)], stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
            procs.append(node)
        for node in self.nodes:
            deadline = time.monotonic() + 30
            while not port_open(node.mqtt_port):
                if node.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nats-server {node.name} did not start:\n{node.log[-2000:]}")
                time.sleep(0.05)
        for node in self.nodes:
            if not mqtt_ready(node.mqtt_port):
                raise RuntimeError(f"nats-server {node.name} refuses MQTT sessions:\n{node.log[-2000:]}")
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def mqtt_ready(port: int, timeout: float = 60.0) -> bool:
    """Until an MQTT 3.1.1 client gets a successful CONNACK: a clustered node listens before its
    JetStream has a leader, and refuses sessions until then."""
    import threading

    import paho.mqtt.client as paho

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ok = threading.Event()
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"probe-{port}-{time.monotonic_ns()}",
                             protocol=paho.MQTTv311, clean_session=True)
        client.on_connect = lambda c, u, f, rc, p: rc.is_failure or ok.set()
        try:
            client.connect("127.0.0.1", port, keepalive=5)
            client.loop_start()
            if ok.wait(5):
                return True
        except OSError:
            pass
        finally:
            client.disconnect()
            client.loop_stop()
        time.sleep(0.2)
    return False
