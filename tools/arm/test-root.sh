#!/usr/bin/env bash
# The board side on ARM, tested on an x86 machine: a Debian bookworm root of the board's architecture
# (debootstrap), run under qemu-user through binfmt_misc. Inside it, a venv gets this tree's board side
# (`pip install -e '.[device,dev]'`, from PyPI, as pyproject.toml is written now), then the device tests
# run, none skipped, and `edgekit-agent check`, `bench` and `run` on the Raspberry Pi 4 profile.
#
#   tools/arm/test-root.sh arm64     # make test-arm64 (in .ci/run): ai-edge-litert, ~QEMU_CPU=cortex-a72
#   tools/arm/test-root.sh armhf     # make test-armhf (outside CI): tflite-runtime 2.14, 32-bit
#
# Needs root, debootstrap and qemu-user-static (.ci/run installs them; binfmt-support registers qemu).
# The root is cached outside the repository, in $EDGEKIT_ARM_CACHE (default /var/cache/edgekit-arm),
# under a name keyed by the recipe below: a change of suite, packages or mirror builds a new one.
# Everything runs in private mount and PID namespaces, so no mount and no process outlives the script.
set -euo pipefail

ARCH=${1:-}
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE=${EDGEKIT_ARM_CACHE:-/var/cache/edgekit-arm}
SUITE=bookworm
# The board's Debian packages: Python, and the broker and clients the device tests start (tests/broker.py,
# mosquitto_sub/_pub, mosquitto_passwd), openssl for the TLS test, stdbuf (coreutils). pip verifies PyPI
# against the host's CA bundle (copied in below: it holds any CA the machine's network needs).
PACKAGES=python3,python3-venv,mosquitto,mosquitto-clients,openssl,coreutils
case "$ARCH" in
    arm64)  # 64-bit Pi OS / Debian on a Pi 3, 4, 5, Zero 2 W
        QEMU=aarch64; EXTRA=device; RUNTIME=ai_edge_litert; CPUINFO=cpuinfo-rpi4-aarch64
        QEMU_CPU=${QEMU_CPU:-cortex-a72}
        VENV_FLAGS=""
        ;;
    armhf)  # 32-bit Pi OS: tflite-runtime 2.14 has armv7l wheels, but PyPI has none of numpy, psutil or
            # pillow: numpy<2 and psutil come from Debian (`apt install python3-numpy python3-psutil`, seen
            # through --system-site-packages) rather than compiled under emulation, and so does PyNaCl (dev
            # extra); pillow>=10 (dev extra; Debian has 9.4) is compiled (docs/agent.md, "ARM boards").
        QEMU=arm; EXTRA=device-tflite; RUNTIME=tflite_runtime; CPUINFO=cpuinfo-rpi4-armv7l
        QEMU_CPU=${QEMU_CPU:-cortex-a15}  # qemu-arm has no cortex-a72; the A15 is a subset of its AArch32
        PACKAGES=$PACKAGES,python3-numpy,python3-psutil,python3-nacl,build-essential,python3-dev,libjpeg62-turbo-dev,zlib1g-dev
        VENV_FLAGS="--system-site-packages"
        ;;
    *) echo "usage: $0 arm64|armhf" >&2; exit 2 ;;
esac
export QEMU_CPU

say() { echo "[test-$ARCH] $*"; }
die() { echo "[test-$ARCH] error: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot and mounts); run it as root, as .ci/run does"
command -v debootstrap >/dev/null || die "debootstrap is missing: apt-get install debootstrap (.ci/run does it)"
[ -e /usr/bin/qemu-$QEMU-static ] || die "qemu-$QEMU-static is missing: apt-get install qemu-user-static binfmt-support"

# binfmt_misc: the kernel runs $ARCH binaries through qemu-$QEMU-static (F flag: opened once, so the root
# needs no copy of it). Mount it and enable the entry when the machine has not.
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    say "mounting binfmt_misc"
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
if ! grep -qx enabled "/proc/sys/fs/binfmt_misc/qemu-$QEMU" 2>/dev/null; then
    command -v update-binfmts >/dev/null || die "binfmt-support is missing: apt-get install binfmt-support"
    update-binfmts --enable "qemu-$QEMU" >/dev/null
fi
grep -qx enabled "/proc/sys/fs/binfmt_misc/qemu-$QEMU" || die "binfmt entry qemu-$QEMU is not enabled"

# Debian's mirror, as this machine's apt is set up (deb822 .sources or one-line .list); override with
# EDGEKIT_ARM_MIRROR.
mirror() {
    python3 - "$SUITE" /etc/apt/sources.list /etc/apt/sources.list.d/* <<'EOF'
import re, sys
suite, found = sys.argv[1], []
for path in sys.argv[2:]:
    try:
        text = open(path, encoding="utf-8").read()
    except OSError:
        continue
    if path.endswith(".sources"):
        for block in re.split(r"\n\s*\n", text):
            f = dict((k.strip().lower(), v.strip()) for k, _, v in
                     (ln.partition(":") for ln in block.splitlines() if ln and not ln.startswith("#") and ":" in ln))
            if suite in f.get("suites", "").split() and "deb" in f.get("types", "").split():
                found += f.get("uris", "").split()
    else:
        for ln in text.splitlines():
            w = re.sub(r"\[[^]]*\]", "", ln).split()
            if len(w) >= 3 and w[0] == "deb" and w[2] == suite:
                found.append(w[1])
print(found[0] if found else "http://deb.debian.org/debian")
EOF
}
MIRROR=${EDGEKIT_ARM_MIRROR:-$(mirror)}

RECIPE="recipe=1 suite=$SUITE arch=$ARCH variant=minbase packages=$PACKAGES mirror=$MIRROR"
KEY=$(printf '%s' "$RECIPE" | sha256sum | cut -c1-12)
ROOT=$CACHE/$SUITE-$ARCH-$KEY
mkdir -p "$CACHE"
T0=$(date +%s)

if [ ! -e "$ROOT/.edgekit-root" ]; then
    say "building $ROOT ($RECIPE); cached for the next runs"
    rm -rf "$ROOT.tmp"
    # debootstrap mounts /proc and /sys in the target for its second stage: keep them in a private namespace.
    unshare --mount --propagation private \
        debootstrap --arch="$ARCH" --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOT.tmp" "$MIRROR" \
        >"$CACHE/debootstrap-$ARCH.log" 2>&1 \
        || { tail -20 "$CACHE/debootstrap-$ARCH.log" >&2; die "debootstrap failed; see $CACHE/debootstrap-$ARCH.log"; }
    rm -rf "$ROOT.tmp/var/cache/apt/archives/"*.deb
    printf '%s\n' "$RECIPE" >"$ROOT.tmp/.edgekit-root"
    for old in "$CACHE/$SUITE-$ARCH-"*; do  # roots of older recipes: the cache keeps one per architecture
        case "$old" in "$ROOT.tmp"|*.log) ;; *) [ -d "$old" ] && rm -rf "$old" ;; esac
    done
    mv "$ROOT.tmp" "$ROOT"
    say "root built in $(( $(date +%s) - T0 )) s"
else
    say "root $ROOT (cached)"
fi

# Packages the device tests came to need after the root's recipe was fixed, installed into the cached root with
# its own apt (under qemu) rather than by a new debootstrap: nats-server, the second broker of the ack-subscription
# test. Recorded in .edgekit-added; a change of this list installs again.
ADDED=nats-server
if [ "$(cat "$ROOT/.edgekit-added" 2>/dev/null)" != "$ADDED" ]; then
    T=$(date +%s)
    cp /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
    unshare --mount --pid --fork --propagation private /bin/bash -euo pipefail -c '
        R=$1
        mount -t proc proc "$R/proc"
        mount --rbind /dev "$R/dev"
        exec env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive \
            chroot "$R" /bin/bash -euo pipefail -c "apt-get update -qq && apt-get install -y -qq --no-install-recommends $2 >/dev/null && apt-get clean"
    ' _ "$ROOT" "$ADDED" || die "apt-get install $ADDED failed in $ROOT"
    printf '%s\n' "$ADDED" >"$ROOT/.edgekit-added"
    say "installed $ADDED in the root in $(( $(date +%s) - T )) s"
fi

# This tree, as it is now (committed or not), copied in; the venv installs from it in editable mode.
SRC=/opt/edgekit/src
mkdir -p "$ROOT$SRC"
rsync -a --delete --exclude=.git --exclude='.venv*' --exclude=__pycache__ --exclude='*.egg-info' \
    --exclude=build --exclude=.pytest_cache --exclude=demo-out --exclude=bench/out "$REPO/" "$ROOT$SRC/"
# pip checks the registry's certificate against the host's CA bundle (which may hold a proxy's CA).
mkdir -p "$ROOT/etc/ssl/certs"
cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/host-ca.crt"
cp /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
cp /etc/hosts "$ROOT/etc/hosts" 2>/dev/null || true

# In private mount + PID namespaces: /proc of its own with a Raspberry Pi 4's cpuinfo over it (ai-edge-litert
# crashes reading the x86 host's), /sys, /dev; every process started inside ends with the namespace.
say "running the board side under qemu-$QEMU (QEMU_CPU=$QEMU_CPU)"
unshare --mount --pid --fork --propagation private /bin/bash -euo pipefail -c '
    R=$1
    mount -t proc proc "$R/proc"
    mount --bind "$2" "$R/proc/cpuinfo"
    mount -t sysfs -o ro sysfs "$R/sys"
    mount --rbind /dev "$R/dev"
    mount -t tmpfs -o size=2g tmpfs "$R/tmp"
    exec env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
        QEMU_CPU="$QEMU_CPU" PIP_CERT=/etc/ssl/certs/host-ca.crt SSL_CERT_FILE=/etc/ssl/certs/host-ca.crt \
        PIP_DISABLE_PIP_VERSION_CHECK=1 \
        chroot "$R" /bin/bash '"$SRC"'/tools/arm/inside.sh "$3" "$4" "$5"
' _ "$ROOT" "$HERE/$CPUINFO" "$EXTRA" "$RUNTIME" "$VENV_FLAGS"
say "passed in $(( $(date +%s) - T0 )) s"
