#!/usr/bin/env python3
"""Install the edgekit agent on a board: a venv, the config, the bundle, a systemd unit.

    sudo python3 tools/install_agent.py --board rpi-4 --broker mqtt://broker.lan:1883 --bundle ./bundle
    python3 tools/install_agent.py --board rpi-zero-2w --dry-run          # print what it would do
    python3 tools/install_agent.py --board rpi-4 --root /tmp/img --no-venv  # into an image or a test root

Standard library only (it runs before anything is installed). Nothing is
half-written: files go to a temporary name first and are renamed into place.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

REPO = Path(__file__).resolve().parents[1]
BOARDS = {  # board -> (MemoryMax, pip extra)
    "rpi-zero-2w": ("200M", "device"),
    "rpi-3bplus": ("300M", "device"),
    "rpi-4": ("512M", "device"),
    "rpi-5": ("512M", "device"),
    "generic-linux-x86_64": ("1G", "device"),
}


class Installer:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.root = Path(args.root).resolve()
        self.dry = args.dry_run
        self.actions: List[str] = []

    def target(self, path: str) -> Path:
        """An absolute path on the board, under --root."""
        return self.root / path.lstrip("/")

    def say(self, what: str) -> None:
        self.actions.append(what)
        print(("would " if self.dry else "") + what)

    def run(self, cmd: List[str]) -> None:
        self.say("run " + " ".join(shlex.quote(c) for c in cmd))
        if not self.dry:
            subprocess.run(cmd, check=True)

    def write(self, path: Path, text: str, mode: int = 0o644) -> None:
        self.say(f"write {path}")
        if self.dry:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)

    def mkdir(self, path: Path) -> None:
        self.say(f"create {path}/")
        if not self.dry:
            path.mkdir(parents=True, exist_ok=True)

    # -- steps --------------------------------------------------------------
    def venv(self) -> None:
        a = self.args
        venv = self.target(a.prefix) / "venv"
        extra = a.extra or BOARDS[a.board][1]
        self.run([a.python, "-m", "venv", str(venv)])
        self.run([str(venv / "bin" / "pip"), "install", "--upgrade", "pip"])
        self.run([str(venv / "bin" / "pip"), "install", f"{a.source}[{extra}]"])

    def config(self) -> Path:
        a = self.args
        text = (REPO / "firmware_configs" / f"{a.board}.toml").read_text()
        text = set_key(text, "bundle", "path", f"{a.prefix}/bundle")
        text = set_key(text, "outbox", "path", f"{a.state_dir}/outbox.sqlite")
        text = set_key(text, "source", "path", f"{a.state_dir}/inbox")
        if a.broker:
            text = set_key(text, "mqtt", "broker", a.broker)
        if a.device_id:
            text = set_key(text, "device", "id", a.device_id)
        if a.fleet:
            text = set_key(text, "device", "fleet", a.fleet)
        dest = self.target(a.config)
        if dest.exists() and not a.force:
            self.say(f"keep the existing {dest} (--force replaces it)")
        else:
            self.write(dest, f"# installed by tools/install_agent.py from firmware_configs/{a.board}.toml\n" + text, 0o640)
        return dest

    def bundle(self) -> None:
        a = self.args
        if not a.bundle:
            self.say(f"skip the bundle: copy one to {a.prefix}/bundle later (or pass --bundle)")
            return
        src, dest = Path(a.bundle), self.target(a.prefix) / "bundle"
        if not (src / "manifest.json").is_file():
            raise SystemExit(f"install_agent: --bundle {src} has no manifest.json; pass the directory `edgekit convert` wrote")
        self.say(f"copy {src} -> {dest}")
        if not self.dry:
            tmp = dest.with_name("bundle.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp)
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)

    def unit(self) -> Path:
        a = self.args
        text = (REPO / "tools" / "edgekit-agent.service").read_text().format(
            prefix=a.prefix, user=a.user, state_dir=a.state_dir, config=a.config,
            watchdog_sec=a.watchdog_sec, memory_max=a.memory_max or BOARDS[a.board][0],
        )
        dest = self.target("/etc/systemd/system/edgekit-agent.service")
        self.write(dest, text)
        return dest

    def install(self) -> None:
        a = self.args
        if a.venv:
            self.venv()
        else:
            self.say("skip the venv (--no-venv)")
        self.mkdir(self.target(a.state_dir) / "inbox")
        self.config()
        self.bundle()
        self.unit()
        if self.root == Path("/") and not a.no_systemctl:
            if a.user != "root" and shutil.which("useradd"):
                self.run(["sh", "-c", f"id -u {a.user} >/dev/null 2>&1 || useradd --system --home {a.state_dir} {a.user}"])
                self.run(["chown", "-R", f"{a.user}:{a.user}", a.state_dir])
            self.run(["systemctl", "daemon-reload"])
            self.run(["systemctl", "enable", "--now", "edgekit-agent.service"])
        else:
            self.say("skip systemctl (installing under --root); on the board: systemctl enable --now edgekit-agent")


def set_key(text: str, table: str, key: str, value: str) -> str:
    """Replace ``key = ...`` inside ``[table]`` of a TOML profile (keeps comments and layout)."""
    out, current, done = [], None, False
    for line in text.splitlines(keepends=True):
        m = re.match(r"\s*\[([A-Za-z_]+)\]\s*$", line)
        if m:
            if current == table and not done:
                out.append(f'{key} = "{value}"\n')
                done = True
            current = m.group(1)
        elif current == table and not done:
            m = re.match(rf'\s*#?\s*{key}\s*=\s*("[^"]*"|[^#\s]*)\s*(#.*)?$', line.rstrip("\n"))
            if m:
                line = f'{key} = "{value}"' + (f"  {m.group(2)}" if m.group(2) else "") + "\n"
                done = True
        out.append(line)
    if not done:
        if current != table:
            out.append(f"\n[{table}]\n")
        out.append(f'{key} = "{value}"\n')
    return "".join(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Install the edgekit agent as a systemd service on a board.")
    p.add_argument("--board", required=True, choices=sorted(BOARDS), help="profile from firmware_configs/")
    p.add_argument("--root", default="/", help="install under this directory (an image, or a test)")
    p.add_argument("--prefix", default="/opt/edgekit", help="venv and bundle go here")
    p.add_argument("--config", default="/etc/edgekit/agent.toml")
    p.add_argument("--state-dir", default="/var/lib/edgekit", help="outbox, benchmark choice, inbox")
    p.add_argument("--user", default="edgekit")
    p.add_argument("--broker", help="mqtt://host:port or mqtts://host:port")
    p.add_argument("--device-id")
    p.add_argument("--fleet")
    p.add_argument("--bundle", help="a bundle directory to copy to <prefix>/bundle")
    p.add_argument("--memory-max", help="systemd MemoryMax (default per board)")
    p.add_argument("--watchdog-sec", type=int, default=60)
    p.add_argument("--extra", choices=["device", "device-tflite"], help="pip extra (default per board)")
    p.add_argument("--source", default=str(REPO), help="what pip installs (this checkout by default)")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--no-venv", dest="venv", action="store_false", help="skip creating the venv")
    p.add_argument("--no-systemctl", action="store_true")
    p.add_argument("--force", action="store_true", help="replace an existing config")
    p.add_argument("--dry-run", action="store_true", help="print what would be done, change nothing")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        Installer(args).install()
    except subprocess.CalledProcessError as exc:
        print(f"install_agent: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
