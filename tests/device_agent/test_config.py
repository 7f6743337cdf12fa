"""Config files: every board profile loads, and every mistake names its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from device_agent.config import AgentConfig, load_config
from device_agent.errors import ConfigError

PROFILES = Path(__file__).resolve().parents[2] / "firmware_configs"


@pytest.mark.parametrize("name", ["rpi-zero-2w", "rpi-3bplus", "rpi-4", "rpi-5", "generic-linux-x86_64"])
def test_every_board_profile_loads(name):
    config = load_config(PROFILES / f"{name}.toml")
    assert config.origin.endswith(f"{name}.toml")
    assert 1 <= config.runtime.threads <= 4
    assert config.outbox.max_bytes >= 16 * 1024 * 1024
    assert config.mqtt.protocol == "5"
    # Every key of every table is written out, so the profiles double as documentation.
    text = (PROFILES / f"{name}.toml").read_text()
    for table, values in AgentConfig().to_dict().items():
        assert f"[{table}]" in text
        for key in values:
            if key not in ("id", "confidence_threshold", "margin_threshold", "seed"):
                assert f"\n{key} = " in text, f"{name}.toml lacks [{table}].{key}"


@pytest.mark.parametrize(
    "toml, message",
    [
        ("[policy]\nrandom_fraction = 1.5\n", "config [policy].random_fraction=1.5 must be within [0, 1]"),
        ("[policy]\nmax_per_hour = -1\n", "config [policy].max_per_hour=-1 must be >= 0"),
        ("[runtime]\nname = \"tpu\"\n", "config [runtime].name='tpu' is unknown"),
        ("[runtime]\nthreads = \"four\"\n", "config [runtime].threads='four' must be an integer"),
        ("[mqtt]\nbroker = \"http://x:1\"\n", "config [mqtt].broker='http://x:1' must look like mqtt://"),
        ("[mqtt]\nprotocol = \"4\"\n", "config [mqtt].protocol='4' must be \"5\" or \"3.1.1\""),
        ("[mqtt]\ncert_file = \"c.pem\"\n", "config [mqtt].cert_file and [mqtt].key_file go together"),
        ("[mqtt]\nack = \"store\"\n", "config [mqtt].ack='store' must be \"collector\" (end-to-end) or \"broker\""),
        ("[mqtt]\nack_timeout_s = 0\n", "config [mqtt].ack_timeout_s=0.0 must be >= 0.1"),
        ("[mqtt]\nbroker = \"mqtt://a:1,mqtts://b:2\"\n", "mixes mqtt:// and mqtts://"),
        ("[mqtt]\nbroker = \"mqtt://a:1,b:2\"\n", "(several nodes of a cluster: separated by commas)"),
        ("[source]\nkind = \"video\"\n", "config [source].kind='video' is unknown"),
        ("[source]\nwatch = \"yes\"\n", "config [source].watch='yes' must be true or false"),
        ("[device]\nid = \"my board\"\n", "config [device].id='my board' is not a valid name"),
        ("[outbox]\nmax_bytes = 10\n", "config [outbox].max_bytes=10 must be >= 1024"),
        ("[policy]\nconfidence = 0.5\n", "config [policy].confidence is not a known key"),
        ("[polcy]\n", "config [polcy] is not a known table"),
        ("[policy\n", "is not valid TOML"),
    ],
)
def test_mistakes_name_the_key(tmp_path, toml, message):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value)


def test_unreadable_config_says_so(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(tmp_path / "missing.toml")


def test_flags_override_the_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[device]\nid = \"a\"\nfleet = \"f\"\n[mqtt]\nbroker = \"mqtt://h:1\"\n[source]\npath = \"in\"\n")
    data = tmp_path / "batch.npz"
    data.write_bytes(b"")
    config = load_config(path, device_id="b", broker="mqtts://broker.example:8883", source=str(data),
                         policy={"random_fraction": 0.5})
    assert (config.device.id, config.device.fleet) == ("b", "f")
    assert (config.mqtt.host, config.mqtt.port, config.mqtt.tls) == ("broker.example", 8883, True)
    assert (config.source.kind, config.source.path) == ("npz", str(data))
    assert config.policy.random_fraction == 0.5
    with pytest.raises(ConfigError, match=r"config \[policy\].random_fraction=2.0 must be within"):
        config.with_overrides(policy={"random_fraction": 2})


def test_defaults_are_usable():
    config = load_config()
    assert config.device.id  # the hostname
    assert config.bench_path.parent == config.outbox_path.parent


def test_broker_may_list_the_nodes_of_a_cluster():
    config = load_config(None, broker="mqtts://n1.lan, mqtts://n2.lan:9883,mqtts://n3.lan:8883")
    assert config.mqtt.endpoints == [("n1.lan", 8883), ("n2.lan", 9883), ("n3.lan", 8883)]
    assert (config.mqtt.host, config.mqtt.port, config.mqtt.tls) == ("n1.lan", 8883, True)
