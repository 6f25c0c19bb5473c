"""The generated systemd unit, really run by systemd: `edgeprune flash` into an emulated Pi booted with
systemd as PID 1 (systemd-nspawn --boot on the arm64 Debian 12 rootfs, arm64 code under qemu-user).

It checks what the unit promises: the agent starts and comes online; killed with SIGKILL it is
restarted (Restart=on-failure) and comes back; an agent that exits 2 (bad configuration) is not
restarted (RestartPreventExitStatus=2); after a reboot it starts by itself (enabled, WantedBy);
unflash disables and removes it. Everything goes through the real system ssh/scp into the
container's own sshd (on a loopback port: the container shares the host network), a real Mosquitto
on loopback, and the real installer. tests/helpers/systemd_boot.py boots the machine; the rootfs
is built once by `sudo scripts/pi-emulator prepare --systemd`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coordinator import broker as broker_mod
from coordinator import bundle
from coordinator.flash import wait_online
from edge_agent import servicemgr

from .conftest import wait_until
from .helpers import systemd_boot
from .helpers.cli import json_cli

ROOT = Path(__file__).resolve().parent.parent
PLATFORM = bundle.Platform.parse("aarch64", "3.11")
UNIT = servicemgr.UNIT_NAME
DEVICE = "emu-systemd"

pytestmark = pytest.mark.slow


def _why_not() -> str | None:
    reason = systemd_boot.why_not()
    if reason:
        return reason
    if not any(bundle.wheel_cache(PLATFORM).glob("ai_edge_litert-*.whl")):
        return f"no aarch64 wheels cached in {bundle.wheel_cache(PLATFORM)} (./scripts/test downloads them)"
    for tool in ("ssh", "scp", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"no {tool} installed"
    return None


REASON = _why_not()
if REASON:
    print(f"\n[test_systemd_unit] skipped: {REASON}", file=sys.stderr)
    pytestmark = [pytest.mark.slow, pytest.mark.skip(reason=REASON)]


@pytest.fixture
def pi(tmp_path):
    """A booted emulated Pi (systemd PID 1) with sshd on a loopback port; powered off and unmounted after."""
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key), "-C", "edgeprune-test"], check=True)
    machine = systemd_boot.Machine(
        tmp_path / "machine",
        f"edgeprune-pi-{os.getpid()}",
        broker_mod.free_port(),
        (tmp_path / "id_ed25519.pub").read_text(),
    )
    systemd_boot.reap_stale()  # what a killed earlier run left (its pytest process is gone)
    try:
        machine.mount()
        try:
            state = machine.boot()
        except systemd_boot.BootError as exc:
            cached = systemd_boot.cached_probe()
            if cached is None or not cached["ok"]:  # never booted here: a property of this machine, not a bug
                systemd_boot.record_probe(False, str(exc))
                pytest.skip(f"systemd does not boot in a container here: {exc}")
            raise
        systemd_boot.record_probe(True, f"booted, state {state}")
        machine.key = str(key)
        machine.known_hosts = str(tmp_path / "known_hosts")
        deadline = time.monotonic() + 60
        while machine.show("ssh.service", "ActiveState")["ActiveState"] != "active":
            assert time.monotonic() < deadline, machine.journal("ssh.service")
            time.sleep(0.5)
        yield machine
    finally:
        machine.close()


@pytest.fixture
def cli(pi, mosquitto, tmp_path):
    home = tmp_path / "home"

    run = json_cli(home, mosquitto.url, "emu", cwd=ROOT)

    run.args = [
        f"ssh://root@127.0.0.1:{pi.ssh_port}",
        "--identity",
        pi.key,
        "--ssh-option",
        f"UserKnownHostsFile={pi.known_hosts}",
    ]
    return run


def _wait_props(pi, predicate, timeout_s: float, what: str) -> dict:
    props = wait_until(lambda: (lambda p: p if predicate(p) else None)(pi.show(UNIT)), timeout_s, 0.5)
    assert props, f"{what}: {pi.show(UNIT)}\n{pi.journal(UNIT)}"
    return props


def _online(session, device: str = DEVICE, timeout_s: float = 120) -> dict | None:
    session.views.pop(device, None)  # only a fresh announcement counts
    return wait_online(session, device, timeout_s)


def test_unit_starts_restarts_refuses_exit_2_and_starts_at_boot(pi, cli, mosquitto, session_factory):
    t0 = time.monotonic()
    times = {}
    # 1. flash as root: the system unit, enabled and started; the agent comes online
    rc, out = cli("flash", *cli.args, "--device-id", DEVICE, "--offline", "--set", "heartbeat_s=2")
    assert rc == 0, out
    times["flash"] = time.monotonic() - t0
    assert out["probe"]["systemd"] and out["probe"]["arch"] == "aarch64", out["probe"]
    assert out["install"]["service"] == "systemd" and out["install"]["root"], out["install"]
    assert out["caps"]["arch"] == "aarch64" and out["caps"]["device_id"] == DEVICE
    unit_file = pi.root / "etc/systemd/system" / UNIT
    assert unit_file.read_text() == servicemgr.unit_text(servicemgr.layout(root=True))
    assert (pi.root / "etc/systemd/system/multi-user.target.wants" / UNIT).is_symlink()
    props = pi.show(UNIT)
    assert props["ActiveState"] == "active" and props["SubState"] == "running", props
    assert props["UnitFileState"] == "enabled", props
    pid1 = int(props["MainPID"])
    cmdline = Path(f"/proc/{_host_pid(pi, pid1)}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    assert "/opt/edgeprune/current/bin/python -m edge_agent.cli run --config /etc/edgeprune/agent.toml" in cmdline
    session = session_factory(mosquitto.url, fleet="emu")
    assert _online(session) is not None

    # 2. SIGKILL the agent's main process: systemd restarts it (RestartSec=5), it comes back online
    restarts = int(props["NRestarts"])
    t = time.monotonic()
    pi.run("kill", "-9", str(pid1))
    props = _wait_props(
        pi,
        lambda p: p["ActiveState"] == "active" and p["MainPID"] not in ("0", str(pid1)),
        60,
        "not restarted after SIGKILL",
    )
    assert int(props["NRestarts"]) == restarts + 1, props
    journal = pi.journal(UNIT)
    assert "code=killed, status=9/KILL" in journal and "Scheduled restart job" in journal, journal
    assert _online(session) is not None
    times["restart after SIGKILL"] = time.monotonic() - t

    # 3. a configuration the agent refuses: it exits 2 and systemd leaves it stopped (RestartPreventExitStatus)
    config = pi.root / "etc/edgeprune/agent.toml"
    good = config.read_bytes()
    assert b'broker = "mqtt://' in good
    config.write_text(good.decode().replace('broker = "mqtt://', 'broker = "http://', 1))
    t = time.monotonic()
    pi.run("systemctl", "restart", UNIT)
    props = _wait_props(pi, lambda p: p["ActiveState"] == "failed", 60, "the agent with a bad config did not fail")
    assert props["Result"] == "exit-code" and props["ExecMainStatus"] == "2", props
    failed_restarts = int(props["NRestarts"])
    time.sleep(5 + 5)  # RestartSec=5, and then some: nothing may restart it
    props = pi.show(UNIT)
    assert props["ActiveState"] == "failed" and props["MainPID"] == "0", props
    assert int(props["NRestarts"]) == failed_restarts, props
    journal = pi.journal(UNIT)  # the agent said why, and systemd recorded exit status 2
    assert "edgeprune-agent: setting broker" in journal and "status=2/INVALIDARGUMENT" in journal, journal
    times["exit 2 stays down"] = time.monotonic() - t

    # 4. good config back, reboot the machine: the unit starts by itself (enabled, WantedBy=multi-user.target)
    config.write_bytes(good)
    t = time.monotonic()
    state = pi.reboot()
    assert state in ("running", "degraded"), state
    props = _wait_props(pi, lambda p: p["ActiveState"] == "active" and p["MainPID"] != "0", 60, "not started at boot")
    assert int(props["NRestarts"]) == 0, props  # started by the boot, not restarted into life
    assert pi.run("systemctl", "is-enabled", UNIT).stdout.strip() == "enabled"
    assert _online(session) is not None
    times["reboot to online"] = time.monotonic() - t

    # 5. unflash: stopped, disabled, the unit file gone
    rc, out = cli("unflash", *cli.args, "--device-id", DEVICE, timeout=300)
    assert rc == 0, out
    assert not unit_file.exists()
    assert not (pi.root / "etc/systemd/system/multi-user.target.wants" / UNIT).exists()
    props = pi.show(UNIT)
    assert props["LoadState"] == "not-found" and props["ActiveState"] in ("inactive", "failed"), props
    assert not (pi.root / "opt/edgeprune").exists() and not (pi.root / "etc/edgeprune").exists()
    times["total"] = time.monotonic() - t0
    print("\n[test_systemd_unit] " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))


def _host_pid(pi, pid_in_container: int) -> int:
    """The host's PID of a process in the container's PID namespace (its NSpid ends with the inner one)."""
    inner_ns = os.readlink(f"/proc/{pi.leader}/ns/pid")
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if os.readlink(d / "ns/pid") != inner_ns:
                continue
            for line in (d / "status").read_text().splitlines():
                if line.startswith("NSpid:") and line.split()[-1] == str(pid_in_container):
                    return int(d.name)
        except OSError:
            continue
    raise AssertionError(f"no process {pid_in_container} in the container")


def _user_unit(pi, *props: str) -> dict[str, str]:
    """``systemctl --user show`` for pi's unit, as pi (empty when pi's user manager is not running)."""
    out = pi.run(
        "runuser",
        "-u",
        "pi",
        "--",
        "env",
        "XDG_RUNTIME_DIR=/run/user/1000",
        "systemctl",
        "--user",
        "show",
        UNIT,
        "--property=" + ",".join(props or ("ActiveState", "MainPID", "NRestarts", "UnitFileState")),
        check=False,
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _user_diag(pi, broker) -> str:
    agent = pi.run(
        "journalctl", "--no-pager", "-o", "short-precise", f"_SYSTEMD_USER_UNIT={UNIT}", "-n", "30", check=False
    ).stdout
    manager = pi.run(
        "journalctl", "--no-pager", "-o", "short-precise", "-u", "user@1000.service", "-n", "30", check=False
    ).stdout
    return (
        f"unit {_user_unit(pi)}\n-- agent --\n{agent}\n-- user manager --\n{manager}\n-- broker --\n"
        f"{broker.log_text()[-3000:]}"
    )


def test_user_unit_survives_logout_and_starts_at_boot(pi, cli, mosquitto, session_factory):
    """As a normal user the agent is a systemd *user* unit. With lingering it outlives the flash's SSH session
    and starts at boot; without it, user@.service stops ~10 s after the last session ends, and the agent too."""
    user_target = [cli.args[0].replace("root@", "pi@"), *cli.args[1:]]
    session = session_factory(mosquitto.url, fleet="emu")
    device = "emu-systemd-user"
    logout_s = 10 + 5  # logind's UserStopDelaySec=10s, and then some

    def linger() -> str:
        return pi.run("loginctl", "show-user", "pi", "--property=Linger", "--value", check=False).stdout.strip()

    t0 = time.monotonic()
    times = {}

    # 1. lingering enabled by root (what the install's note asks for): flash as pi
    pi.run("loginctl", "enable-linger", "pi")
    rc, out = cli("flash", *user_target, "--device-id", device, "--offline", "--set", "heartbeat_s=2")
    assert rc == 0, out
    times["flash"] = time.monotonic() - t0
    assert out["install"]["service"] == "systemd" and not out["install"]["root"], out["install"]
    stale_note = [n for n in out["install"]["notes"] if "linger" in n]  # lingering *is* on: a false alarm
    unit_file = pi.root / "home/pi/.config/systemd/user" / UNIT
    assert unit_file.read_text() == servicemgr.unit_text(servicemgr.layout(root=False, home=Path("/home/pi")))
    assert (pi.root / "home/pi/.config/systemd/user/default.target.wants" / UNIT).is_symlink()
    time.sleep(logout_s)  # the flash's SSH session is over: the user manager stays (lingering) and so does the agent
    assert linger() == "yes"
    props = _user_unit(pi)
    assert props.get("ActiveState") == "active" and props.get("UnitFileState") == "enabled", _user_diag(pi, mosquitto)
    assert _online(session, device) is not None, _user_diag(pi, mosquitto)

    # 2. reboot: pi's user manager starts at boot (lingering), and the agent with it (WantedBy=default.target)
    t = time.monotonic()
    pi.reboot()
    props = wait_until(lambda: (lambda p: p if p.get("ActiveState") == "active" else None)(_user_unit(pi)), 60, 0.5)
    assert props, _user_diag(pi, mosquitto)
    assert _online(session, device) is not None, _user_diag(pi, mosquitto)
    times["reboot to online"] = time.monotonic() - t

    # 3. no lingering and no polkit (a minimal Debian): logind refuses pi's own `loginctl enable-linger`. A flash
    #    that reports success must leave an agent that outlives the flash's SSH session; else it must refuse.
    pi.run("loginctl", "disable-linger", "pi")
    t = time.monotonic()
    rc, again = cli("flash", *user_target, "--device-id", device, "--from-bundle", out["bundle"]["path"])
    times["re-flash without lingering"] = time.monotonic() - t
    silent_failure = False
    if rc == 0:
        time.sleep(logout_s)
        silent_failure = _online(session, device, 30) is None
    else:
        assert "enable-linger" in again["error"]["message"], again  # refused, naming the fix

    rc, gone = cli("unflash", *user_target, "--device-id", device, timeout=300)
    assert rc == 0, gone
    assert not unit_file.exists()
    times["total"] = time.monotonic() - t0
    print("\n[test_systemd_unit] user unit: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    assert not silent_failure, (
        f"without lingering the flash succeeded (notes: {again['install']['notes']}), yet the agent stopped when "
        f"the flash's SSH session ended: it must refuse, naming `sudo loginctl enable-linger pi`"
    )
    assert not stale_note, f"with lingering already on, the install still says {stale_note[0]!r}"
