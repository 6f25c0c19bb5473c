"""The device-side service (edge_agent.service): config, install, upgrade, rollback, restart, remove.

Runs on this machine without root or systemd, so the supervisor fallback is what
starts the agent: a real agent process against a real Mosquitto. The same code
runs on the emulated arm64 Pi in test_flash_emulated.py.
"""

from __future__ import annotations

import site
import stat
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import tomllib

from coordinator.flash import wait_online
from edge_agent import service, servicemgr

from .conftest import wait_until

ROOT = Path(__file__).resolve().parent.parent


# -- pure logic ---------------------------------------------------------------------------------


def test_toml_round_trip_and_escaping():
    table = {
        "device_id": "pi-01",
        "broker": "mqtt://h:1883",
        "data": 'C:\\x "quoted"\n',
        "heartbeat_s": 2.5,
        "keepalive_s": 30,
        "flag": True,
    }
    assert tomllib.loads(service.toml_dumps(table)) == table
    with pytest.raises(service.InstallError):
        service.toml_dumps({"x": [1, 2]})


def test_reflash_keeps_identity_and_refuses_a_new_one():
    existing = {"device_id": "pi-01", "broker": "mqtt://a:1883", "data_shard": "1/4"}
    merged = service.merged_config(existing, {"device_id": "pi-01", "broker": "mqtt://b:1883", "data": None})
    assert merged == {"device_id": "pi-01", "broker": "mqtt://b:1883", "data_shard": "1/4"}
    with pytest.raises(service.InstallError, match="already flashed as 'pi-01'"):
        service.merged_config(existing, {"device_id": "pi-02"})


def test_write_config_is_private_validated_and_atomic(tmp_path):
    path = tmp_path / "etc" / "agent.toml"
    service.write_config(path, {"device_id": "pi-01", "broker": "mqtt://10.0.0.2:1883"})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    before = path.read_bytes()
    with pytest.raises(service.InstallError, match="broker"):
        service.write_config(path, {"device_id": "pi-01", "broker": "http://nope"})
    with pytest.raises(service.InstallError, match="device_id"):
        service.write_config(path, {"device_id": "bad id!", "broker": "mqtt://h:1"})
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["agent.toml"]  # no temp files left


def test_layouts_and_unit():
    user = servicemgr.layout(root=False, home=Path("/home/pi"))
    assert user.config == Path("/home/pi/.config/edgeprune/agent.toml")
    assert user.unit == Path("/home/pi/.config/systemd/user/edgeprune-agent.service")
    root = servicemgr.layout(root=True)
    assert root.config == Path("/etc/edgeprune/agent.toml") and root.prefix == Path("/opt/edgeprune")
    unit = servicemgr.unit_text(root)
    assert (
        "ExecStart=/opt/edgeprune/current/bin/python -m edge_agent.cli run --config /etc/edgeprune/agent.toml" in unit
    )
    assert "Restart=on-failure" in unit and "WantedBy=multi-user.target" in unit
    assert "WantedBy=default.target" in servicemgr.unit_text(user)


# -- the real thing: install, crash, upgrade, bad upgrades, uninstall ------------------------------


def _venv(lay: servicemgr.Layout, name: str, importable: bool = True) -> Path:
    """A venv like install.sh makes; the project and its dependencies come from this test's venv via .pth."""
    venv = lay.prefix / "venvs" / name
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    if importable:
        sp = next(venv.glob("lib/python3*/site-packages"))
        (sp / "edgeprune-test.pth").write_text("\n".join([str(ROOT), *site.getsitepackages()]) + "\n")
    return venv


def _agent_pids(lay: servicemgr.Layout) -> list[int]:
    try:
        sup = psutil.Process(int(lay.pidfile.read_text()))
    except (OSError, ValueError, psutil.Error):
        return []
    pids = []
    for c in sup.children():
        try:
            if c.status() != psutil.STATUS_ZOMBIE and "edge_agent.cli" in " ".join(c.cmdline()):
                pids.append(c.pid)
        except psutil.Error:
            pass
    return pids


@pytest.fixture
def device_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(servicemgr, "has_systemd", lambda: False)
    lay = servicemgr.layout(root=False, home=home)
    yield lay
    try:
        servicemgr.Supervisor(lay).stop()
    except OSError:
        pass


def test_install_crash_upgrade_rollback_uninstall(mosquitto, session_factory, device_home):
    lay = device_home
    url = mosquitto.url
    cfg = {"device_id": "svc-1", "broker": url, "fleet": "test", "heartbeat_s": 0.5}
    session = session_factory(url)

    # a first install that cannot start leaves nothing behind
    broken = _venv(lay, "broken", importable=False)
    with pytest.raises(service.InstallError, match="did not stay up"):
        service.install(broken, "broken", cfg, lay)
    assert not lay.current.exists() and not lay.config.exists() and not _agent_pids(lay)
    assert not servicemgr.Supervisor(lay).running()

    # first install
    v1 = _venv(lay, "b1")
    r1 = service.install(v1, "b1", {**cfg, "data_shard": "1/4"}, lay)
    assert r1["first_install"] and r1["service"] == "supervisor" and not r1["upgraded"]
    assert stat.S_IMODE(lay.config.stat().st_mode) == 0o600
    caps = wait_online(session, "svc-1", 30)
    assert caps is not None and caps["device_id"] == "svc-1"
    (pid1,) = wait_until(lambda: _agent_pids(lay), 10)

    # the agent crashes: the supervisor restarts it and it comes back
    psutil.Process(pid1).kill()
    pids = wait_until(lambda: [p for p in _agent_pids(lay) if p != pid1], 20)
    assert pids, "the supervisor did not restart the agent"
    session.views.pop("svc-1", None)
    assert wait_online(session, "svc-1", 30) is not None

    # upgrade: a new venv; identity, the settings given before, and the state survive
    marker = Path(tomllib.loads(lay.config.read_text())["state_dir"]) / "marker"
    marker.write_text("kept")
    v2 = _venv(lay, "b2")
    r2 = service.install(v2, "b2", {"device_id": "svc-1", "broker": url}, lay)
    assert r2["upgraded"] and r2["previous_bundle_id"] == "b1" and not r2["first_install"]
    assert lay.current.resolve() == v2.resolve() and v1.exists()  # the previous venv is kept for rollback
    config = tomllib.loads(lay.config.read_text())
    assert config["data_shard"] == "1/4" and config["device_id"] == "svc-1"
    assert marker.read_text() == "kept"
    session.views.pop("svc-1", None)
    assert wait_online(session, "svc-1", 30) is not None

    # refused re-flashes change nothing and leave the agent running
    running = _agent_pids(lay)
    with pytest.raises(service.InstallError, match="already flashed"):
        service.install(v2, "b2", {"device_id": "svc-other", "broker": url}, lay)
    with pytest.raises(service.InstallError, match="broker"):
        service.install(v2, "b2", {"device_id": "svc-1", "broker": "http://x"}, lay)
    assert _agent_pids(lay) == running and lay.current.resolve() == v2.resolve()

    # an upgrade whose agent cannot start rolls back to the running version and config
    before = lay.config.read_bytes()
    bad = _venv(lay, "b3-broken", importable=False)
    with pytest.raises(service.InstallError, match="did not stay up"):
        service.install(bad, "b3", {"device_id": "svc-1", "broker": url, "fleet": "test"}, lay)
    assert lay.current.resolve() == v2.resolve() and lay.config.read_bytes() == before
    assert wait_until(lambda: _agent_pids(lay), 10)
    session.views.pop("svc-1", None)
    assert wait_online(session, "svc-1", 30) is not None

    # uninstall: nothing running, nothing left
    pids = _agent_pids(lay)
    sup = int(lay.pidfile.read_text())
    out = service.uninstall(lay)
    assert str(lay.prefix) in out["removed"] and str(lay.config) in out["removed"]
    assert not lay.prefix.exists() and not lay.config.exists() and not lay.state.exists()
    for pid in pids + [sup]:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_install_with_a_password(tmp_path, session_factory, device_home):
    """Password authentication end to end: the file is installed 0600 next to the keys, the config
    names the copy, the agent comes online on a broker that refuses anonymous clients."""
    from coordinator import broker as broker_mod

    lay = device_home
    b = broker_mod.start(
        "mosquitto",
        "127.0.0.1",
        0,
        tmp_path / "pw",
        log_file=tmp_path / "pw.log",
        users={"svc-2": "pi-pass", "coordinator": "c-pass"},
    )
    try:
        secret = tmp_path / "given.password"
        secret.write_text("pi-pass\n")
        secret.chmod(0o600)
        session = session_factory(b.url, username="coordinator", password="c-pass")
        service.install(
            _venv(lay, "p1"),
            "p1",
            {"device_id": "svc-2", "broker": b.url, "fleet": "test", "heartbeat_s": 0.5, "username": "svc-2"},
            lay,
            password_file=secret,
        )
        installed = lay.config.parent / "tls" / "mqtt.password"
        config = tomllib.loads(lay.config.read_text())
        assert config["password_file"] == str(installed) and "password" not in config
        assert stat.S_IMODE(installed.stat().st_mode) == 0o600 and installed.read_text() == "pi-pass\n"
        assert wait_online(session, "svc-2", 30) is not None
        service.uninstall(lay)
        assert not installed.exists()
    finally:
        b.stop()
