"""A Mosquitto configuration where every client speaks only for itself (``edgekit broker-config``).

The broker listens with TLS only, demands a client certificate signed by the fleet's CA
(``require_certificate``), takes the certificate's common name as the MQTT username
(``use_identity_as_username``) and as its client id (``use_username_as_clientid``: a client
cannot take over another's session by reusing its client id), and checks every publish and
subscription against an ACL:

* a board (CN = its device id) writes only ``edgekit/v1/<fleet>/<its id>/{samples,telemetry,status,predictions}``
  and reads only its own ``cmd``, ``bundle`` and ``ack``: one ``pattern`` line per topic, with ``%u``
  standing for the CN, so enrolling a board never touches the broker;
* each host identity (CN ``<role>:<name>``) gets a ``user`` block with its role's rights (:data:`HOST_RIGHTS`).

The fleet level is written out, one set of lines per fleet the broker serves (``--fleet``, by default
every fleet the CA has enrolled boards in), rather than ``+``: with ``+`` a board could publish under
its own id in a fleet it does not belong to, or in invented fleets. ``any_fleet=True`` writes ``+``
for brokers whose fleets come and go; the collector's allow-list (the CA's enrolment list, which
records each board's fleet) still refuses a board outside its fleet.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import IdentityError, OutputExistsError
from .identity import LEAF_DAYS, CertificateAuthority, Identity, _check_name

__all__ = ["BOARD_RIGHTS", "HOST_RIGHTS", "BrokerConfig", "acl_text", "write_broker_config"]

PREFIX = "edgekit/v1"

BOARD_RIGHTS: Tuple[Tuple[str, str], ...] = (
    ("write", "samples"), ("write", "telemetry"), ("write", "status"), ("write", "predictions"),
    ("read", "cmd"), ("read", "bundle"), ("read", "ack"),
)
"""What a board may do on its own topics ``edgekit/v1/<fleet>/<its id>/<kind>``."""

HOST_RIGHTS: Dict[str, Tuple[Tuple[str, str], ...]] = {
    # edgekit collect: what the boards send, and the end-to-end acknowledgement of what it stored
    "collector": (("read", "samples"), ("read", "telemetry"), ("read", "status"), ("write", "ack")),
    # edgekit fleet push (and commands): what the boards run; status shows whether they took it
    "pusher": (("write", "bundle"), ("write", "cmd"), ("read", "status")),
    # an operator with mosquitto_sub/pub: every topic of the fleet, and the broker's $SYS figures
    "admin": (("readwrite", "#"),),
}
"""What each host role may do on ``edgekit/v1/<fleet>/+/<kind>`` of the fleets it serves."""


@dataclass(frozen=True)
class BrokerConfig:
    """The files :func:`write_broker_config` wrote."""

    dir: Path
    conf: Path
    acl: Path
    fleets: Tuple[str, ...]  # ("+",) with any_fleet
    hosts: Tuple[str, ...]
    port: int


def acl_text(fleets: Sequence[str], host_identities: Sequence[Identity], *,
             extra_board_read: Sequence[str] = ()) -> str:
    """The ACL file: board patterns per fleet, then a ``user`` block per host identity."""
    lines = [
        "# edgekit broker ACL, written by `edgekit broker-config` (docs/identity.md). Anything not granted here",
        "# is refused. Every client's MQTT username is its certificate's CN (use_identity_as_username):",
        "# a board's CN is its device id, so %u below pins the device level of its topics to the board itself.",
        "",
        "# Boards: write their own samples/telemetry/status/predictions; read their own cmd/bundle/ack.",
    ]
    for fleet in fleets:
        for access, kind in BOARD_RIGHTS:
            lines.append(f"pattern {access} {PREFIX}/{fleet}/%u/{kind}")
    for topic in extra_board_read:
        lines.append(f"pattern read {topic}")
    for ident in sorted(host_identities, key=lambda i: (i.role, i.name)):
        serves = [ident.fleet] if ident.fleet else list(fleets)
        lines += ["", f"# {ident.role} {ident.name!r} (serial {ident.serial})", f"user {ident.cn}"]
        for fleet in serves:
            for access, kind in HOST_RIGHTS[ident.role]:
                lines.append(f"topic {access} {PREFIX}/{fleet}/{kind}" if kind == "#"
                             else f"topic {access} {PREFIX}/{fleet}/+/{kind}")
        if ident.role == "admin":
            lines.append("topic read $SYS/#")
    return "\n".join(lines) + "\n"


def _conf_text(d: str, port: int, bind: Optional[str]) -> str:
    return "\n".join([
        "# Mosquitto configuration for an edgekit fleet, written by `edgekit broker-config` (docs/identity.md).",
        "# Run it alone (mosquitto -c this file) or drop it into /etc/mosquitto/conf.d/. The listener takes TLS",
        "# clients with a certificate signed by the fleet's CA only; the CN is the username acl.conf is written for.",
        "per_listener_settings false",
        "allow_anonymous false",
        f"acl_file {d}/acl.conf",
        "",
        f"listener {port}" + (f" {bind}" if bind else ""),
        f"cafile {d}/ca.crt",
        f"certfile {d}/server.crt",
        f"keyfile {d}/server.key",
        f"crlfile {d}/crl.pem",
        "require_certificate true",
        "use_identity_as_username true",
        "# the client id becomes the CN too: no client can take over (and disconnect) another's session",
        "use_username_as_clientid true",
        "",
    ])


def write_broker_config(
    ca: CertificateAuthority,
    out: os.PathLike | str,
    *,
    hosts: Sequence[str],
    port: int = 8883,
    bind: Optional[str] = None,
    fleets: Optional[Sequence[str]] = None,
    any_fleet: bool = False,
    install_dir: Optional[str] = None,
    extra_board_read: Sequence[str] = (),
    days: int = LEAF_DAYS,
    force: bool = False,
) -> BrokerConfig:
    """Write ``mosquitto.conf``, ``acl.conf``, the CA, the CRL and a server certificate for ``hosts`` into ``out``.

    ``install_dir`` is where the files will live on the broker machine (the paths written into
    mosquitto.conf); by default ``out`` itself.
    """
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"{out} exists; choose a new directory or pass --force to replace it")
    if not 1 <= int(port) <= 65535:
        raise IdentityError(f"port={port} must be within 1..65535")
    for topic in extra_board_read:
        if not topic or any(c.isspace() for c in topic):
            raise IdentityError(f"--board-read {topic!r} must be one MQTT topic filter without spaces")
    if any_fleet:
        served: List[str] = ["+"]
    else:
        served = sorted(set(fleets or ())) or sorted({i.fleet for i in ca.active("device") if i.fleet})
        if not served:
            raise IdentityError("no fleet to serve: enroll a board first (`edgekit fleet enroll ID --fleet F`), "
                                "or pass --fleet F (or --any-fleet)")
        for f in served:
            _check_name(f, "fleet")
    hosts_ids = [i for i in ca.active() if i.role in HOST_RIGHTS]
    where = install_dir or str(out.resolve())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        os.chmod(tmp, 0o750)
        ca.server_certificate(list(hosts), tmp, days=days)
        shutil.copyfile(ca.ca_file, tmp / "ca.crt")
        ca.write_crl()
        shutil.copyfile(ca.crl_file, tmp / "crl.pem")
        (tmp / "acl.conf").write_text(acl_text(served, hosts_ids, extra_board_read=extra_board_read))
        (tmp / "mosquitto.conf").write_text(_conf_text(where.rstrip("/"), int(port), bind))
        for name in ("ca.crt", "crl.pem", "acl.conf", "mosquitto.conf"):
            os.chmod(tmp / name, 0o644)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return BrokerConfig(out, out / "mosquitto.conf", out / "acl.conf", tuple(served), tuple(hosts), int(port))
