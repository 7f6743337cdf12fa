"""``edgekit fleet status``: online from retained status and last seen; the table a person reads."""

from __future__ import annotations

import json

from collecting import sample, store, store_url, telemetry  # noqa: F401  (fixtures)
from device_agent.delivery import protocol
from edgekit.cli import main
from edgekit.fleet.status import fleet_status, format_table


def test_a_silent_board_is_offline_even_if_its_status_says_online(store):
    store.put_status(protocol.status_payload(device="quiet", fleet="lab", state="online"))
    store.put_telemetry(telemetry(device="busy", temperature=None))
    last = {d.device: d.last_seen for d in store.devices()}
    rows = {r["device"]: r for r in fleet_status(store, stale_after_s=60, now=last["quiet"] + 61)}
    assert rows["quiet"]["online"] is False
    assert rows["busy"]["online"] is False  # no status at all: not known to be online
    rows = {r["device"]: r for r in fleet_status(store, stale_after_s=60, now=last["quiet"] + 1)}
    assert rows["quiet"]["online"] is True
    table = format_table(list(rows.values()), now=last["quiet"] + 1)
    head, *lines = table.splitlines()
    assert head.split()[:4] == ["fleet", "device", "last", "seen"]
    busy = next(line for line in lines if "busy" in line)
    assert "1234" in busy and "8.1%" in busy and " - " in busy  # temperature unknown shows as -


def test_fleet_status_filters_by_fleet_and_says_when_nothing_is_known(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/s.db"
    assert main(["fleet", "status", "--store", url]) == 0
    assert "no devices seen yet" in capsys.readouterr().out
    from edgekit.loop.store import open_store

    with open_store(url) as s:
        s.put_sample(sample(1, fleet="a", device="x"), "t")
        s.put_sample(sample(1, fleet="b", device="y"), "t")
    assert main(["fleet", "status", "--store", url, "--fleet", "b", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["fleet"], r["device"], r["samples"], r["online"]) for r in rows] == [("b", "y", 1, False)]


def test_fleet_status_shows_the_confidence_psi_of_the_latest_telemetry(store_url, capsys):
    from edgekit.loop.store import open_store
    from edgekit.loop.validate import check_message

    drifting = telemetry(device="drifting")
    drifting["drift"] = {"samples": 500, "window": 500, "input_z": [0.81], "input_z_max": 0.81,
                         "confidence_mean": 0.71, "confidence_mean_ref": 0.98, "confidence_psi": 0.3671,
                         "level": "significant"}
    old = telemetry(device="old-bundle")
    old["drift"] = None  # a bundle without reference statistics
    with open_store(store_url) as s:
        for payload in (drifting, old, telemetry(device="old-agent")):  # an agent from before drift: no key
            topic = protocol.topic("lab", payload["device"], "telemetry")
            _, checked = check_message(topic, json.dumps(payload).encode())  # the collector's gate takes it
            s.put_telemetry(checked)
    assert main(["fleet", "status", "--store", store_url]) == 0
    head, *lines = capsys.readouterr().out.splitlines()
    assert head.split()[-1] == "drift"
    cells = {line.split()[1]: line.split()[-1] for line in lines}
    assert cells == {"drifting": "0.37", "old-bundle": "-", "old-agent": "-"}
    assert main(["fleet", "status", "--store", store_url, "--json"]) == 0
    rows = {r["device"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert rows["drifting"]["drift_psi"] == 0.3671 and rows["drifting"]["drift"]["input_z_max"] == 0.81
    assert rows["old-bundle"]["drift_psi"] is None and rows["old-agent"]["drift"] is None
