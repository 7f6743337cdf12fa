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

from broker import listening


def free_ports(n: int) -> List[int]:
    """``n`` distinct free ports (all bound at once, so none is handed out twice)."""
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_taken(log: str) -> bool:
    return "address already in use" in log


class NatsServer:
    """``nats-server -c <conf>``: a client port, an MQTT port, JetStream in ``workdir``; optionally clustered."""

    def __init__(self, workdir: Path, name: str = "n1", cluster_port: Optional[int] = None,
                 routes: Optional[List[int]] = None, extra_mqtt: str = "", extra_conf: str = ""):
        if shutil.which("nats-server") is None:
            raise RuntimeError("nats-server is not installed; apt-get install nats-server (.ci/run does it)")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self._cluster_port, self._routes, self._extra_mqtt = cluster_port, routes, extra_mqtt
        self._extra_conf = extra_conf  # more top-level configuration (e.g. an authorization block)
        self.configure()
        self.proc: Optional[subprocess.Popen] = None

    def configure(self, ports: Optional[List[int]] = None) -> None:
        """Write the config, on new free ports (client, MQTT) unless given."""
        self.port, self.mqtt_port = ports or free_ports(2)
        cluster_port, routes, extra_mqtt, name = self._cluster_port, self._routes, self._extra_mqtt, self.name
        extra_conf = self._extra_conf
        self.conf = self.workdir / "nats.conf"
        lines = [
            f"server_name: {name}",
            f"listen: 127.0.0.1:{self.port}",
            f'jetstream {{ store_dir: "{self.workdir / "js"}" }}',
            f"mqtt {{ listen: 127.0.0.1:{self.mqtt_port}\n{extra_mqtt} }}",
            f'log_file: "{self.workdir / "nats.log"}"',
            extra_conf,
        ]
        if cluster_port is not None:
            route_list = ", ".join(f"nats-route://127.0.0.1:{p}" for p in routes or [])
            lines.append(f"cluster {{ name: edgekit, listen: 127.0.0.1:{cluster_port}, routes: [{route_list}] }}")
        self.conf.write_text("\n".join(lines) + "\n")

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    @property
    def log(self) -> str:
        path = self.workdir / "nats.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, timeout: float = 20.0) -> "NatsServer":
        for attempt in range(3):  # another process may take a free port before the server binds it
            self.proc = subprocess.Popen(["nats-server", "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if listening(self.proc.pid, self.mqtt_port):  # this server's, not another's on a taken port
                    if not mqtt_ready(self.mqtt_port, max(1.0, deadline - time.monotonic())):
                        raise RuntimeError(f"nats-server {self.name} refuses MQTT sessions:\n{self.log[-2000:]}")
                    return self
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
            if self.proc.poll() is not None and _port_taken(self.log) and self._cluster_port is None:
                self.configure()
                continue
            break
        self.kill()
        raise RuntimeError(f"nats-server {self.name} did not listen on {self.mqtt_port} within {timeout}s:\n"
                           f"{self.log[-2000:]}")

    def reconfigure(self, extra_conf: str, running: bool = True) -> None:
        """Rewrite the top-level extra configuration (same ports) and make the running server reload it
        (SIGHUP: its clients stay connected); ``running=False`` only rewrites it for the next start."""
        import signal

        self._extra_conf = extra_conf
        self.configure([self.port, self.mqtt_port])
        if running:
            self.proc.send_signal(signal.SIGHUP)

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
        self.workdir, self.size, self.extra_mqtt = Path(workdir), size, extra_mqtt
        self.nodes: List[NatsServer] = []
        self._configure(0)

    def _configure(self, attempt: int) -> None:
        ports = free_ports(3 * self.size)  # cluster, client and MQTT port of every node, all distinct
        cluster = ports[:self.size]
        self.nodes = [NatsServer(self.workdir / f"try{attempt}" / f"n{i + 1}", name=f"n{i + 1}",
                                 cluster_port=cluster[i], routes=[p for j, p in enumerate(cluster) if j != i],
                                 extra_mqtt=self.extra_mqtt)
                      for i in range(self.size)]
        for i, node in enumerate(self.nodes):
            node.configure(ports[self.size + 2 * i:self.size + 2 * i + 2])

    def start(self) -> "NatsCluster":
        for attempt in range(3):  # another process may take a free port before a server binds it
            for node in self.nodes:  # all at once: each waits for its routes before JetStream is ready
                node.proc = subprocess.Popen(["nats-server", "-c", str(node.conf)], stdout=subprocess.DEVNULL,
                                             stderr=subprocess.DEVNULL)
            failed = None
            for node in self.nodes:
                deadline = time.monotonic() + 30
                while failed is None and not listening(node.proc.pid, node.mqtt_port):
                    if node.proc.poll() is not None or time.monotonic() > deadline:
                        failed = node
                    time.sleep(0.05)
            if failed is None:
                break
            self.stop()
            if not _port_taken(failed.log) or attempt == 2:
                raise RuntimeError(f"nats-server {failed.name} did not start:\n{failed.log[-2000:]}")
            self._configure(attempt + 1)
        for node in self.nodes:
            if not mqtt_ready(node.mqtt_port):
                self.stop()
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
