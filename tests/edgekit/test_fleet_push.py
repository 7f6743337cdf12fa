"""`edgekit fleet push` against a real Mosquitto: a retained edgekit.bundle/1 that an independent client
(mosquitto_sub) receives, validates, unpacks and verifies; a bad bundle publishes nothing."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import jsonschema

from device_agent.delivery import protocol
from device_agent.update.manifest import load_bundle
from edgekit.cli import main

DATA = Path(__file__).resolve().parents[1] / "device_agent" / "data"
V2 = DATA / "digits-bundle-v2"


def retained(port: int, topic: str, count: int, wait_s: int = 5) -> list:
    """What mosquitto_sub (an independent client) receives as *retained* messages on ``topic``."""
    out = subprocess.run(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-t", topic, "-v", "--retained-only",
         "-C", str(count), "-W", str(wait_s)],
        capture_output=True, text=True, timeout=wait_s + 10,
    )
    return [line.split(" ", 1) for line in out.stdout.splitlines() if line.strip()]


def test_push_delivers_a_retained_bundle_that_unpacks_and_verifies(broker, capsys, tmp_path):
    bundle = tmp_path / "digits-v2"  # as `edgekit retrain` leaves it: a report beside the model
    shutil.copytree(V2, bundle)
    (bundle / "report").mkdir()
    (bundle / "report" / "confusion.png").write_bytes(bytes(2_000_000))
    rc = main(["fleet", "push", str(bundle), "--broker", broker.url, "--fleet", "lab", "--device", "pi-1",
               "--device", "pi-2", "--allow-unsigned"])  # boards that trust no key (signed pushes: test_signing.py)
    out = capsys.readouterr().out.splitlines()
    assert rc == 0, out
    assert len(out) == 2 and all(line.startswith("pushed digits v2") and "acknowledged" in line for line in out)

    got = dict(retained(broker.port, "edgekit/v1/lab/+/bundle", 2))  # subscribed after the push: retained
    assert sorted(got) == ["edgekit/v1/lab/pi-1/bundle", "edgekit/v1/lab/pi-2/bundle"]
    manifest = load_bundle(V2).manifest
    for text in got.values():
        payload = json.loads(text)
        jsonschema.Draft202012Validator(protocol.SCHEMAS["edgekit.bundle/1"]).validate(payload)
        archive = base64.b64decode(payload["archive"], validate=True)
        assert len(archive) == payload["size"] and hashlib.sha256(archive).hexdigest() == payload["archive_sha256"]
        target = tmp_path / payload["archive_sha256"][:8]
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            names = sorted(m.name for m in tar.getmembers() if m.isfile())
            assert names == ["digits-v2/manifest.json", "digits-v2/model.tflite"]  # only what a board needs
            tar.extractall(target, filter="data")
        (unpacked,) = [p.parent for p in target.rglob("manifest.json")]
        bundle = load_bundle(unpacked)  # checks the model's sha256 against the manifest
        assert bundle.manifest.sha256 == payload["sha256"] == manifest.sha256
        assert (payload["name"], payload["version"]) == ("digits", "2")


def test_all_devices_come_from_the_store(broker, capsys, tmp_path):
    from edgekit.loop.store import open_store

    url = f"sqlite:///{tmp_path}/s.db"
    with open_store(url) as store:
        for device in ("a", "b"):
            store.put_status(protocol.status_payload(device=device, fleet="lab", state="online"))
        store.put_status(protocol.status_payload(device="c", fleet="other", state="online"))
    assert main(["fleet", "push", str(V2), "--broker", broker.url, "--fleet", "lab", "--all-devices",
                 "--store", url, "--dry-run", "--allow-unsigned"]) == 0
    dry = capsys.readouterr().out.splitlines()
    assert [line.split(" to ")[1].split()[0] for line in dry] == ["edgekit/v1/lab/a/bundle", "edgekit/v1/lab/b/bundle"]
    assert retained(broker.port, "edgekit/v1/#", 1, wait_s=1) == []  # a dry run publishes nothing

    assert main(["fleet", "push", str(V2), "--broker", broker.url, "--fleet", "lab", "--all-devices",
                 "--store", url, "--protocol", "3.1.1", "--allow-unsigned"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert sorted(t for t, _ in retained(broker.port, "edgekit/v1/#", 2)) == [
        "edgekit/v1/lab/a/bundle", "edgekit/v1/lab/b/bundle"]


def test_a_bad_bundle_gives_one_line_and_publishes_nothing(broker, capsys, tmp_path):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(V2, corrupt)
    (corrupt / "model.tflite").write_bytes((corrupt / "model.tflite").read_bytes()[:-10] + b"0123456789")
    cases = [(tmp_path / "missing", "does not exist"), (corrupt, "does not match the manifest")]
    for path, why in cases:
        rc = main(["fleet", "push", str(path), "--broker", broker.url, "--fleet", "lab", "--device", "pi-1"])
        captured = capsys.readouterr()
        assert rc == 1 and captured.out == ""
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("BundleError: ") and why in lines[0], lines

    rc = main(["fleet", "push", str(V2), "--broker", broker.url, "--fleet", "lab", "--device", "pi-1",
               "--max-bytes", "4096", "--allow-unsigned"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "over max_bytes=4096" in err[0]
    assert retained(broker.port, "edgekit/v1/#", 1, wait_s=1) == []


class _Paced(object):
    """Digits one every 10 ms until stopped, like a camera (yielding None between inputs lets the agent work)."""

    finite = False

    def __init__(self, x):
        self.x = x

    def items(self, stop):
        import time

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


def test_a_running_agent_reports_the_pushed_version(broker, capsys, tmp_path):
    """The loop's last step end to end: `edgekit fleet push` -> the board swaps -> its retained status says v2."""
    import threading
    import time

    import numpy as np

    from device_agent.agent import Agent
    from device_agent.config import load_config

    with np.load(DATA / "digits-300.npz") as d:
        x = d["x"][:50]
    config = load_config(None, bundle=str(DATA / "digits-bundle"), broker=broker.url, device_id="pi-1", fleet="lab",
                         outbox=str(tmp_path / "outbox.sqlite"), results=str(tmp_path / "results.jsonl"),
                         mqtt={"reconnect_min_s": 0.2, "reconnect_max_s": 1.0})
    stop = threading.Event()
    with Agent(config, source=_Paced(x)) as agent:
        thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
        thread.start()
        try:
            assert agent.link.wait_connected(10)
            assert main(["fleet", "push", str(V2), "--broker", broker.url, "--fleet", "lab", "--device", "pi-1",
                         "--allow-unsigned"]) == 0
            v2 = load_bundle(V2).manifest
            status = {}
            deadline = time.monotonic() + 30  # staging runs a trial in a child process first: ~1 s on a busy machine
            while time.monotonic() < deadline:
                got = retained(broker.port, "edgekit/v1/lab/pi-1/status", 1, wait_s=1)
                status = json.loads(got[0][1]) if got else {}
                if status.get("model") == v2.model_ref:
                    break
                time.sleep(0.2)
            assert status.get("model") == v2.model_ref and status["state"] == "online", status
        finally:
            stop.set()
            thread.join(30)
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert lines[0]["model_version"] == "1" and lines[-1]["model_version"] == "2"
