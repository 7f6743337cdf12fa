"""A pushed model's trial run: opened and run on a few inputs in a child process, before the agent opens it.

A ``.tflite`` is a program for the interpreter, and a malformed one can crash it (SIGSEGV) or make
it allocate or loop without end. :func:`trial_run` starts ``python -I -c <child>`` with the same
interpreter package; the child sets its own limits first (address space: what the runtime already
mapped plus ``memory_bytes``; CPU seconds; no core file; no file writes), then opens the model,
allocates its tensors and invokes it on ``inputs`` inputs (zeros, seeded random values, the dtype's
maximum), and prints one JSON line. The parent waits at most ``timeout_s`` (then kills the child's
process group). A crash names its signal, e.g.::

    model.tflite crashed the interpreter in its trial run (SIGSEGV, signal 11): a malformed or hostile model; ...

Only a model whose trial run ended cleanly is opened in the agent's own process. The cost is a
Python start, the runtime's import and the model's load (bench/bench_update.py measures it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Union

from ..errors import BundleError

__all__ = ["TrialResult", "TrialTimeout", "trial_run"]

# The child: no device_agent import (a fresh, small process), limits before the model is touched.
_CHILD = r"""
import importlib, json, resource, sys
path, module, threads, budget, cpu_s, inputs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
import numpy as np
klass = importlib.import_module(module).Interpreter
for res, value in ((resource.RLIMIT_CORE, 0), (resource.RLIMIT_FSIZE, 0), (resource.RLIMIT_CPU, cpu_s)):
    try:
        resource.setrlimit(res, (value, value))
    except (ValueError, OSError):
        pass
if budget > 0:
    try:
        with open("/proc/self/status") as fh:
            vm = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (vm + budget, vm + budget))
    except (OSError, ValueError, StopIteration):
        pass
try:
    interp = klass(model_path=path, num_threads=threads)
    interp.allocate_tensors()
    ins, outs = interp.get_input_details(), interp.get_output_details()
    rng = np.random.default_rng(0)
    for i in range(inputs):
        for d in ins:
            shape, dtype = [int(s) for s in d["shape"]], np.dtype(d["dtype"])
            if i == 0:
                x = np.zeros(shape, dtype)
            elif dtype.kind in "iu":
                info = np.iinfo(dtype)
                x = (rng.integers(info.min, info.max, size=shape, endpoint=True) if i == 1 else np.full(shape, info.max)).astype(dtype)
            else:
                x = (rng.standard_normal(shape) if i == 1 else np.ones(shape)).astype(dtype)
            interp.set_tensor(d["index"], x)
        interp.invoke()
        for d in outs:
            interp.get_tensor(d["index"])
except MemoryError:
    print(json.dumps({"ok": False, "why": "memory"}), flush=True)
    sys.exit(4)
except Exception as exc:
    print(json.dumps({"ok": False, "why": "error", "error": f"{exc.__class__.__name__}: {exc}"[:300]}), flush=True)
    sys.exit(3)
print(json.dumps({"ok": True, "inputs": len(ins), "outputs": len(outs)}), flush=True)
"""

_MODULES = {"ai_edge_litert": "ai_edge_litert.interpreter", "tflite_runtime": "tflite_runtime.interpreter",
            "tensorflow": "tensorflow.lite.python.interpreter"}


class TrialTimeout(BundleError):
    """The trial run did not finish in time (possibly a busy board: not held against the archive for good)."""


@dataclass(frozen=True)
class TrialResult:
    """A clean trial run, and what it cost (the whole child: start, import, load, invokes)."""

    ms: float
    inputs: int
    outputs: int


def trial_run(model_path: Union[str, os.PathLike], *, runtime: str, threads: int = 1,
              memory_bytes: int = 256 << 20, timeout_s: float = 60.0, inputs: int = 3,
              cancel: Optional[threading.Event] = None) -> TrialResult:
    """Run the model in a child process; :class:`BundleError` with one line when it crashed, was
    killed by a signal, ran out of ``memory_bytes`` or failed to load, :class:`TrialTimeout` when it
    ran past ``timeout_s`` (or ``cancel`` was set: the agent is stopping)."""
    name = Path(model_path).name
    module = _MODULES.get(runtime)
    if module is None:
        raise BundleError(f"trial run: runtime={runtime!r} is unknown; expected one of {sorted(_MODULES)}")
    cmd = [sys.executable, "-I", "-c", _CHILD, str(Path(model_path).resolve()), module, str(int(threads)), str(int(memory_bytes)),
           str(max(1, (int(timeout_s) + 1) * max(1, int(threads)))), str(int(inputs))]  # CPU s over all threads
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, cwd="/")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            out, err = proc.communicate(timeout=max(0.01, min(0.25, deadline - time.monotonic())))
            break
        except subprocess.TimeoutExpired:
            if time.monotonic() < deadline and not (cancel is not None and cancel.is_set()):
                continue
            _kill_group(proc)
            proc.communicate()
            if cancel is not None and cancel.is_set():
                raise TrialTimeout(f"{name}: trial run cancelled (the agent is stopping)") from None
            raise TrialTimeout(f"{name} did not finish its trial run within {timeout_s:g}s (a model that hangs, or one "
                               "far too slow for this board: [update].trial_timeout_s)") from None
    ms = (time.perf_counter() - t0) * 1000.0
    rc = proc.returncode
    report = _last_json(out)
    if rc < 0:
        sig = _signal_name(-rc)
        if -rc == getattr(signal, "SIGXCPU", -1):
            raise TrialTimeout(f"{name} used more CPU time than {timeout_s:g}s allow in its trial run (SIGXCPU)")
        raise BundleError(f"{name} crashed the interpreter in its trial run ({sig}, signal {-rc}): a malformed or "
                          "hostile model; re-create the bundle with `edgekit convert`")
    if report.get("why") == "memory" or (rc != 0 and b"bad_alloc" in err):
        raise BundleError(f"{name} needs more than {memory_bytes >> 20} MiB in its trial run "
                          "([update].trial_memory_mb)")
    if rc != 0 or not report.get("ok"):
        detail = report.get("error") or _tail(err) or f"exit status {rc}"
        raise BundleError(f"{name} failed its trial run ({detail})")
    return TrialResult(ms=ms, inputs=int(report.get("inputs", 0)), outputs=int(report.get("outputs", 0)))


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the child and anything it started (its own session); only while it is not reaped yet."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        pass


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def _last_json(out: bytes) -> Dict[str, Any]:
    for line in reversed(out.decode("utf-8", "replace").splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            return value if isinstance(value, dict) else {}
    return {}


def _tail(err: bytes, n: int = 200) -> Optional[str]:
    text = " ".join(err.decode("utf-8", "replace").split())
    return text[-n:] if text else None
