#!/usr/bin/env python3
"""Install the edgekit agent on a board: a venv, the config, the bundle, a systemd unit.

    sudo python3 tools/install_agent.py --board rpi-4 --broker mqtt://broker.lan:1883 --bundle ./bundle \
        --trusted-key keys/signing.pub   # the board then runs only bundles that key signed
    python3 tools/install_agent.py --board rpi-zero-2w --dry-run          # print what it would do
    python3 tools/install_agent.py --board rpi-4 --root /tmp/img --no-venv  # into an image or a test root

Standard library only (it runs before anything is installed). Nothing is
half-written: files go to a temporary name first and are renamed into place.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
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


# DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410); the 32 raw key bytes follow.
_ED25519_SPKI = bytes.fromhex("302a300506032b6570032100")


def public_key_id(path: Path) -> str:
    """The key id (sha256 of the raw Ed25519 public key) of a PEM public key; SystemExit naming the fix if not one."""
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise SystemExit(f"install_agent: --trusted-key {path} cannot be read ({exc}); pass the signing.pub of "
                         "`edgekit keys init`")
    if "PRIVATE KEY" in text:
        raise SystemExit(f"install_agent: --trusted-key {path} is a private key; a board needs only signing.pub")
    body = text.split("-----BEGIN PUBLIC KEY-----")[-1].split("-----END PUBLIC KEY-----")[0]
    try:
        der = base64.b64decode("".join(body.split()), validate=True)
    except (binascii.Error, ValueError):
        der = b""
    if "-----BEGIN PUBLIC KEY-----" not in text or len(der) != 44 or not der.startswith(_ED25519_SPKI):
        raise SystemExit(f"install_agent: --trusted-key {path} is not an Ed25519 public key in PEM; pass the "
                         "signing.pub of `edgekit keys init`")
    return hashlib.sha256(der[len(_ED25519_SPKI):]).hexdigest()


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
        if a.trusted_key:
            text = set_key(text, "update", "trusted_keys", [path for path, _ in self.trusted_keys()])
        dest = self.target(a.config)
        if dest.exists() and not a.force:
            self.say(f"keep the existing {dest} (--force replaces it)")
        else:
            self.write(dest, f"# installed by tools/install_agent.py from firmware_configs/{a.board}.toml\n" + text, 0o640)
        return dest

    def trusted_keys(self) -> List[tuple]:
        """(path on the board, source) of each --trusted-key: /etc/edgekit/trusted_keys/<key id 16>.pub."""
        return [(f"{self.args.keys_dir}/{public_key_id(Path(k))[:16]}.pub", Path(k)) for k in self.args.trusted_key]

    def keys(self) -> None:
        """Copy the public keys the board trusts; without any, say that it will run any bundle."""
        a = self.args
        if not a.trusted_key:
            self.say("skip trusted keys: without --trusted-key the board runs any bundle it is given or pushed")
            return
        self.mkdir(self.target(a.keys_dir))
        for board_path, src in self.trusted_keys():
            dest = self.target(board_path)
            self.say(f"copy {src} -> {dest} (key id {public_key_id(src)[:16]}...)")
            if not self.dry:
                tmp = dest.with_name(dest.name + ".tmp")
                shutil.copyfile(src, tmp)
                os.chmod(tmp, 0o644)
                os.replace(tmp, dest)

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

    def check(self) -> None:
        """Before anything is written: the keys are Ed25519 public keys and the bundle is signed by one of them."""
        a = self.args
        ids = {public_key_id(Path(k)) for k in a.trusted_key}
        if ids and a.bundle:
            try:
                signer = json.loads((Path(a.bundle) / "signature.json").read_text(encoding="utf-8")).get("key_id")
            except (OSError, ValueError, AttributeError):
                signer = None
            if signer not in ids:
                raise SystemExit(f"install_agent: --bundle {a.bundle} is not signed by a --trusted-key, so the agent "
                                 "would refuse to start on it; sign it first: edgekit sign BUNDLE_DIR --key signing.key")

    def install(self) -> None:
        a = self.args
        self.check()
        if a.venv:
            self.venv()
        else:
            self.say("skip the venv (--no-venv)")
        self.mkdir(self.target(a.state_dir) / "inbox")
        self.keys()
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


def set_key(text: str, table: str, key: str, value) -> str:
    """Replace ``key = ...`` inside ``[table]`` of a TOML profile (keeps comments and layout).

    ``value`` is a string or a list of strings (written as a TOML array)."""
    literal = json.dumps(value) if isinstance(value, list) else f'"{value}"'  # JSON strings are TOML basic strings
    out, current, done = [], None, False
    for line in text.splitlines(keepends=True):
        m = re.match(r"\s*\[([A-Za-z_]+)\]\s*(#.*)?$", line)
        if m:
            if current == table and not done:
                out.append(f"{key} = {literal}\n")
                done = True
            current = m.group(1)
        elif current == table and not done:
            m = re.match(rf'\s*#?\s*{key}\s*=\s*("[^"]*"|\[[^\]]*\]|[^#\s]*)\s*(#.*)?$', line.rstrip("\n"))
            if m:
                line = f"{key} = {literal}" + (f"  {m.group(2)}" if m.group(2) else "") + "\n"
                done = True
        out.append(line)
    if not done:
        if current != table:
            out.append(f"\n[{table}]\n")
        out.append(f"{key} = {literal}\n")
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
    p.add_argument("--trusted-key", action="append", default=[], metavar="PUB",
                   help="a public key (signing.pub of `edgekit keys init`) whose signed bundles the board runs; "
                        "repeat for several (key rotation). Without any, the board runs any bundle")
    p.add_argument("--keys-dir", default="/etc/edgekit/trusted_keys", help="where trusted keys go on the board")
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
