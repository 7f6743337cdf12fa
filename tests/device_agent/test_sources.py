"""A watched folder: files are taken once complete, and a folder of many files costs one wait, not one per file."""

from __future__ import annotations

import threading

import numpy as np

from device_agent.sources import FolderSource


def first_batch(src: FolderSource):
    """What one poll of the folder yields (the source yields None once it idles)."""
    got = []
    for item in src.items(threading.Event()):
        if item is None:
            return got
        got.append(item)
    return got


def test_a_watched_folder_of_many_files_waits_once_whatever_their_number(tmp_path, digits):
    x, _ = digits
    waits = {}
    for n in (3, 600):
        inbox = tmp_path / f"inbox-{n}"
        inbox.mkdir()
        for i in range(n):
            np.save(inbox / f"{i:04d}.npy", x[i % len(x)])
        src = FolderSource(str(inbox), watch=True, poll_interval_s=0.05)
        count = []
        src._settle = lambda: count.append(1)  # the stability wait, counted instead of slept
        got = first_batch(src)
        assert [info["uri"] for info, _ in got] == [str(inbox / f"{i:04d}.npy") for i in range(n)]
        assert all(np.array_equal(raw, x[i % len(x)]) for i, (_, raw) in enumerate(got))
        waits[n] = len(count)
    assert waits == {3: 1, 600: 1}


def test_a_file_still_being_written_is_taken_on_a_later_poll(tmp_path, digits):
    x, _ = digits
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    np.save(inbox / "a.npy", x[0])
    whole = (inbox / "a.npy").read_bytes()
    (inbox / "b.npy").write_bytes(whole[: len(whole) // 2])  # a camera halfway through writing it
    (inbox / "c.npy").write_bytes(b"")  # created, nothing written yet
    src = FolderSource(str(inbox), watch=True, poll_interval_s=0.05)
    polls = []

    def settle():  # the writer goes on while the agent waits
        polls.append(1)
        if len(polls) == 1:
            with open(inbox / "b.npy", "ab") as f:
                f.write(whole[len(whole) // 2:])

    src._settle = settle
    items = src.items(threading.Event())
    first = []
    for item in items:
        if item is None:
            break
        first.append(item)
    assert [info["uri"] for info, _ in first] == [str(inbox / "a.npy")]
    (inbox / "c.npy").write_bytes(whole)
    later = []
    for item in items:  # the next polls: b and c, complete now, and nothing twice
        if item is not None:
            later.append(item)
        if len(later) == 2 or len(polls) > 50:
            break
    assert sorted(info["uri"] for info, _ in later) == [str(inbox / "b.npy"), str(inbox / "c.npy")]
    assert all(np.array_equal(raw, x[0]) for _, raw in later)
