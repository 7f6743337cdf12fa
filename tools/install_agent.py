#!/usr/bin/env python3
"""Install the edgekit agent on a board: a venv, the config, the bundle, a systemd unit.

    sudo python3 tools/install_agent.py --board rpi-4 --broker mqtt://broker.lan:1883 --bundle ./bundle \
        --trusted-key keys/signing.pub   # the board then runs only bundles that key signed
    sudo python3 tools/install_agent.py --board rpi-4 --broker mqtts://broker.lan:8883 \
         --identity ./ids/pi-kitchen-1                                    # its certificate (edgekit fleet enroll)
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
import ssl
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


class InstallError(Exception):
    """A wrong argument: one line that names it and the fix."""


def tls_files(args: argparse.Namespace) -> Optional[dict]:
    """The board's identity from --identity DIR (edgekit fleet enroll -o DIR) or --cert/--key/--ca;
    checked before anything is written: the files load, the key belongs to the certificate, the
    names agree with --device-id/--fleet, and the broker URL is mqtts://."""
    files = None
    if args.identity:
        d = Path(args.identity)
        if not (d / "identity.json").is_file():
            raise InstallError(f"--identity {d} has no identity.json; pass the directory `edgekit fleet enroll -o` wrote")
        try:
            ident = json.loads((d / "identity.json").read_text())
            name, role, fleet = str(ident["name"]), str(ident["role"]), ident.get("fleet")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InstallError(f"--identity {d}/identity.json cannot be read ({exc}); enroll the board again") from exc
        if role != "device":
            raise InstallError(f"--identity {d} is a {role} identity, not a board's; enroll the board with "
                               f"`edgekit fleet enroll DEVICE_ID --ca CA_DIR -o OUT`")
        for flag, given, enrolled in (("--device-id", args.device_id, name), ("--fleet", args.fleet, fleet)):
            if given and given != enrolled:
                raise InstallError(f"{flag} {given} but the certificate in {d} is for {enrolled}: the broker would "
                                   f"refuse every message; drop {flag} or enroll the board under that name")
        args.device_id, args.fleet = name, fleet
        files = {"cert": d / "client.crt", "key": d / "client.key", "ca": d / "ca.crt"}
    elif args.cert or args.key or args.ca:
        if not (args.cert and args.key and args.ca):
            raise InstallError("--cert, --key and --ca go together (or pass --identity DIR); give all three")
        files = {"cert": Path(args.cert), "key": Path(args.key), "ca": Path(args.ca)}
    if files is None:
        return None
    for what, path in files.items():
        if not path.is_file():
            raise InstallError(f"{what} file {path} does not exist; check the path")
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_cert_chain(str(files["cert"]), str(files["key"]))
        ctx.load_verify_locations(str(files["ca"]))
    except (ssl.SSLError, OSError) as exc:
        raise InstallError(f"the certificate {files['cert']}, key {files['key']} or CA {files['ca']} cannot be used "
                           f"({exc}); the key must belong to the certificate, all three PEM") from exc
    if not args.broker or not args.broker.startswith("mqtts://"):
        raise InstallError(f"--broker {args.broker or '(none)'}: a board with a certificate talks TLS; pass "
                           "--broker mqtts://HOST:8883 (the listener of `edgekit broker-config`)")
    return files


# DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410); the 32 raw key bytes follow.
_ED25519_SPKI = bytes.fromhex("302a300506032b6570032100")


def public_key_id(path: Path) -> str:
    """The key id (sha256 of the raw Ed25519 public key) of a PEM public key; InstallError naming the fix if not one."""
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise InstallError(f"--trusted-key {path} cannot be read ({exc}); pass the signing.pub of `edgekit keys init`")
    if "PRIVATE KEY" in text:
        raise InstallError(f"--trusted-key {path} is a private key; a board needs only signing.pub")
    body = text.split("-----BEGIN PUBLIC KEY-----")[-1].split("-----END PUBLIC KEY-----")[0]
    try:
        der = base64.b64decode("".join(body.split()), validate=True)
    except (binascii.Error, ValueError):
        der = b""
    if "-----BEGIN PUBLIC KEY-----" not in text or len(der) != 44 or not der.startswith(_ED25519_SPKI):
        raise InstallError(f"--trusted-key {path} is not an Ed25519 public key in PEM; pass the signing.pub of "
                           "`edgekit keys init`")
    return hashlib.sha256(der[len(_ED25519_SPKI):]).hexdigest()


def trusted_keys(args: argparse.Namespace) -> List[tuple]:
    """(path on the board, source, key id) of each --trusted-key, checked before anything is written; and the
    --bundle must be signed by one of them, or the agent would refuse to start on it."""
    keys = []
    for k in args.trusted_key:
        kid = public_key_id(Path(k))
        keys.append((f"{args.keys_dir.rstrip('/')}/{kid[:16]}.pub", Path(k), kid))
    if keys and args.bundle:
        try:
            signer = json.loads((Path(args.bundle) / "signature.json").read_text(encoding="utf-8")).get("key_id")
        except (OSError, ValueError, AttributeError):
            signer = None
        if signer not in {kid for _, _, kid in keys}:
            raise InstallError(f"--bundle {args.bundle} is not signed by a --trusted-key, so the agent would refuse "
                               "to start on it; sign it first: edgekit sign BUNDLE_DIR --key signing.key")
    return keys


class Installer:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.root = Path(args.root).resolve()
        self.dry = args.dry_run
        self.actions: List[str] = []
        self.tls_files = tls_files(args)
        self.trusted_keys = trusted_keys(args)

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

    def copy(self, src: Path, dest: Path, mode: int) -> None:
        """Copy ``src`` to ``dest`` with ``mode`` from the first byte (a key is never readable by others)."""
        self.say(f"copy {src} -> {dest} (mode {mode:04o})")
        if self.dry:
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")
        if tmp.exists():
            tmp.unlink()
        fd = os.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(src.read_bytes())
        os.chmod(tmp, mode)
        os.replace(tmp, dest)

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

    def tls(self) -> None:
        """The board's certificate, key and the fleet's CA into --tls-dir (key 0600)."""
        t = self.tls_files
        if t is None:
            return
        d = self.target(self.args.tls_dir)
        self.mkdir(d)
        if not self.dry:
            os.chmod(d, 0o750)
        self.copy(t["ca"], d / "ca.crt", 0o644)
        self.copy(t["cert"], d / "client.crt", 0o644)
        self.copy(t["key"], d / "client.key", 0o600)

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
        if self.trusted_keys:
            text = set_key(text, "update", "trusted_keys", [path for path, _, _ in self.trusted_keys])
        if self.tls_files is not None:
            for key, name in (("ca_file", "ca.crt"), ("cert_file", "client.crt"), ("key_file", "client.key")):
                text = set_key(text, "mqtt", key, f"{a.tls_dir.rstrip('/')}/{name}")
        dest = self.target(a.config)
        if dest.exists() and not a.force:
            self.say(f"keep the existing {dest} (--force replaces it)")
        else:
            self.write(dest, f"# installed by tools/install_agent.py from firmware_configs/{a.board}.toml\n" + text, 0o640)
        return dest

    def keys(self) -> None:
        """Copy the public keys the board trusts; without any, say that it will run any bundle."""
        if not self.trusted_keys:
            self.say("skip trusted keys: without --trusted-key the board runs any bundle it is given or pushed")
            return
        for board_path, src, kid in self.trusted_keys:
            self.say(f"trust key {kid[:16]}... ({src})")
            self.copy(src, self.target(board_path), 0o644)

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
        self.tls()
        self.keys()
        self.config()
        self.bundle()
        self.unit()
        if self.root == Path("/") and not a.no_systemctl:
            if a.user != "root" and shutil.which("useradd"):
                self.run(["sh", "-c", f"id -u {a.user} >/dev/null 2>&1 || useradd --system --home {a.state_dir} {a.user}"])
                self.run(["chown", "-R", f"{a.user}:{a.user}", a.state_dir])
                if self.tls_files is not None:  # the agent's user reads its key; nobody else does
                    self.run(["chown", "-R", f"root:{a.user}", a.tls_dir])
                    self.run(["chown", f"{a.user}:{a.user}", f"{a.tls_dir.rstrip('/')}/client.key"])
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
    p.add_argument("--identity", metavar="DIR",
                   help="the board's enrolment directory (edgekit fleet enroll -o DIR): certificate, key, CA; "
                        "sets [device].id/fleet from it")
    p.add_argument("--cert", help="the board's client certificate (PEM), instead of --identity")
    p.add_argument("--key", help="its private key (PEM), installed with mode 0600")
    p.add_argument("--ca", help="the CA certificate the broker's certificate is signed by (PEM)")
    p.add_argument("--tls-dir", default="/etc/edgekit/tls", help="where the certificate, key and CA go")
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
    except (subprocess.CalledProcessError, InstallError) as exc:
        print(f"install_agent: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
