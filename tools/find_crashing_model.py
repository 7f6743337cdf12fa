"""Find a TFLite model that crashes the interpreter, by mutating a real one (how the crash fixture was made).

A model is a program: a few flipped bytes in a ``.tflite`` (a flatbuffer of offsets, indices and
shapes) can make the interpreter read or write out of bounds. Each mutant is opened and run in a
forked child, so a crash (SIGSEGV, SIGBUS, SIGABRT, ...) only ends the child::

    # search with one runtime; writes every crashing mutant into OUT/
    .venv-device/bin/python tools/find_crashing_model.py search tests/device_agent/data/digits-bundle/model.tflite \\
        --runtime ai_edge_litert --tries 20000 --out /tmp/crashers
    # check which of them crash another runtime too
    .venv-tflite/bin/python tools/find_crashing_model.py check /tmp/crashers/*.tflite --runtime tflite_runtime

    # make a bundle of one: the digits manifest with this model's sha256 and size
    .venv-device/bin/python tools/find_crashing_model.py bundle /tmp/crashers/SIGSEGV-20-....tflite \
        tests/device_agent/data/crash-bundle-tflite --version crash

tests/device_agent/data/crash-bundle-* hold such models (which runtime each crashes is in its
manifest's ``metrics.crashes``), each with a manifest whose sha256 matches it.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import random
import signal
import sys
from pathlib import Path

import numpy as np

MODULES = {"ai_edge_litert": "ai_edge_litert.interpreter", "tflite_runtime": "tflite_runtime.interpreter"}


def _run(klass, content: bytes, inputs: int = 3) -> None:
    """Open (from a file, as the agent does: ``model_path`` skips the flatbuffer verifier that
    ``model_content`` runs), allocate and invoke ``content`` on a few inputs (in the child)."""
    path = f"/dev/shm/edgekit-mutant-{os.getpid()}.tflite"
    with open(path, "wb") as fh:
        fh.write(content)
    interp = klass(model_path=path, num_threads=1)
    os.unlink(path)
    interp.allocate_tensors()
    rng = np.random.default_rng(0)
    for d in interp.get_input_details():
        shape = [int(s) for s in d["shape"]]
        dtype = np.dtype(d["dtype"])
        if dtype.kind in "iu":
            info = np.iinfo(dtype)
            x = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
        else:
            x = rng.standard_normal(shape).astype(dtype)
        interp.set_tensor(d["index"], x)
    for _ in range(inputs):
        interp.invoke()
    for d in interp.get_output_details():
        interp.get_tensor(d["index"])


def outcome(klass, content: bytes, timeout_s: int = 10) -> str:
    """``ok``, ``error`` (a Python exception) or the name of the signal that ended the child."""
    pid = os.fork()
    if pid == 0:  # child
        signal.alarm(timeout_s)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # runtimes print to stderr on bad models
        try:
            _run(klass, content)
        except BaseException:  # noqa: BLE001 - any Python-level refusal is not a crash
            os._exit(3)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return signal.Signals(os.WTERMSIG(status)).name
    return "ok" if os.WEXITSTATUS(status) == 0 else "error"


def small_ints(data: bytes) -> list:
    """Offsets of aligned little-endian int32 values in 1..4096: tensor and buffer indices, shapes, offsets."""
    return [i for i in range(0, len(data) - 3, 4) if 0 < int.from_bytes(data[i:i + 4], "little") <= 4096]


def mutate(data: bytes, rng: random.Random, targets: list) -> bytes:
    """``targets`` empty: 1-4 random bytes get random values; else one of ``targets`` (an int32) gets a
    nearby, negative or huge value (what breaks an index or a shape)."""
    out = bytearray(data)
    if not targets:
        for _ in range(rng.randint(1, 4)):
            out[rng.randrange(len(out))] = rng.randrange(256)
        return bytes(out)
    i = rng.choice(targets)
    old = int.from_bytes(out[i:i + 4], "little")
    new = rng.choice([old + rng.randint(1, 16), old * rng.randint(2, 1000), -rng.randint(1, 1 << 31),
                      rng.randint(1 << 16, (1 << 31) - 1)])
    out[i:i + 4] = (new & 0xFFFFFFFF).to_bytes(4, "little")
    return bytes(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("search")
    s.add_argument("model")
    s.add_argument("--runtime", default="ai_edge_litert", choices=sorted(MODULES))
    s.add_argument("--tries", type=int, default=5000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)
    s.add_argument("--stop-after", type=int, default=20, help="stop after this many crashers")
    s.add_argument("--batch", type=int, default=500, help="mutants per forked child")
    s.add_argument("--strategy", choices=["bytes", "ints"], default="ints",
                   help="bytes: random bytes anywhere; ints: aligned small int32 values (indices, shapes)")
    b = sub.add_parser("bundle")
    b.add_argument("model")
    b.add_argument("out")
    b.add_argument("--like", default=str(Path(__file__).resolve().parents[1] / "tests/device_agent/data/digits-bundle"))
    b.add_argument("--version", default="crash")
    b.add_argument("--crashes", default="", help="comma list of the runtimes it crashes (recorded in metrics)")
    c = sub.add_parser("check")
    c.add_argument("models", nargs="+")
    c.add_argument("--runtime", default="tflite_runtime", choices=sorted(MODULES))
    args = ap.parse_args()
    if args.cmd == "bundle":
        import json

        data = Path(args.model).read_bytes()
        manifest = json.loads((Path(args.like) / "manifest.json").read_text())
        manifest["version"] = args.version
        manifest["model"].update(sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))
        manifest["metrics"] = {"crashes": [r for r in args.crashes.split(",") if r],
                               "note": "a mutated digits model (tools/find_crashing_model.py)"}
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / manifest["model"]["file"]).write_bytes(data)
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        print(f"wrote {out}")
        return 0
    klass = importlib.import_module(MODULES[args.runtime]).Interpreter
    if args.cmd == "check":
        for path in args.models:
            print(f"{outcome(klass, Path(path).read_bytes())}\t{path}")
        return 0
    data = Path(args.model).read_bytes()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    targets = small_ints(data) if args.strategy == "ints" else []

    def mutant(i: int) -> bytes:  # the same mutant for the same seed and index, in any process
        return mutate(data, random.Random(args.seed * 1_000_003 + i), targets)

    counts: dict = {}
    found = i = 0
    while i < args.tries and found < args.stop_after:
        # One forked child runs a batch; it reports each index before trying it, so a crash names its mutant.
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
            for j in range(i, min(i + args.batch, args.tries)):
                os.write(w, f"{j}\n".encode())
                signal.alarm(10)
                try:
                    _run(klass, mutant(j))
                except BaseException:  # noqa: BLE001 - a Python-level refusal is not a crash
                    pass
            os._exit(0)
        os.close(w)
        with os.fdopen(r) as fh:
            seen = [int(line) for line in fh.read().split()]
        _, status = os.waitpid(pid, 0)
        last = seen[-1] if seen else i
        if os.WIFSIGNALED(status):
            result = signal.Signals(os.WTERMSIG(status)).name
            counts[result] = counts.get(result, 0) + 1
            m = mutant(last)
            sha = hashlib.sha256(m).hexdigest()
            (out / f"{result}-{last}-{sha[:12]}.tflite").write_bytes(m)
            print(f"try {last}: {result} ({sha[:12]})", flush=True)
            found += result != "SIGALRM"
        i = last + 1
    print(f"{i} mutants on {args.runtime}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
