from pathlib import Path

import pytest

from edge_agent import settings
from edge_agent.common.link import Backoff, parse_broker_url


def test_precedence_default_file_env_cli(tmp_path):
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[agent]\nfleet = "from-file"\nheartbeat_s = 3\ndevice_id = "file-dev"\n')
    env = {"EDGEPRUNE_FLEET": "from-env"}
    v = settings.load({}, str(cfg), env)
    assert v["fleet"] == "from-env" and v["heartbeat_s"] == 3.0 and v["device_id"] == "file-dev"
    v = settings.load({"fleet": "from-cli"}, str(cfg), env)
    assert v["fleet"] == "from-cli"
    v = settings.load({}, None, {})
    assert v["fleet"] == "default" and v["keepalive_s"] == 15


@pytest.mark.parametrize(
    "cli,env,msg",
    [
        ({"fleet": "bad fleet"}, {}, "fleet"),
        ({"heartbeat_s": "-1"}, {}, "heartbeat_s"),
        ({}, {"EDGEPRUNE_KEEPALIVE_S": "soon"}, "EDGEPRUNE_KEEPALIVE_S"),
        ({"data_shard": "9/3"}, {}, "data_shard"),
        ({"broker": "http://x"}, {}, "broker"),
        ({"data_partition": "random"}, {}, "data_partition"),
    ],
)
def test_bad_values_give_one_clear_message(cli, env, msg):
    with pytest.raises(settings.SettingsError) as e:
        settings.load(cli, None, env)
    assert msg in str(e.value)


def test_unknown_key_in_file(tmp_path):
    cfg = tmp_path / "agent.toml"
    cfg.write_text('brokr = "mqtt://x"\n')
    with pytest.raises(settings.SettingsError, match="unknown setting 'brokr'"):
        settings.load({}, str(cfg), {})


def test_every_setting_documented_in_readme():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    missing = [s.name for s in settings.SETTINGS if f"`{s.name}`" not in readme]
    assert not missing, f"settings not documented in README: {missing}"
    assert all(s.help for s in settings.SETTINGS)


def test_broker_url():
    assert parse_broker_url("mqtt://h:1234").port == 1234
    assert parse_broker_url("h").port == 1883
    assert parse_broker_url("mqtts://h").tls and parse_broker_url("mqtts://h").port == 8883
    with pytest.raises(ValueError):
        parse_broker_url("http://h")
    with pytest.raises(ValueError):
        parse_broker_url("mqtt://h:99999")


def test_backoff_is_jittered_bounded_and_resets():
    import random

    b = Backoff(0.5, 8.0, random.Random(1))
    delays = [b.next_delay() for _ in range(10)]
    caps = [min(8.0, 0.5 * 2**i) for i in range(10)]
    assert all(c / 2 <= d <= c for d, c in zip(delays, caps))
    assert len({round(d, 6) for d in delays[5:]}) > 1  # jittered even once capped
    b.reset()
    assert b.next_delay() <= 0.5
