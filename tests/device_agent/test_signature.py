"""The board's side of signed bundles (device_agent/update/signature.py), without a broker.

Signatures made by two independent implementations, the `openssl` command line (OpenSSL 3) and PyNaCl
(libsodium), following docs/bundle.md alone, verify on the board; archives an attacker could build by hand
are refused with the reason named; the release record survives restarts; start-up refuses an unsigned
configured bundle before any interpreter opens it.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from device_agent.agent import Agent
from device_agent.delivery.protocol import pack_bundle
from device_agent.errors import ConfigError, SignatureError
from device_agent.sources import ArraySource
from device_agent.update.signature import Verifier, load_public_key

from conftest import BUNDLE
from signing import Key, signed_copy

V2 = BUNDLE.parent / "digits-bundle-v2"
SPKI_ED25519 = bytes.fromhex("302a300506032b6570032100")  # RFC 8410 DER prefix of an Ed25519 public key
BIG = 1 << 27


def with_release(bundle: Path, release: int) -> bytes:
    """Put ``release`` into a copy's manifest by editing its text (no JSON library round trip)."""
    text = (bundle / "manifest.json").read_text()
    text = text.replace('"version": "1",', f'"version": "1",\n  "release": {release},', 1)
    (bundle / "manifest.json").write_text(text)
    return text.encode()


def openssl(*args: str, data: bytes = b"") -> bytes:
    return subprocess.run(["openssl", *args], input=data, capture_output=True, check=True).stdout


def test_a_bundle_signed_with_the_openssl_command_line_runs_on_the_board(tmp_path, make_config, digits):
    x, _ = digits
    key, pub = tmp_path / "k.pem", tmp_path / "k.pub"
    openssl("genpkey", "-algorithm", "ed25519", "-out", str(key))
    openssl("pkey", "-in", str(key), "-pubout", "-out", str(pub))
    bundle = tmp_path / "b"
    shutil.copytree(BUNDLE, bundle)
    with_release(bundle, 7)
    sig = openssl("pkeyutl", "-sign", "-rawin", "-inkey", str(key), "-in", str(bundle / "manifest.json"))
    raw_pub = openssl("pkey", "-pubin", "-in", str(pub), "-outform", "DER")[-32:]
    key_id = openssl("dgst", "-sha256", "-r", data=raw_pub).split()[0].decode()
    (bundle / "signature.json").write_text(json.dumps({
        "format": "edgekit-signature/1", "algorithm": "ed25519", "key_id": key_id,
        "signature": openssl("base64", "-A", data=sig).decode().strip()}))

    verifier = Verifier([load_public_key(pub)], tmp_path / "releases.json")
    assert verifier.verify_dir(bundle).release == 7
    assert verifier.check_archive(pack_bundle(bundle), max_total=BIG).key_id == key_id
    config = make_config("", update={"trusted_keys": [str(pub)]}).with_overrides(bundle=str(bundle))
    with Agent(config, source=ArraySource(x[:20])) as agent:
        stats = agent.run()
        assert agent.verifier.snapshot(agent.manifest.sha256)["release"] == 7
    assert stats.inferences == 20 and not stats.errors


def test_a_bundle_signed_with_pynacl_verifies_and_a_flipped_bit_does_not(tmp_path):
    from nacl.signing import SigningKey

    key = SigningKey.generate()
    raw = bytes(key.verify_key)
    pem = "-----BEGIN PUBLIC KEY-----\n" + base64.b64encode(SPKI_ED25519 + raw).decode() + "\n-----END PUBLIC KEY-----\n"
    (tmp_path / "nacl.pub").write_text(pem)
    bundle = tmp_path / "b"
    shutil.copytree(BUNDLE, bundle)
    manifest = with_release(bundle, 3)
    signature = key.sign(manifest).signature
    doc = {"format": "edgekit-signature/1", "algorithm": "ed25519", "key_id": hashlib.sha256(raw).hexdigest(),
           "signature": base64.b64encode(signature).decode()}
    (bundle / "signature.json").write_text(json.dumps(doc))
    verifier = Verifier([load_public_key(tmp_path / "nacl.pub")], tmp_path / "releases.json")
    assert verifier.check_archive(pack_bundle(bundle), max_total=BIG).release == 3

    flipped = bytearray(signature)
    flipped[10] ^= 1
    (bundle / "signature.json").write_text(json.dumps(dict(doc, signature=base64.b64encode(bytes(flipped)).decode())))
    with pytest.raises(SignatureError) as err:
        verifier.check_archive(pack_bundle(bundle), max_total=BIG)
    assert err.value.reason == "bad_signature" and verifier.refused == {"bad_signature": 1}


def tar_gz(members) -> bytes:
    """A .tar.gz of (name, bytes) members in the order given, as any tar tool could write it."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def owner(tmp_path):
    key = Key(tmp_path / "keys")
    signed = signed_copy(BUNDLE, tmp_path / "signed", key, 5)
    files = {n: (signed / n).read_bytes() for n in ("manifest.json", "signature.json", "model.tflite")}
    return key, files, Verifier([load_public_key(key.pub)], tmp_path / "releases.json")


def test_any_member_order_is_read_but_every_trick_is_refused(owner):
    key, f, verifier = owner
    m, s, model = f["manifest.json"], f["signature.json"], f["model.tflite"]
    # the model first: still one pass, nothing written
    assert verifier.verify_archive(tar_gz([("b/model.tflite", model), ("b/signature.json", s), ("b/manifest.json", m)]),
                                   max_total=BIG).release == 5
    unsigned_manifest = json.loads(m)
    del unsigned_manifest["release"]
    cases = {
        "a second manifest under an alias": ("malformed", [("b/manifest.json", m), ("b/signature.json", s),
                                                           ("b/model.tflite", model), ("b/./manifest.json", b"{}")]),
        "the signature in another folder": ("unsigned", [("b/manifest.json", m), ("c/signature.json", s),
                                                         ("b/model.tflite", model)]),
        "no signature": ("unsigned", [("b/manifest.json", m), ("b/model.tflite", model)]),
        "a huge signature.json": ("malformed", [("b/manifest.json", m), ("b/signature.json", s + b" " * 5000),
                                                ("b/model.tflite", model)]),
        "another model": ("model_mismatch", [("b/manifest.json", m), ("b/signature.json", s),
                                             ("b/model.tflite", (V2 / "model.tflite").read_bytes())]),
        "no model": ("malformed", [("b/manifest.json", m), ("b/signature.json", s)]),
        "65 members": ("malformed", [("b/manifest.json", m), ("b/signature.json", s), ("b/model.tflite", model)]
                       + [(f"b/x{i}", b"") for i in range(62)]),
        "not an archive": ("malformed", None),
    }
    for what, (reason, members) in cases.items():
        archive = tar_gz(members) if members is not None else b"\x1f\x8b" + bytes(500)
        with pytest.raises(SignatureError) as err:
            verifier.check_archive(archive, max_total=BIG)
        assert err.value.reason == reason, (what, str(err.value))
    assert sum(verifier.refused.values()) == len(cases)


def test_what_the_signed_manifest_must_say(owner, tmp_path):
    key, _, verifier = owner
    edits = {
        "no release": lambda m: m.pop("release"),
        "release 0": lambda m: m.update(release=0),
        "release true": lambda m: m.update(release=True),
        "release 3.0": lambda m: m.update(release=3.0),
        "release 2**53": lambda m: m.update(release=2**53),
        "a model path": lambda m: m["model"].update(file="../elsewhere/model.tflite"),
    }
    for i, (what, edit) in enumerate(edits.items()):
        bundle = tmp_path / f"case{i}"
        shutil.copytree(BUNDLE, bundle)
        manifest = dict(json.loads((bundle / "manifest.json").read_text()), release=1)
        edit(manifest)
        sign_raw(bundle, key, json.dumps(manifest).encode())
        with pytest.raises(SignatureError) as err:
            verifier.verify_dir(bundle)
        assert err.value.reason == "malformed", what

    # a key twice in the signed manifest: readers could disagree on which one counts
    bundle = tmp_path / "dupe"
    signed_copy(BUNDLE, bundle, key, 9)
    text = (bundle / "manifest.json").read_bytes().replace(b'"release": 9', b'"release": 9, "release": 10')
    sign_raw(bundle, key, text)
    with pytest.raises(SignatureError, match="appears twice"):
        verifier.verify_dir(bundle)


def sign_raw(bundle: Path, key: Key, text: bytes) -> None:
    (bundle / "manifest.json").write_bytes(text)
    (bundle / "signature.json").write_text(json.dumps({
        "format": "edgekit-signature/1", "algorithm": "ed25519", "key_id": key.key_id,
        "signature": base64.b64encode(key.private.sign(text)).decode()}))


def test_the_release_record_survives_restarts_and_follows_the_trusted_keys(tmp_path, caplog):
    a, b = Key(tmp_path / "keys", "a"), Key(tmp_path / "keys", "b")
    record = tmp_path / "releases.json"
    pub = [load_public_key(a.pub), load_public_key(b.pub)]
    v5 = signed_copy(BUNDLE, tmp_path / "v5", a, 5)
    verifier = Verifier(pub, record)
    verifier.check_archive(pack_bundle(v5), max_total=BIG)
    verifier.check_archive(pack_bundle(v5), max_total=BIG)  # the very same release again: fine (a retained message)

    again = Verifier(pub, record)  # a restart
    assert again.highest()[0] == 5
    for release, reason in ((4, "rollback"), (5, "release_reused")):
        with pytest.raises(SignatureError) as err:
            again.check_archive(pack_bundle(signed_copy(V2, tmp_path / f"b{release}", b, release)), max_total=BIG)
        assert err.value.reason == reason
    assert Verifier([load_public_key(b.pub)], record).highest()[0] is None  # a's releases go with a

    record.write_text("{ not json")
    with caplog.at_level(logging.WARNING):
        fresh = Verifier(pub, record)
    assert fresh.highest()[0] is None and "cannot be read" in caplog.text
    assert (tmp_path / "releases.json.corrupt").read_text() == "{ not json"


def test_trusted_keys_must_be_ed25519_public_keys(tmp_path, make_config):
    key = tmp_path / "k.pem"
    openssl("genpkey", "-algorithm", "ed25519", "-out", str(key))
    ec = tmp_path / "ec.pub"
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(tmp_path / "ec.pem"))
    openssl("pkey", "-in", str(tmp_path / "ec.pem"), "-pubout", "-out", str(ec))
    (tmp_path / "junk.pub").write_text("hello")
    cases = [(key, "holds a private key"), (ec, "not an Ed25519 key"), (tmp_path / "junk.pub", "not a PEM public key"),
             (tmp_path / "missing.pub", "cannot be read")]
    for path, why in cases:
        with pytest.raises(ConfigError, match=why):
            Agent(make_config("", update={"trusted_keys": [str(path)]}))
    for value in ("/etc/edgekit/signing.pub", [""], ["a.pub", "a.pub"], [1]):
        with pytest.raises(ConfigError, match=r"\[update\].trusted_keys"):
            make_config("", update={"trusted_keys": value})


def test_start_up_refuses_an_unsigned_bundle_before_any_interpreter_opens_it(tmp_path, make_config, monkeypatch,
                                                                             caplog, digits):
    x, _ = digits
    owner = Key(tmp_path / "keys")
    from device_agent.inference.interpreter import TFLiteModel

    opened = []
    real_open = TFLiteModel.open
    monkeypatch.setattr(TFLiteModel, "open", classmethod(lambda cls, path, *a: opened.append(path) or real_open(path, *a)))
    trusted = make_config("", update={"trusted_keys": [str(owner.pub)]})
    with pytest.raises(SignatureError, match="is not signed"):
        Agent(trusted)  # the test bundle is unsigned
    with pytest.raises(SignatureError, match="does not trust"):
        Agent(trusted.with_overrides(bundle=str(signed_copy(BUNDLE, tmp_path / "other", Key(tmp_path / "x"), 1))))
    archive = tmp_path / "unsigned.tar.gz"
    archive.write_bytes(pack_bundle(BUNDLE))
    with pytest.raises(SignatureError, match="is not signed"):
        Agent(trusted.with_overrides(bundle=str(archive)))
    assert opened == []

    signed = signed_copy(BUNDLE, tmp_path / "v1", owner, 1)
    archive.write_bytes(pack_bundle(signed))
    with Agent(trusted.with_overrides(bundle=str(archive)), source=ArraySource(x[:3])) as agent:
        assert agent.run().inferences == 3
    assert len(opened) == 1

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        Agent(make_config(""), source=ArraySource(x[:1])).close()
    assert [r.getMessage() for r in caplog.records if "trusted_keys" in r.getMessage()] == [
        "no [update].trusted_keys: this board runs any bundle it is given or pushed, signed or not; list the owner's "
        "public keys there (docs/agent.md, 'Signed bundles')"]


def test_an_installed_bundle_changed_on_disk_is_not_run(tmp_path, make_config, caplog, digits):
    """The state dir's copy is checked again at every start: edited, it gives way to the configured bundle."""
    x, _ = digits
    from device_agent.update.manifest import load_bundle
    from device_agent.update.updater import Updater

    owner = Key(tmp_path / "keys")
    v1 = signed_copy(BUNDLE, tmp_path / "v1", owner, 1)
    installed = signed_copy(V2, tmp_path / "bundles" / "digits-2", owner, 2)
    Updater(tmp_path, device="dev1", open_model=None, check=None, running_sha256=str).save_pointer(load_bundle(installed))
    config = make_config("", update={"trusted_keys": [str(owner.pub)]}).with_overrides(bundle=str(v1))
    with Agent(config, source=ArraySource(x[:1])) as agent:
        assert agent.manifest.version == "2"
    text = (installed / "manifest.json").read_text().replace('"threshold": 0.7', '"threshold": 0.0')
    assert text != (installed / "manifest.json").read_text()
    (installed / "manifest.json").write_text(text)
    with caplog.at_level(logging.WARNING), Agent(config, source=ArraySource(x[:1])) as agent:
        assert agent.manifest.version == "1"
    assert "installed bundle" in caplog.text and "does not match manifest.json" in caplog.text


def test_mutated_archives_are_refused_with_a_reason_and_nothing_else(owner):
    """Bounded fuzz of the archive reader (it parses what comes off the network before anything else):
    random byte flips, cuts and insertions in the .tar.gz and in the tar inside it."""
    import gzip
    import random

    from device_agent.update.signature import REASONS

    key, f, verifier = owner
    valid = tar_gz([("b/manifest.json", f["manifest.json"]), ("b/signature.json", f["signature.json"]),
                    ("b/model.tflite", f["model.tflite"])])
    tar = gzip.decompress(valid)
    rng = random.Random(0)
    outcomes = {}
    for case in range(400):
        inner = case % 2 == 1  # half mutate the tar (past gzip's CRC), half the compressed bytes
        data = bytearray(tar if inner else valid)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(data))
            op = rng.random()
            if op < 0.6:
                data[i] = rng.randrange(256)
            elif op < 0.8:
                del data[i:i + rng.randint(1, 600)]
            else:
                data[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        archive = gzip.compress(bytes(data), mtime=0) if inner else bytes(data)
        try:
            signed = verifier.verify_archive(archive, max_total=1 << 24)
            outcome = "accepted"
            assert signed.release == 5 and signed.manifest_sha256 == hashlib.sha256(f["manifest.json"]).hexdigest()
        except SignatureError as exc:
            outcome = exc.reason
            assert exc.reason in REASONS and "\n" not in str(exc)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    # every case ends in a named refusal or, when the flips missed everything that matters, the original
    assert sum(outcomes.values()) == 400 and {"malformed", "model_mismatch", "unsigned"} <= set(outcomes), outcomes


def test_check_says_whether_the_bundle_is_signed_by_a_trusted_key(tmp_path, capsys, expected_runtime):
    from device_agent import cli

    owner = Key(tmp_path / "keys")
    toml = tmp_path / "agent.toml"
    toml.write_text(f'[update]\ntrusted_keys = ["{owner.pub}"]\n[runtime]\nname = "{expected_runtime}"\n')
    where = ["--config", str(toml), "--broker", "", "--outbox", str(tmp_path / "o.sqlite"),
             "--source", str(BUNDLE.parent / "digits-300.npz")]
    assert cli.main(["check", *where, "--bundle", str(BUNDLE)]) == 1
    assert f"FAIL signature: bundle {BUNDLE} is not signed" in capsys.readouterr().out
    signed = signed_copy(BUNDLE, tmp_path / "v1", owner, 4)
    assert cli.main(["check", *where, "--bundle", str(signed)]) == 0
    out = capsys.readouterr().out
    assert f"ok   signature: release 4 signed by key {owner.key_id[:12]}...; 1 trusted key(s)" in out
