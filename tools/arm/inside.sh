#!/bin/bash
# Runs inside the emulated root (tools/arm/test-root.sh starts it): the board side installed as a board
# would install it, the device tests, then `edgekit-agent check`, `bench` and `run` on the Pi 4 profile.
#   inside.sh EXTRA RUNTIME [VENV_FLAGS]
set -euo pipefail
EXTRA=$1 RUNTIME=$2 VENV_FLAGS=${3:-}
SRC=/opt/edgekit/src
VENV=/opt/edgekit/venv-$EXTRA
cd "$SRC"
echo "[inside] $(uname -m), $(python3 --version), $(grep -m1 '^Model' /proc/cpuinfo)"

# The venv follows pyproject.toml as written now: reinstalled whenever it (or the extra) changes.
WANT="$EXTRA $VENV_FLAGS $(sha256sum pyproject.toml | cut -c1-64)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.edgekit-installed" 2>/dev/null)" != "$WANT" ]; then
    T=$(date +%s)
    rm -rf "$VENV"
    # --no-compile: byte-compiling every installed file costs minutes under emulation; what is imported
    # is compiled (and cached in the root) on first use instead. So pip comes from Debian's wheel rather
    # than ensurepip, which compiles pip.
    python3 -m venv --without-pip $VENV_FLAGS "$VENV"
    PIP_WHEEL=$(ls /usr/share/python-wheels/pip-*.whl | tail -1)
    "$VENV/bin/python" "$PIP_WHEEL/pip" install --quiet --no-compile --no-index "$PIP_WHEEL"
    "$VENV/bin/pip" install --quiet --no-compile -e ".[$EXTRA,dev]"
    echo "$WANT" >"$VENV/.edgekit-installed"
    echo "[inside] installed .[$EXTRA,dev] in $(( $(date +%s) - T )) s"
fi
"$VENV/bin/pip" list --format=freeze 2>/dev/null | grep -iE '^(numpy|paho-mqtt|psutil|ai-edge-litert|tflite-runtime|cryptography|hypothesis)==' \
    | tr '\n' ' ' | sed 's/^/[inside] /; s/$/\n/'

# The device tests, none skipped: a skip here would hide a part the board lacks. Under emulation every wait of
# the tests is stretched 4x (an upper bound, not a pace), and the fuzz tests try 50 cases per parser instead of
# 300: the parsers are pure Python, fuzzed at 300 on x86 in the same CI run. One test is left to x86: the
# archive of 150,000 empty files, whose pure-Python tar building alone takes minutes under qemu (9 min in all at a
# load of 3-8), for an archive rule that has nothing architecture-specific in it.
T=$(date +%s)
export EDGEKIT_TEST_TIMEOUT_SCALE=${EDGEKIT_TEST_TIMEOUT_SCALE:-4} EDGEKIT_FUZZ_EXAMPLES=${EDGEKIT_FUZZ_EXAMPLES:-50}
EDGEKIT_EXPECT_RUNTIME=$RUNTIME "$VENV/bin/python" -m pytest tests/device_agent -p no:cacheprovider -q \
    --deselect tests/device_agent/test_attacks.py::test_150000_empty_files_are_refused_at_the_third \
    -o addopts="--strict-markers" -rs --durations=15 --junitxml=/tmp/device-tests.xml
"$VENV/bin/python" - <<'EOF'
import sys
import xml.etree.ElementTree as ET

suite = ET.parse("/tmp/device-tests.xml").getroot().find("testsuite")
skipped = [c.get("classname") + "::" + c.get("name") for c in suite.iter("testcase") if c.find("skipped") is not None]
if skipped:
    sys.exit(f"[inside] {len(skipped)} device tests were skipped on this board: {skipped}; each must run here")
print(f"[inside] device tests: {suite.get('tests')} run, none skipped")
EOF
echo "[inside] device tests took $(( $(date +%s) - T )) s"

# A short life of the agent on the Raspberry Pi 4 profile, as its README tells a user: check, bench, run.
T=$(date +%s)
S=/tmp/smoke
mkdir -p "$S"
AGENT="$VENV/bin/edgekit-agent"
DATA=tests/device_agent/data
PORT=$("$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
printf 'listener %s 127.0.0.1\nallow_anonymous true\nuser root\n' "$PORT" >"$S/mosquitto.conf"
mosquitto -c "$S/mosquitto.conf" >"$S/mosquitto.log" 2>&1 &
BROKER_PID=$!
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done
stdbuf -oL mosquitto_sub -h 127.0.0.1 -p "$PORT" -t 'edgekit/v1/arm-smoke/+/samples' -q 1 >"$S/samples.jsonl" &
SUB_PID=$!
trap 'kill $SUB_PID $BROKER_PID 2>/dev/null || true' EXIT
# The profile as shipped, but every input is a candidate to send (its per-minute cap still applies), and
# samples leave the outbox on the broker's PUBACK: no edgekit collector acknowledges them here (the device
# tests cover end-to-end acknowledgement).
sed -e 's/^random_fraction = .*/random_fraction = 1.0/' -e 's/^ack = "collector"/ack = "broker"/' \
    firmware_configs/rpi-4.toml >"$S/rpi-4.toml"
grep -q '^ack = "broker"' "$S/rpi-4.toml" || { echo "[inside] firmware_configs/rpi-4.toml has no ack line"; exit 1; }
FLAGS=(--config "$S/rpi-4.toml" --bundle "$DATA/digits-bundle" --outbox "$S/outbox.sqlite"
       --device-id pi-emulated --fleet arm-smoke)
"$AGENT" check "${FLAGS[@]}" --source "$DATA/digits-300.npz" --no-watch --broker "mqtt://127.0.0.1:$PORT"
"$AGENT" bench "${FLAGS[@]}" --runs 20 --threads 1,4
"$AGENT" run "${FLAGS[@]}" --source "$DATA/digits-300.npz" --no-watch --broker "mqtt://127.0.0.1:$PORT" \
    --results "$S/results.jsonl" 2>&1 | tee "$S/run.log"
DONE=$(grep -o 'done: .*' "$S/run.log")
grep -q "on $RUNTIME" "$S/run.log" || { echo "[inside] the agent did not run on $RUNTIME"; exit 1; }
[ "$(wc -l <"$S/results.jsonl")" = 300 ] || { echo "[inside] expected 300 result lines"; exit 1; }
PUBLISHED=$(echo "$DONE" | sed -E 's/.* ([0-9]+) published.*/\1/')
case "$DONE" in *"0 pending"*) ;; *) echo "[inside] samples left in the outbox: $DONE"; exit 1 ;; esac
[ "$PUBLISHED" -gt 0 ] || { echo "[inside] nothing was published: $DONE"; exit 1; }
for _ in $(seq 300); do [ "$(wc -l <"$S/samples.jsonl")" -ge "$PUBLISHED" ] && break; sleep 0.1; done
[ "$(wc -l <"$S/samples.jsonl")" -ge "$PUBLISHED" ] || { echo "[inside] the broker delivered fewer samples than published"; exit 1; }
echo "[inside] agent: $DONE; $(wc -l <"$S/samples.jsonl") samples reached a subscriber ($(( $(date +%s) - T )) s)"
