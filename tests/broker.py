"""A real Mosquitto broker that a test starts, stops and restarts on a free port."""

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
        self.conf = self.workdir / "mosquitto.conf"
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
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> "Mosquitto":
        self.proc = subprocess.Popen(
            ["mosquitto", "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if port_open(self.port):
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}; see {self.workdir / 'mosquitto.log'}")
            time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {timeout}s")

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
