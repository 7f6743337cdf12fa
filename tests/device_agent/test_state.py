"""The installed-bundle state (device_agent/update/state.py): boot counting, commit, fallback, refusals."""

from __future__ import annotations

import json

from device_agent.update.state import MAX_REFUSED, Slot, StateFile, UpdateState


def slot(name: str, **kw) -> Slot:
    return Slot(path=f"/b/{name}", name="digits", version=name, sha256=name * 8, archive_sha256=name * 64, **kw)


def test_a_new_bundle_gets_max_attempts_then_the_last_good_one_runs():
    good, new = slot("a"), slot("b")
    s = UpdateState().install(good).commit().install(new)  # the swap is attempt 1
    assert s.current.attempts == 1 and not s.current.committed and s.last_good.version == "a"
    s, notice = s.boot(3)  # attempt 2 (the agent died after the swap)
    assert notice is None and s.current.attempts == 2
    s, notice = s.boot(3)  # attempt 3
    assert notice is None and s.current.attempts == 3
    s, notice = s.boot(3)  # no attempt 4: fall back
    assert s.current.version == "a" and s.last_good is None
    assert "bundle digits vb (archive bbbbbbbbbbbb...) refused: it crashed, hung or was killed 3 times" in notice
    assert "falling back to digits va (archive aaaaaaaaaaaa...), the last bundle that ran well" in notice
    assert s.refusal("b" * 64) is not None and s.refusal("a" * 64) is None


def test_a_bundle_that_ran_well_is_committed_and_never_counted_again():
    s = UpdateState().install(slot("a"))
    s = s.commit()
    assert s.current.committed and s.current.attempts == 0
    for _ in range(10):
        s, notice = s.boot(3)
        assert notice is None and s.current.version == "a"


def test_a_clean_stop_does_not_count_as_a_crash():
    s = UpdateState().install(slot("a"))
    for _ in range(10):  # ten short runs that each stop cleanly before the commit
        s, notice = s.boot(3)
        assert notice is None
        s = s.stopped()
    assert s.current.attempts <= 1 and s.current.version == "a"


def test_without_a_last_good_bundle_the_configured_one_runs():
    s = UpdateState().install(slot("b"))
    notices = []
    for _ in range(3):
        s, notice = s.boot(3)
        notices.append(notice)
    assert s.current is None and notices[:2] == [None, None]
    assert notices[2].endswith("falling back to the configured bundle")


def test_a_crash_while_the_updater_opens_a_bundle_is_counted_too():
    s = UpdateState()
    for n in (1, 2, 3, 4):  # each time the retained message comes back after a crash in the open
        s = s.trying(slot("c"))
        assert s.pending.attempts == n
    assert s.install(slot("c")).current.attempts == 4  # carried over when it is swapped in
    assert s.done_trying().pending is None


def test_refused_archives_are_bounded_and_survive_reset(tmp_path):
    s = UpdateState().install(slot("a"))
    for i in range(MAX_REFUSED + 5):
        s = s.refuse(f"{i:064x}", "digits", str(i), "bad")
    assert len(s.refused) == MAX_REFUSED and s.refusal(f"{0:064x}") is None and s.refusal(f"{MAX_REFUSED + 4:064x}")
    s = s.reset()
    assert s.current is None and len(s.refused) == MAX_REFUSED


def test_the_state_file_round_trips_and_reads_the_old_pointer(tmp_path):
    f = StateFile(tmp_path / "current_bundle-d.json")
    f.update(lambda s: s.install(slot("a")).commit().install(slot("b")).refuse("e" * 64, "digits", "e", "bad"))
    again = StateFile(tmp_path / "current_bundle-d.json").state
    assert again == f.state
    old = tmp_path / "current_bundle-old.json"  # what agents before boot counting wrote
    old.write_text(json.dumps({"path": "/b/x", "name": "digits", "version": "2", "sha256": "f" * 64,
                               "installed": 1.0}))
    s = StateFile(old).state
    assert s.current.committed and s.current.version == "2"  # it ran: it is good
    (tmp_path / "broken.json").write_text("{not json")
    assert StateFile(tmp_path / "broken.json").state == UpdateState()  # one warning, then the configured bundle
