"""A board with [update] trusted_keys runs only bundles its owner signed, never an older release.

Tried as an attacker who can publish on the broker would: real Mosquitto, real interpreters, bundles packed
with the project's own packer (device_agent.delivery.protocol). Each refusal is checked where a user sees it:
the retained status (mosquitto_sub, an independent client), telemetry (validated against its schema), the
agent's counters, and the result lines, which must go on from the model the board ran before.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from device_agent import cli
from device_agent.delivery import protocol
from device_agent.update.manifest import load_bundle

from conftest import BUNDLE, validate, wait_for
from signing import Key, message, push_message, signed_copy
from test_update import V2, Running, endless, push, results

def evil(manifest: dict) -> None:
    """Another model's manifest turned against the owner: labels reversed, every prediction trusted."""
    manifest["labels"] = manifest["labels"][::-1]
    manifest["confidence"]["threshold"] = 0.0
    manifest["confidence"]["margin_threshold"] = 0.0


def unsigned_evil(tmp_path: Path) -> Path:
    d = tmp_path / "evil-unsigned"
    shutil.copytree(V2, d)
    m = json.loads((d / "manifest.json").read_text())
    evil(m)
    (d / "manifest.json").write_text(json.dumps(m, indent=2))
    return d


def test_only_bundles_a_trusted_key_signed_are_installed(broker, sub_factory, make_config, digits, tmp_path):
    x, _ = digits
    owner, attacker = Key(tmp_path / "owner"), Key(tmp_path / "attacker")
    v1 = signed_copy(BUNDLE, tmp_path / "v1", owner, 1)
    good = signed_copy(V2, tmp_path / "v2", owner, 2)

    tampered_manifest = signed_copy(V2, tmp_path / "tampered-manifest", owner, 2)
    m = json.loads((tampered_manifest / "manifest.json").read_text())
    evil(m)  # changed after signing
    (tampered_manifest / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")

    tampered_model = signed_copy(V2, tmp_path / "tampered-model", owner, 2)
    shutil.copy(BUNDLE / "model.tflite", tampered_model / "model.tflite")  # another (valid) model
    signed_sha = json.loads((tampered_model / "manifest.json").read_text())["model"]["sha256"]

    cases = [  # (reason counted, words in the status, the message)
        ("unsigned", "is not signed", push_message(unsigned_evil(tmp_path))),
        ("unknown_key", "does not trust", push_message(signed_copy(V2, tmp_path / "attacker-signed", attacker, 99, evil))),
        ("bad_signature", "changed after signing", push_message(tampered_manifest)),
        ("model_mismatch", "the model was replaced",
         message(protocol.pack_bundle(tampered_model), version="2", sha256=signed_sha)),
    ]
    sub = sub_factory(broker.port)
    config = make_config(broker.url, update={"trusted_keys": [str(owner.pub)]}).with_overrides(bundle=str(v1))
    out = tmp_path / "results.jsonl"
    run = Running(config, endless(x))
    try:
        assert wait_for(lambda: len(results(out)) >= 10, 15)
        for n, (reason, words, payload) in enumerate(cases, start=1):
            push(broker.port, payload)
            assert wait_for(lambda: run.agent.stats.errors.get("update", 0) >= n, 15), reason
            assert words in run.agent.last_update_error, (reason, run.agent.last_update_error)
            assert run.agent.verifier.refused.get(reason) == 1, (reason, run.agent.verifier.refused)
            assert sub.wait(lambda s: words in s.messages("status")[-1].get("last_update_error", ""), 10), reason
            seen = len(results(out))
            assert wait_for(lambda: len(results(out)) >= seen + 10, 15), "the board stopped classifying"
        assert not (tmp_path / "bundles").exists() or not any((tmp_path / "bundles").iterdir())  # nothing unpacked
        assert {r["model_version"] for r in results(out)} == {"1"}
        assert run.agent.manifest.sha256 == load_bundle(v1).manifest.sha256

        def refusals(s):
            t = s.messages("telemetry")
            return t and t[-1]["signature"]["refused"] == {reason: 1 for reason, _, _ in cases}

        assert sub.wait(refusals, 10), sub.messages("telemetry")[-1:]
        telemetry = sub.messages("telemetry")[-1]
        validate(telemetry)
        assert telemetry["signature"]["keys"] == [owner.key_id]
        assert telemetry["signature"]["release"] == telemetry["signature"]["highest"] == 1

        push(broker.port, push_message(good))  # what the owner signed goes in
        assert wait_for(lambda: any(r["model_version"] == "2" for r in results(out)[-3:]), 15), "no swap"
    finally:
        stats = run.finish()
    assert stats.errors["update"] == len(cases)
    assert run.agent.manifest.sha256 == load_bundle(good).manifest.sha256
    assert run.agent.last_update_error is None
    assert sub.wait(lambda s: s.messages("status")[-1]["model"] == load_bundle(good).manifest.model_ref, 10)
    assert json.loads((tmp_path / "releases-dev1.json").read_text())["keys"][owner.key_id]["release"] == 2


def test_an_older_release_is_refused_also_after_restarts_and_reset_bundle(broker, make_config, digits,
                                                                          expected_runtime, tmp_path):
    x, _ = digits
    owner = Key(tmp_path / "owner")
    v1 = signed_copy(BUNDLE, tmp_path / "v1", owner, 1)
    v3 = signed_copy(V2, tmp_path / "v3", owner, 3)
    older = signed_copy(BUNDLE, tmp_path / "older", owner, 2)  # validly signed, but before release 3
    same_release = signed_copy(BUNDLE, tmp_path / "same", owner, 3)  # release 3 again, for another manifest
    trusted = {"trusted_keys": [str(owner.pub)]}
    config = make_config(broker.url, update=trusted).with_overrides(bundle=str(v1))
    out = tmp_path / "results.jsonl"
    run = Running(config, endless(x))
    try:
        push(broker.port, push_message(v3))
        assert wait_for(lambda: any(r["model_version"] == "2" for r in results(out)[-3:]), 15)
        push(broker.port, push_message(same_release))
        assert wait_for(lambda: "release 3 was accepted with another manifest" in (run.agent.last_update_error or ""), 15)
        assert run.agent.verifier.refused == {"release_reused": 1}
        push(broker.port, push_message(older))  # stays retained on the broker
        assert wait_for(lambda: "older than release 3" in (run.agent.last_update_error or ""), 15)
        assert run.agent.verifier.refused == {"release_reused": 1, "rollback": 1}
        n = len(results(out))
        assert wait_for(lambda: len(results(out)) >= n + 10, 15)
    finally:
        run.finish()
    assert [r["model_version"] for r in results(out)][-10:] == ["2"] * 10

    # A restart runs release 3 again; the retained release 2 arrives and is refused again.
    restarted = make_config(broker.url, update=trusted, results={"path": str(tmp_path / "restart.jsonl")})
    run = Running(restarted.with_overrides(bundle=str(v1)), endless(x))
    try:
        assert wait_for(lambda: "older than release 3" in (run.agent.last_update_error or ""), 15)
        assert run.agent.verifier.refused == {"rollback": 1}
        n = len(results(tmp_path / "restart.jsonl"))
        assert wait_for(lambda: len(results(tmp_path / "restart.jsonl")) >= n + 10, 15)
    finally:
        stats = run.finish()
    assert {r["model_version"] for r in results(tmp_path / "restart.jsonl")} == {"2"}
    assert stats.errors == {"update": 1}

    # --reset-bundle goes back to the configured bundle (release 1), but not below what was accepted.
    toml = tmp_path / "agent.toml"
    toml.write_text(f'[update]\ntrusted_keys = ["{owner.pub}"]\n[runtime]\nname = "{expected_runtime}"\n')
    import numpy as np

    np.save(tmp_path / "five.npy", x[:5])
    assert cli.main(["run", "--config", str(toml), "--reset-bundle", "--bundle", str(v1), "--source",
                     str(tmp_path / "five.npy"), "--outbox", str(tmp_path / "outbox.sqlite"), "--device-id", "dev1",
                     "--fleet", "test", "--broker", "", "--results", str(tmp_path / "reset.jsonl")]) == 0
    assert [r["model_version"] for r in results(tmp_path / "reset.jsonl")] == ["1"] * 5
    assert json.loads((tmp_path / "releases-dev1.json").read_text())["keys"][owner.key_id]["release"] == 3
    after_reset = make_config(broker.url, update=trusted, results={"path": str(tmp_path / "after-reset.jsonl")})
    run = Running(after_reset.with_overrides(bundle=str(v1)), endless(x))
    try:  # the board runs release 1 now, yet a signed release 2 of another model stays refused
        push(broker.port, push_message(signed_copy(V2, tmp_path / "older-v2", owner, 2)))
        # (the retained release 2 of the running model may be refused first: the same model under another
        # manifest is another bundle, and release 2 is below 3 either way)
        assert wait_for(lambda: run.agent.verifier.refused.get("rollback", 0) >= 1
                        and "older than release 3" in (run.agent.last_update_error or ""), 15)
        n = len(results(tmp_path / "after-reset.jsonl"))
        assert wait_for(lambda: len(results(tmp_path / "after-reset.jsonl")) >= n + 10, 15)
    finally:
        run.finish()
    assert {r["model_version"] for r in results(tmp_path / "after-reset.jsonl")} == {"1"}


def test_key_rotation_two_trusted_keys_and_retiring_a_leaked_one(broker, make_config, digits, tmp_path):
    x, _ = digits
    old, new = Key(tmp_path / "keys", "old"), Key(tmp_path / "keys", "new")
    v1 = signed_copy(BUNDLE, tmp_path / "v1", new, 1)
    out = tmp_path / "results.jsonl"
    both = make_config(broker.url, update={"trusted_keys": [str(old.pub), str(new.pub)]}).with_overrides(bundle=str(v1))
    run = Running(both, endless(x))
    try:
        # While both are trusted, either key's bundles go in: the old key signs a huge release (as a thief would).
        push(broker.port, push_message(signed_copy(V2, tmp_path / "by-old", old, 1000)))
        assert wait_for(lambda: any(r["model_version"] == "2" for r in results(out)[-3:]), 15)
        push(broker.port, push_message(signed_copy(BUNDLE, tmp_path / "by-new", new, 5)))
        assert wait_for(lambda: run.agent.verifier.refused.get("rollback") == 1, 15)  # 5 < 1000
    finally:
        run.finish()

    # The owner retires the old key: its bundles no longer run, and its release 1000 no longer counts.
    only_new = make_config(broker.url, update={"trusted_keys": [str(new.pub)]},
                           results={"path": str(tmp_path / "rotated.jsonl")}).with_overrides(bundle=str(v1))
    run = Running(only_new, endless(x))
    try:
        assert run.agent.manifest.sha256 == load_bundle(v1).manifest.sha256  # the old key's install is not run
        push(broker.port, push_message(signed_copy(V2, tmp_path / "by-old-again", old, 2000)))
        assert wait_for(lambda: run.agent.verifier.refused.get("unknown_key") == 1, 15)
        push(broker.port, push_message(signed_copy(V2, tmp_path / "v2-new", new, 6)))
        rotated = tmp_path / "rotated.jsonl"
        assert wait_for(lambda: [r["model_version"] for r in results(rotated)[-3:]] == ["2"] * 3, 15)
        assert run.agent.verifier.highest()[0] == 6
    finally:
        stats = run.finish()
    assert stats.errors == {"update": 1}
