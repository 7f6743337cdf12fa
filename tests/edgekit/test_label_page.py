"""edgekit label: the page's API on SQLite and PostgreSQL, its guard, and the page itself in headless Chromium.

The browser is Debian's /usr/bin/chromium driven by Playwright (nothing downloads a browser).
Set EDGEKIT_DOCS_IMG=1 to refresh docs/img/label-page.png from the keyboard test's screenshot.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from collecting import LABELS, store, store_url  # noqa: F401  (fixtures)
from edgekit.loop.label import LabelServer, LabelService
from edgekit.loop.store import INVALID_LABEL, open_store
from labeling import CHROMIUM, CHROMIUM_ARGS, add_series, call, fill, wait_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def served(store):
    truth = fill(store, 24)
    service = LabelService(store, classes=LABELS, lease_seconds=300)
    with LabelServer(service, "127.0.0.1", 0, default_user="ann").start() as server:
        yield server, truth


def test_two_labelers_never_get_the_same_sample(served):
    server, truth = served
    seen = {"ann": [], "bob": []}
    for _ in range(len(truth) // 2):
        for user in ("ann", "bob"):
            status, doc = call(server.url, "/api/next", {"user": user})
            assert status == 200 and doc["sample"] is not None
            sid = doc["sample"]["sample_id"]
            other = "bob" if user == "ann" else "ann"
            assert not seen[other] or sid != seen[other][-1], "both labelers were shown the same sample"
            seen[user].append(sid)
            status, _ = call(server.url, "/api/label", {"user": user, "sample_id": sid, "label": "1",
                                                       "label_version": doc["sample"]["label_version"]})
            assert status == 200
    assert set(seen["ann"]).isdisjoint(seen["bob"])
    assert set(seen["ann"]) | set(seen["bob"]) == set(truth)
    assert call(server.url, "/api/next", {"user": "ann"})[1]["sample"] is None
    status, prog = call(server.url, "/api/progress")
    assert prog == {"labeled": 24, "left": 0, "by_class": {"1": 24}, "invalid": 0}


def test_a_second_save_of_a_changed_sample_is_refused_with_a_clear_message(served):
    server, truth = served
    _, doc = call(server.url, "/api/next", {"user": "ann"})
    s = doc["sample"]
    ok, _ = call(server.url, "/api/label", {"user": "bob", "sample_id": s["sample_id"], "label": "4",
                                           "label_version": s["label_version"]})  # bob got there first
    assert ok == 200
    status, err = call(server.url, "/api/label", {"user": "ann", "sample_id": s["sample_id"], "label": "9",
                                                 "label_version": s["label_version"]})
    assert status == 409
    assert re.search(r"was labelled '4' by bob at .* your label was not saved", err["error"])
    assert err["current"]["label"] == "4"
    r = server.service.store.get_sample(s["sample_id"])
    assert (r.label, r.labeled_by) == ("4", "bob")


def test_the_api_refuses_what_it_should(served):
    server, truth = served
    sid = next(iter(truth))
    assert call(server.url, "/api/label", {"user": "ann", "sample_id": sid, "label": "eleven",
                                           "label_version": 0})[0] == 400
    assert call(server.url, "/api/label", {"user": "", "sample_id": sid, "label": "1", "label_version": 0})[0] == 400
    assert call(server.url, "/api/label", {"user": "ann", "sample_id": "nope", "label": "1",
                                           "label_version": 0})[0] == 404
    # a form or image on another site cannot post: no JSON content type / no X-Edgekit header
    assert call(server.url, "/api/label", {"user": "ann", "sample_id": sid, "label": "1", "label_version": 0},
                json_headers=False, headers={"Content-Type": "text/plain"})[0] == 403
    assert call(server.url, "/api/next", {"user": "ann"}, headers={"X-Edgekit": "0"})[0] == 403
    # DNS rebinding: a loopback server answers only to loopback host names
    assert call(server.url, "/api/config", headers={"Host": "evil.example:8765"})[0] == 403
    assert call(server.url, "/api/config", headers={"Host": "localhost"})[0] == 200
    assert server.service.store.get_sample(sid).label is None


def test_grid_accepts_many_and_reports_conflicts(served):
    server, truth = served
    _, doc = call(server.url, "/api/grid", {"user": "ann", "n": 10})
    tiles = doc["samples"]
    assert len(tiles) == 10
    _, other = call(server.url, "/api/next", {"user": "bob"})
    assert other["sample"]["sample_id"] not in {t["sample_id"] for t in tiles}  # the grid's samples are leased
    first = tiles[0]
    server.service.store.set_labels({first["sample_id"]: "0"}, by="carol")  # someone else, meanwhile
    items = [{"sample_id": t["sample_id"], "label": t["predicted"], "label_version": t["label_version"]} for t in tiles]
    status, res = call(server.url, "/api/accept", {"user": "ann", "items": items})
    assert status == 200
    assert len(res["saved"]) == 9 and [c["sample_id"] for c in res["conflicts"]] == [first["sample_id"]]
    assert "carol" in res["conflicts"][0]["error"]
    st = server.service.store
    for t in tiles[1:]:
        r = st.get_sample(t["sample_id"])
        assert (r.label, r.labeled_by) == (t["predicted"], "ann")
    assert st.get_sample(first["sample_id"]).label == "0"
    assert st.label_history(tiles[1]["sample_id"])[0].action == "accept"


def test_the_token_guards_a_page_bound_beyond_localhost(store):
    fill(store, 3)
    service = LabelService(store, classes=LABELS)
    with LabelServer(service, "0.0.0.0", 0).start() as server:
        assert server.token and f"?token={server.token}" in server.url
        assert call(server.url, "/api/config")[0] == 403
        assert call(server.url, "/api/config", headers={"X-Edgekit-Token": "wrong"})[0] == 403
        assert call(server.url, "/api/config", headers={"X-Edgekit-Token": server.token})[0] == 200
        assert call(server.url, "/api/next", {"user": "ann"})[0] == 403
        status, page = call(server.url, f"/?token={server.token}")
        assert status == 200 and b"edgekit label" in page
        assert call(server.url, "/api/config", headers={"Cookie": f"edgekit_label_token={server.token}"})[0] == 200
    with LabelServer(service, "127.0.0.1", 0).start() as local:
        assert local.token is None and "token" not in local.url
        assert call(local.url, "/api/config")[0] == 200


def test_the_cli_prints_the_url_and_guards_it(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    with open_store(url) as s:
        fill(s, 4)
    proc = subprocess.Popen([sys.executable, "-m", "edgekit", "label", "--store", url, "--host", "0.0.0.0",
                             "--port", "0", "--order", "margin"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)
    try:
        lines = []
        while not any(line.startswith("open ") for line in lines):
            line = proc.stdout.readline()
            assert line, f"edgekit label ended: {proc.stderr.read()}"
            lines.append(line)
        assert lines[0].startswith("edgekit label: 4 unlabelled sample(s) in margin order")
        opened = next(line for line in lines if line.startswith("open "))
        page = opened.split()[1]
        assert "?token=" in page
        assert call(page, "/api/progress")[0] == 403
        status, prog = call(page, "/api/progress", headers={"X-Edgekit-Token": page.split("token=")[1]})
        assert status == 200 and prog["left"] == 4
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# -- the page in a real browser ----------------------------------------------------------------

@pytest.fixture(scope="module")
def chromium():
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)")
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    yield browser
    browser.close()
    pw.stop()


def _page(browser, url, user):
    ctx = browser.new_context(viewport={"width": 1280, "height": 860})
    ctx.add_init_script(f"localStorage.setItem('edgekit-label-user', {user!r})")
    page = ctx.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']", timeout=30_000)
    return page, errors


def _shown(page) -> str:
    return page.evaluate("document.body.dataset.sample")


def _press_and_wait(page, key: str) -> str:
    before = _shown(page)
    page.keyboard.press(key)
    return wait_for(lambda: _shown(page) != before and _shown(page), what=f"the next sample after {key}")


@pytest.mark.slow
def test_labelling_with_the_keyboard_and_undo_in_chromium(chromium, tmp_path):
    url = f"sqlite:///{tmp_path}/samples.db"
    with open_store(url) as st:
        truth = fill(st, 24)
        service = LabelService(st, classes=LABELS)
        with LabelServer(service, "127.0.0.1", 0, default_user="ann").start() as server:
            page, errors = _page(chromium, server.url, "ann")
            s1 = _shown(page)
            assert page.inner_text("#predicted") == st.get_sample(s1).label_pred  # the model's guess ...
            assert page.eval_on_selector("#classes button.selected", "b => b.dataset.label") == \
                st.get_sample(s1).label_pred  # ... pre-selected
            assert page.eval_on_selector("#sample-img", "i => i.naturalWidth") == 8
            assert page.eval_on_selector("#sample-img", "i => i.width") >= 8 * 20  # shown large ...
            assert page.eval_on_selector("#sample-img", "i => getComputedStyle(i).imageRendering") == "pixelated"
            s2 = _press_and_wait(page, "7")           # a digit key labels and moves on
            s3 = _press_and_wait(page, "Enter")       # Enter accepts the highlighted guess
            s4 = _press_and_wait(page, "x")           # none of these / not a valid input
            s5 = _press_and_wait(page, "s")           # skip
            page.keyboard.press("z")                  # undo the last label (s3's "none of these")
            wait_for(lambda: _shown(page) == s3, what="undo to bring the sample back")
            page.wait_for_selector("#banner.info")
            assert "unlabelled again" in page.inner_text("#banner")
            wait_for(lambda: "2 labelled" in page.inner_text("#progress-text"), what="progress")
            wait_for(lambda: len(page.query_selector_all("#history tbody tr")) == 4, what="history rows")
            page.screenshot(path=str(tmp_path / "label-page.png"))
            if os.environ.get("EDGEKIT_DOCS_IMG"):
                (ROOT / "docs" / "img").mkdir(exist_ok=True)
                shutil.copy(tmp_path / "label-page.png", ROOT / "docs" / "img" / "label-page.png")

            r1, r2, r3, r4, r5 = (st.get_sample(s) for s in (s1, s2, s3, s4, s5))
            assert (r1.label, r1.labeled_by) == ("7", "ann")
            assert (r2.label, r2.labeled_by) == (r2.label_pred, "ann")
            assert r3.label is None and r4.label is None and r5.label is None  # undone, skipped, not yet
            assert [(e.label, e.previous_label, e.action) for e in st.label_history(s3)] == [
                (None, INVALID_LABEL, "undo"), (INVALID_LABEL, None, "label")]
            assert len({s1, s2, s3, s4, s5}) == 5 and {s1, s2, s3, s4, s5} <= set(truth)

            series_id = add_series(st)
            page.goto(server.url + "#sample=" + series_id)  # an audio-like input is plotted
            page.reload()
            page.wait_for_selector("body[data-ready='1']")
            wait_for(lambda: _shown(page) == series_id, what="the series sample")
            assert page.is_visible("#plot") and not page.is_visible("#sample-img")
            assert len(page.query_selector_all("#plot polyline")) == 1
            assert not errors, errors


@pytest.mark.slow
def test_two_people_in_two_browsers_with_a_conflict_and_the_grid(chromium, store_url):
    with open_store(store_url) as st:
        truth = fill(st, 16)
        service = LabelService(st, classes=LABELS)
        with LabelServer(service, "127.0.0.1", 0).start() as server:
            ann, ann_errors = _page(chromium, server.url, "ann")
            bob, bob_errors = _page(chromium, server.url, "bob")
            a, b = _shown(ann), _shown(bob)
            assert a and b and a != b  # leases: never the same sample at the same time

            st.set_labels({a: "1"}, by="carol")  # someone else labels ann's sample meanwhile
            ann.keyboard.press("7")
            ann.wait_for_selector("#banner:not([hidden])")
            assert re.search(r"labelled '1' by carol .* your label was not saved", ann.inner_text("#banner"))
            assert _shown(ann) == a and "labelled 1 by carol" in ann.inner_text("#state")
            assert st.get_sample(a).label == "1"

            bob.keyboard.press("g")  # the grid: mark the wrong ones, accept the rest
            bob.wait_for_selector("#grid .tile")
            tiles = bob.eval_on_selector_all("#grid .tile", "ts => ts.map(t => t.dataset.sample)")
            assert a not in tiles and tiles
            wrong = [sid for sid in tiles if truth[sid]["predicted"] != truth[sid]["truth"]]
            for sid in wrong:
                bob.click(f"#grid .tile[data-sample='{sid}']")
            bob.keyboard.press("Enter")
            bob.wait_for_selector("#banner.info")
            accepted = [sid for sid in tiles if sid not in wrong]
            assert f"{len(accepted)} accepted" in bob.inner_text("#banner")
            for sid in accepted:
                r = st.get_sample(sid)
                assert (r.label, r.labeled_by) == (truth[sid]["predicted"], "bob")
            assert all(st.get_sample(sid).label is None for sid in wrong)
            assert not ann_errors and not bob_errors
