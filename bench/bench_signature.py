"""What checking a bundle's signature costs a board per update, next to the rest of installing it.

The board's code only (device_agent, no TensorFlow): runs in the device environments.

* ``verify``: one Ed25519 verification of manifest.json (what an update adds at the least);
* ``check``: :meth:`Verifier.check_archive`, everything the signature check does on a pushed archive before
  anything is unpacked: read the tar headers, manifest.json and signature.json, verify, hash the model
  against the signed sha256, apply the release rule;
* ``stage``: :meth:`Updater.stage` without a verifier (parse the message, unpack, sha256, open the model on the
  interpreter, one trial inference): what an update cost before, and the same with the verifier.

Two bundles: the digits test bundle (a 27 KB model), and the same with a 4 MiB model file (a MobileNet-sized
model; random bytes, so only the hashing steps run on it, not the interpreter).

    .venv-device/bin/python bench/bench_signature.py [--runs 200]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from device_agent.delivery import protocol  # noqa: E402
from device_agent.inference.interpreter import TFLiteModel, available_runtimes  # noqa: E402
from device_agent.inference.preprocess import preprocess  # noqa: E402
from device_agent.update.signature import Verifier, load_public_key, signature_document  # noqa: E402
from device_agent.update.updater import Updater  # noqa: E402

BUNDLE = ROOT / "tests" / "device_agent" / "data" / "digits-bundle"


def sign(bundle: Path, key: Ed25519PrivateKey, key_id: str, release: int) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["release"] = release
    text = (json.dumps(manifest, indent=2) + "\n").encode()
    (bundle / "manifest.json").write_bytes(text)
    (bundle / "signature.json").write_bytes(signature_document(key_id, key.sign(text)))


def median_ms(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-signature-"))
    try:
        key = Ed25519PrivateKey.generate()
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        key_id = hashlib.sha256(raw).hexdigest()
        pub = work / "signing.pub"
        pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo))
        digits = work / "digits"
        shutil.copytree(BUNDLE, digits)
        sign(digits, key, key_id, 1)
        big = work / "big"
        shutil.copytree(BUNDLE, big)
        (big / "model.tflite").write_bytes(os.urandom(4 << 20))
        m = json.loads((big / "manifest.json").read_text())
        m["model"]["sha256"] = hashlib.sha256((big / "model.tflite").read_bytes()).hexdigest()
        (big / "manifest.json").write_text(json.dumps(m, indent=2))
        sign(big, key, key_id, 1)
        trusted = [load_public_key(pub)]
        runtime = available_runtimes()[0]

        def open_model(path):
            return TFLiteModel.open(path, runtime, 1)

        def check(bundle, model):
            pre = bundle.manifest.preprocessing
            model(preprocess(np.zeros(tuple(pre.shape), dtype=pre.raw_dtype), pre))

        rows = []
        for name, bundle, runs in (("digits, 27 KB model", digits, args.runs), ("4 MiB model", big, max(20, args.runs // 10))):
            archive = protocol.pack_bundle(bundle)
            message = json.dumps(protocol.bundle_payload(archive, max_bytes=1 << 26)).encode()
            manifest = (bundle / "manifest.json").read_bytes()
            signature = base64.b64decode(json.loads((bundle / "signature.json").read_text())["signature"])
            verifier = Verifier(trusted, work / f"releases-{bundle.name}.json")
            verify = median_ms(lambda: trusted[0].public.verify(signature, manifest), runs)
            checked = median_ms(lambda: verifier.check_archive(archive, max_total=1 << 28), runs)

            def stage(v):
                state = work / f"state-{bundle.name}-{v is not None}"
                updater = Updater(state, device="b", open_model=open_model, check=check, running_sha256=str,
                                  max_bytes=1 << 26, verifier=v)

                def once():
                    shutil.rmtree(state / "bundles", ignore_errors=True)
                    try:
                        updater.stage(message).model.close()
                    except Exception:  # noqa: BLE001 - the 4 MiB "model" is random bytes: it stops at the interpreter
                        pass
                return once

            plain_once, signed_once = stage(None), stage(verifier)
            pairs = [(median_ms(plain_once, 1), median_ms(signed_once, 1)) for _ in range(runs)]  # interleaved
            plain = statistics.median(p for p, _ in pairs)
            signed = statistics.median(s for _, s in pairs)
            rows.append((name, verify, checked, plain, signed))
        print(f"runtime {runtime}, median of {args.runs} runs (4 MiB: {max(20, args.runs // 10)}); shared machine, noisy")
        print(f"{'bundle':<22}{'verify ms':>11}{'check ms':>10}{'stage ms':>10}{'stage+sig ms':>14}{'added':>9}")
        for name, verify, checked, plain, signed in rows:
            print(f"{name:<22}{verify:>11.3f}{checked:>10.3f}{plain:>10.3f}{signed:>14.3f}"
                  f"{100 * (signed - plain) / plain:>8.0f}%")
        print("stage of the 4 MiB model stops where the interpreter refuses random bytes (unpack + sha256 only)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
