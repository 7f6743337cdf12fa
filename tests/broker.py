"""A real Mosquitto broker that a test starts, stops and restarts on a free port.

A free port is only free when it is looked at: on a busy machine another process (another test's broker,
or any outgoing connection, whose local ports come from the same ephemeral range) may take it before
Mosquitto binds it. So :meth:`Mosquitto.start` counts the broker as up only when *its* process listens on
the port, and when Mosquitto exits with "Address already in use" it starts again on a new free port (the
first start of a broker whose port the test did not choose) or, on the same port, after a pause (a
restart: the clients know the port).
"""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(pid: int, port: int) -> bool:
    """True when process ``pid`` itself listens on TCP ``port`` (not merely: something answers there)."""
    import psutil

    try:
        return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                   for c in psutil.Process(pid).net_connections(kind="tcp"))
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return port_open(port)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class Mosquitto:
    """``mosquitto -c <conf>`` in a temp dir; ``persistence`` keeps queued QoS 1 messages across restarts."""

    def __init__(self, workdir: Path, port: Optional[int] = None, extra_conf: str = "", persistence: bool = True,
                 max_queued: Optional[int] = 100000):
        """``max_queued=None`` keeps Mosquitto's own limits (``max_queued_messages`` 1000 per client)."""
        if shutil.which("mosquitto") is None:
            raise RuntimeError("mosquitto is not installed; apt-get install mosquitto (.ci/run does it)")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self._may_move = port is None  # until the first start succeeds: then clients know the port
        self._settings = (extra_conf, persistence, max_queued)
        self.conf = self.workdir / "mosquitto.conf"
        self._configure()
        self.proc: Optional[subprocess.Popen] = None

    def _configure(self) -> None:
        extra_conf, persistence, max_queued = self._settings
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            f"persistence {'true' if persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            "autosave_interval 1",
            *([f"max_queued_messages {max_queued}"] if max_queued is not None else []),
            # Started as root, mosquitto would switch to user `mosquitto`, which cannot write
            # the persistence file or the log in a test's temp dir: stay who we are.
            f"user {getpass.getuser()}",
            "log_type error",
            "log_type warning",
            f"log_dest file {self.workdir / 'mosquitto.log'}",
        ]
        self.conf.write_text("\n".join(lines) + "\n" + extra_conf)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        path = self.workdir / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, timeout: float = 10.0, attempts: int = 5) -> "Mosquitto":
        for attempt in range(attempts):
            seen = len(self.log)
            self.proc = subprocess.Popen(
                ["mosquitto", "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                if listening(self.proc.pid, self.port):
                    self._may_move = False
                    return self
                time.sleep(0.05)
            if self.proc.poll() is None:
                self.stop()
                raise RuntimeError(f"mosquitto did not listen on {self.port} within {timeout}s")
            if "Address already in use" not in self.log[seen:] or attempt == attempts - 1:
                break
            if self._may_move:  # nobody knows this port yet: take another
                self.port = free_port()
                self._configure()
            else:  # a restart: wait for whoever holds the port to let it go
                time.sleep(0.5 * (attempt + 1))
        raise RuntimeError(f"mosquitto exited with {self.proc.returncode} (port {self.port}); "
                           f"{self.workdir / 'mosquitto.log'} says: {self.log[-500:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: mosquitto saves its persistence file
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def __enter__(self) -> "Mosquitto":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
