"""`edgekit keys init`, `edgekit sign`, `--sign-key` and `edgekit fleet push / rollback` with signed bundles.

Signatures edgekit makes verify with two independent implementations, the `openssl` command line and PyNaCl;
pushes and rollbacks go through a real Mosquitto to a real agent (the board's code, trusting the key).
"""

from __future__ import annotations

import base64
import json
import shutil
import stat
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from device_agent.agent import Agent
from device_agent.config import load_config
from device_agent.update.manifest import load_bundle
from edgekit.cli import main
from edgekit.fleet.keys import init_keys, last_release, sign_bundle

DATA = Path(__file__).resolve().parents[1] / "device_agent" / "data"
V1, V2 = DATA / "digits-bundle", DATA / "digits-bundle-v2"


def one_line_error(capsys, prefix: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if not line.startswith(("INFO", "WARNING"))]
    assert len(errors) == 1 and errors[0].startswith(prefix), err
    return errors[0]


def test_keys_init_writes_a_private_key_only_its_owner_reads_and_never_overwrites(tmp_path, capsys):
    assert main(["keys", "init", str(tmp_path / "keys")]) == 0
    out = capsys.readouterr().out
    private, public = tmp_path / "keys" / "signing.key", tmp_path / "keys" / "signing.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    key_id = out.split("key id:")[1].split()[0]
    # the key id is the sha256 of the raw public key, as openssl sees it too
    der = subprocess.run(["openssl", "pkey", "-pubin", "-in", str(public), "-outform", "DER"], capture_output=True,
                         check=True).stdout
    assert key_id == subprocess.run(["openssl", "dgst", "-sha256", "-r"], input=der[-32:], capture_output=True,
                                    check=True).stdout.split()[0].decode()
    assert main(["keys", "id", str(public), str(private)]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == [key_id, key_id]

    before = private.read_bytes()
    assert main(["keys", "init", str(tmp_path / "keys")]) == 1
    assert "exists; a signing key is never overwritten" in one_line_error(capsys, "OutputExistsError: ")
    assert private.read_bytes() == before


def test_sign_sets_the_release_and_openssl_and_pynacl_verify_the_signature(tmp_path, capsys):
    keys = init_keys(tmp_path / "keys")
    bundle = tmp_path / "b"
    shutil.copytree(V1, bundle)
    before = json.loads((bundle / "manifest.json").read_text())
    model = (bundle / "model.tflite").read_bytes()

    assert main(["sign", str(bundle), "--key", str(keys.private)]) == 0
    assert "as release 1 with key" in capsys.readouterr().out
    assert main(["sign", str(bundle), "--key", str(keys.private)]) == 0
    after = json.loads((bundle / "manifest.json").read_text())
    assert after.pop("release") == 2 and after == before  # nothing else changed
    assert list(json.loads((bundle / "manifest.json").read_text()))[:4] == ["format", "name", "version", "release"]
    assert (bundle / "model.tflite").read_bytes() == model and last_release(keys.private) == 2

    doc = json.loads((bundle / "signature.json").read_text())
    assert set(doc) == {"format", "algorithm", "key_id", "signature"} and doc["format"] == "edgekit-signature/1"
    sig = tmp_path / "sig.bin"
    sig.write_bytes(base64.b64decode(doc["signature"]))
    verify = ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(keys.public), "-rawin",
              "-in", str(bundle / "manifest.json"), "-sigfile", str(sig)]
    assert subprocess.run(verify, capture_output=True, text=True).stdout.strip() == "Signature Verified Successfully"

    from nacl.exceptions import BadSignatureError
    from nacl.signing import VerifyKey

    der = subprocess.run(["openssl", "pkey", "-pubin", "-in", str(keys.public), "-outform", "DER"],
                         capture_output=True, check=True).stdout
    nacl_key = VerifyKey(der[-32:])
    nacl_key.verify((bundle / "manifest.json").read_bytes(), base64.b64decode(doc["signature"]))
    with pytest.raises(BadSignatureError):  # one byte of the manifest changed: the signature no longer holds
        nacl_key.verify((bundle / "manifest.json").read_bytes().replace(b'"release": 2', b'"release": 3'),
                        base64.b64decode(doc["signature"]))

    # an explicit release (a CI build number); the next one continues from it
    assert main(["sign", str(bundle), "--key", str(keys.private), "--release", "40"]) == 0
    assert sign_bundle(bundle, keys.private).release == 41


def test_sign_refuses_with_one_line_and_writes_nothing(tmp_path, capsys):
    keys = init_keys(tmp_path / "keys")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(V1, corrupt)
    (corrupt / "model.tflite").write_bytes(b"x" + (corrupt / "model.tflite").read_bytes()[1:])
    archive = tmp_path / "b.tar.gz"
    from edgekit.convert.bundle import pack

    pack(V1, archive)
    cases = [
        ([str(corrupt), "--key", str(keys.private)], "BundleError: ", "does not match the manifest"),
        ([str(V1), "--key", str(keys.public)], "SigningError: ", "is a public key"),
        ([str(V1), "--key", str(tmp_path / "nope.key")], "SigningError: ", "edgekit keys init"),
        ([str(archive), "--key", str(keys.private)], "SigningError: ", "not a bundle directory"),
        ([str(V1), "--key", str(keys.private), "--release", "0"], "SigningError: ", "release=0 must be"),
    ]
    for args, prefix, why in cases:
        manifest = (V1 / "manifest.json").read_bytes()
        assert main(["sign", *args]) == 1
        assert why in one_line_error(capsys, prefix)
        assert (V1 / "manifest.json").read_bytes() == manifest and not (V1 / "signature.json").exists()
    assert not (corrupt / "signature.json").exists() and last_release(keys.private) == 0


def test_convert_and_retrain_check_the_key_before_the_slow_work(tmp_path, capsys):
    t0 = time.monotonic()
    assert main(["convert", "example", "--data", "digits", "-o", str(tmp_path / "out"),
                 "--sign-key", str(tmp_path / "missing.key")]) == 1
    assert "does not exist" in one_line_error(capsys, "SigningError: ")
    assert main(["retrain", str(V1), "--data", "digits", "--feedback", f"sqlite:///{tmp_path}/s.db",
                 "-o", str(tmp_path / "out2"), "--sign-key", str(tmp_path / "missing.key")]) == 1
    assert "does not exist" in one_line_error(capsys, "SigningError: ")
    assert time.monotonic() - t0 < 60 and not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


@pytest.mark.slow
def test_convert_with_a_sign_key_writes_a_signed_bundle(tmp_path, capsys, float_model_path):
    keys = init_keys(tmp_path / "keys")
    out = tmp_path / "bundle"
    assert main(["convert", str(float_model_path), "--data", "digits", "--mode", "ptq", "-o", str(out),
                 "--calibration-samples", "50", "--runtime", "ai_edge_litert", "--sign-key", str(keys.private),
                 "--no-progress"]) == 0
    assert "signed: release 1 with key" in capsys.readouterr().out
    from edgekit.fleet.keys import verify_bundle, load_signing_key

    assert verify_bundle(out, [load_signing_key(keys.private)]).release == 1
    load_bundle(out)


def retained(port: int, topic: str, wait_s: int = 5) -> list:
    out = subprocess.run(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-t", topic, "-v", "--retained-only",
                          "-C", "1", "-W", str(wait_s)], capture_output=True, text=True, timeout=wait_s + 10)
    return [line.split(" ", 1) for line in out.stdout.splitlines() if line.strip()]


def test_push_refuses_an_unsigned_bundle_or_signs_it_with_the_key(broker, tmp_path, capsys):
    keys = init_keys(tmp_path / "keys")
    bundle = tmp_path / "v2"
    shutil.copytree(V2, bundle)
    target = ["--broker", broker.url, "--fleet", "lab", "--device", "pi-1"]
    assert main(["fleet", "push", str(bundle), *target]) == 1
    err = one_line_error(capsys, "SigningError: ")
    assert "is not signed" in err and "--sign-key KEY" in err and "--allow-unsigned" in err
    assert retained(broker.port, "edgekit/v1/#", wait_s=1) == []

    assert main(["fleet", "push", str(bundle), *target, "--sign-key", str(keys.private), "--dry-run"]) == 0
    assert "would be signed by key" in capsys.readouterr().out and not (bundle / "signature.json").exists()

    assert main(["fleet", "push", str(bundle), *target, "--sign-key", str(keys.private)]) == 0
    assert "signed now by key" in capsys.readouterr().out
    assert json.loads((bundle / "manifest.json").read_text())["release"] == 1
    assert main(["fleet", "push", str(bundle), *target, "--sign-key", str(keys.private)]) == 0  # as it is
    assert f"signed by key {keys.key_id[:16]}..., release 1" in capsys.readouterr().out

    (topic, text), = retained(broker.port, "edgekit/v1/lab/pi-1/bundle")
    import io
    import tarfile

    archive = base64.b64decode(json.loads(text)["archive"])
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
        assert names == ["v2/manifest.json", "v2/signature.json", "v2/model.tflite"]  # signature before the model
    from device_agent.delivery.protocol import pack_bundle

    assert pack_bundle(bundle) == archive  # deterministic: the same files, the same bytes


class _Paced:
    finite = False

    def __init__(self, x):
        self.x = x

    def items(self, stop):
        i = 0
        while not stop.is_set():
            yield {"uri": "paced", "index": i}, self.x[i % len(self.x)]
            i += 1
            end = time.monotonic() + 0.01
            while time.monotonic() < end and not stop.is_set():
                yield None
                time.sleep(0.002)

    def close(self):
        pass


def test_rollback_is_the_old_bundle_signed_again_as_a_new_release(broker, tmp_path, capsys):
    keys = init_keys(tmp_path / "keys")
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    shutil.copytree(V1, v1)
    shutil.copytree(V2, v2)
    assert sign_bundle(v1, keys.private).release == 1
    assert sign_bundle(v2, keys.private).release == 2
    with np.load(DATA / "digits-300.npz") as d:
        x = d["x"][:50]
    config = load_config(None, bundle=str(v1), broker=broker.url, device_id="pi-1", fleet="lab",
                         outbox=str(tmp_path / "state" / "outbox.sqlite"), results="",
                         mqtt={"reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
                         update={"trusted_keys": [str(keys.public)]})
    target = ["--broker", broker.url, "--fleet", "lab", "--device", "pi-1"]
    m1, m2 = load_bundle(V1).manifest, load_bundle(V2).manifest
    stop = threading.Event()

    def wait(predicate, timeout=20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not predicate():
            time.sleep(0.05)
        return predicate()

    with Agent(config, source=_Paced(x)) as agent:
        thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
        thread.start()
        try:
            assert agent.link.wait_connected(10)
            assert main(["fleet", "push", str(v2), *target]) == 0
            assert wait(lambda: agent.manifest.sha256 == m2.sha256)
            assert main(["fleet", "push", str(v1), *target]) == 0  # release 1 < 2: the board says no
            assert wait(lambda: "older than release 2" in (agent.last_update_error or ""))
            status = json.loads(retained(broker.port, "edgekit/v1/lab/pi-1/status")[0][1])
            assert "fleet rollback" in status["last_update_error"] and status["model"] == m2.model_ref

            assert main(["fleet", "rollback", str(v1), *target, "--sign-key", str(keys.private)]) == 0
            assert "as release 3" in capsys.readouterr().out
            assert wait(lambda: agent.manifest.sha256 == m1.sha256)
            assert agent.last_update_error is None
            assert agent.telemetry()["signature"]["release"] == agent.telemetry()["signature"]["highest"] == 3
        finally:
            stop.set()
            thread.join(30)
    assert json.loads((v1 / "manifest.json").read_text())["release"] == 3 and last_release(keys.private) == 3
    with pytest.raises(SystemExit):  # a rollback without a key is a usage error
        main(["fleet", "rollback", str(v1), *target])
