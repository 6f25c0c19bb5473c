"""`edgeprune flash` end to end on an emulated Raspberry Pi: arm64 Debian Bookworm under qemu-user.

scripts/pi-emulator runs the root filesystem (built once by `scripts/pi-emulator prepare`,
which ./scripts/test calls when it runs as root) with an SSH server on a loopback
port. Everything here goes through the real system `ssh`/`scp`, a real Mosquitto and
a real agent running as aarch64 code. Bundles are built with --offline from the
aarch64 wheel cache ./scripts/test fills, so the tests themselves use no network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coordinator import agentwheel, bundle
from coordinator import broker as broker_mod

from .helpers.cli import json_cli

ROOT = Path(__file__).resolve().parent.parent
EMULATOR = ROOT / "scripts" / "pi-emulator"
EMU_DIR = Path(os.environ.get("EDGEPRUNE_PI_DIR", "/var/cache/edgeprune/pi-rootfs"))
ROOTFS = EMU_DIR / "rootfs"
PLATFORM = bundle.Platform.parse("aarch64", "3.11")

pytestmark = pytest.mark.slow


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "the emulated Pi needs root (chroot, binfmt_misc)"
    if not (EMU_DIR / ".complete").exists():
        return f"no emulated Pi root filesystem in {EMU_DIR}: run `sudo scripts/pi-emulator prepare` (./scripts/test does it as root)"
    if not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
        return "binfmt_misc has no qemu-aarch64 entry (scripts/pi-emulator prepare registers it)"
    if not any(bundle.wheel_cache(PLATFORM).glob("ai_edge_litert-*.whl")):
        return f"no aarch64 wheels cached in {bundle.wheel_cache(PLATFORM)} (./scripts/test downloads them)"
    for tool in ("ssh", "scp"):
        if shutil.which(tool) is None:
            return f"no {tool} client installed"
    return None


REASON = _why_not()
if REASON:
    print(f"\n[test_flash_emulated] skipped: {REASON}", file=sys.stderr)
    pytestmark = [pytest.mark.slow, pytest.mark.skip(reason=REASON)]


def _chroot(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(["chroot", str(ROOTFS), *cmd], capture_output=True, text=True)


@pytest.fixture(scope="module")
def pi(tmp_path_factory):
    """The emulated Pi, plus a second user 'tiny' whose home is a 40 MB tmpfs (for the disk check)."""
    port = broker_mod.free_port()
    proc = subprocess.run(["bash", str(EMULATOR), "start", "--port", str(port)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"pi-emulator start failed: {proc.stderr}")
    key = str(EMU_DIR / "id_ed25519")
    for user in ("pi", "tiny"):  # nothing from an earlier, interrupted run
        home = ROOTFS / "home" / user
        for sub in (".local/share/edgeprune", ".config/edgeprune", ".local/state/edgeprune"):
            shutil.rmtree(home / sub, ignore_errors=True)
    subprocess.run(["pkill", "-f", "aarch64.*edge_agent"], check=False)
    if _chroot("id", "tiny").returncode != 0:
        _chroot("useradd", "-m", "-s", "/bin/bash", "tiny")
    _chroot("usermod", "-p", "*", "tiny")
    tiny = ROOTFS / "home" / "tiny"
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m,mode=755", "tmpfs", str(tiny)], check=True)
    uid = int(_chroot("id", "-u", "tiny").stdout)
    (tiny / ".ssh").mkdir(mode=0o700)
    shutil.copy(EMU_DIR / "id_ed25519.pub", tiny / ".ssh" / "authorized_keys")
    for p in (tiny, tiny / ".ssh", tiny / ".ssh" / "authorized_keys"):
        os.chown(p, uid, uid)
    # a device whose only Python is too old (what `python3 -V` says on Debian 10)
    old = ROOTFS / "usr/local/bin/python3.7"
    old.write_text("#!/bin/sh\ncat >/dev/null\necho python=3.7.3\necho glibc=2.28\necho broker=ok\n")
    old.chmod(0o755)
    known_hosts = tmp_path_factory.mktemp("ssh") / "known_hosts"
    yield {"port": port, "key": key, "known_hosts": str(known_hosts)}
    subprocess.run(["umount", "-l", str(tiny)], check=False)
    old.unlink(missing_ok=True)
    subprocess.run(["bash", str(EMULATOR), "stop"], capture_output=True)


@pytest.fixture
def cli(pi, mosquitto, tmp_path):
    home = tmp_path / "home"

    run = json_cli(home, mosquitto.url, "emu")

    run.home = home
    run.ssh = ["--identity", pi["key"], "--ssh-option", f"UserKnownHostsFile={pi['known_hosts']}"]
    run.target = lambda user="pi", port=pi["port"]: f"ssh://{user}@127.0.0.1:{port}"
    return run


def _agents_running() -> list[str]:
    out = subprocess.run(["pgrep", "-af", "edge_agent"], capture_output=True, text=True).stdout
    return [ln for ln in out.splitlines() if "qemu-aarch64" in ln or "/home/" in ln or "/opt/edgeprune" in ln]


def _installed(user: str) -> bool:
    home = ROOTFS / "home" / user
    return (home / ".local/share/edgeprune").exists() or (home / ".config/edgeprune").exists()


def test_refusals_leave_nothing_installed(cli, pi, tmp_path):
    """Each bad situation: a clear message naming the problem and the fix, exit 1, nothing installed."""
    stray_key = tmp_path / "stray"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stray_key)], check=True)
    cases = [
        ("unreachable", [cli.target(port=broker_mod.free_port()), *cli.ssh], "SSH server"),
        (
            "auth",
            [cli.target(), "--identity", str(stray_key), "--ssh-option", f"UserKnownHostsFile={pi['known_hosts']}"],
            "ssh-copy-id",
        ),
        ("no_python", [cli.target(), *cli.ssh, "--remote-python", "/usr/bin/python9"], "sudo apt install python3"),
        ("old_python", [cli.target(), *cli.ssh, "--remote-python", "/usr/local/bin/python3.7"], "needs 3.10"),
        ("broker_unreachable", [cli.target(), *cli.ssh, "--broker", "mqtt://127.0.0.1:1"], "edgeprune broker --host"),
        ("disk", [cli.target("tiny"), *cli.ssh], "Free some space"),
    ]
    for code, args, fix in cases:
        rc, out = cli("flash", *args, "--device-id", "emu-bad", "--offline", timeout=300)
        assert rc == 1, (code, out)
        assert out["error"]["code"] == code, out
        assert fix in out["error"]["message"], out
    assert not _installed("pi") and not _installed("tiny")
    assert not _agents_running()


def test_flash_bench_upgrade_unflash(cli, pi, mosquitto, tmp_path):
    # 1. flash: the aarch64 agent joins the fleet
    rc, out = cli("flash", cli.target(), *cli.ssh, "--device-id", "emu-pi", "--offline", "--set", "heartbeat_s=2")
    assert rc == 0, out
    assert out["probe"]["arch"] == "aarch64" and out["probe"]["python"].startswith("3.11")
    assert out["caps"]["arch"] == "aarch64" and out["caps"]["device_id"] == "emu-pi"
    assert "litert" in out["caps"]["runtimes"]
    assert out["install"]["first_install"] and out["install"]["service"] == "supervisor"  # no systemd in a chroot
    config = ROOTFS / "home/pi/.config/edgeprune/agent.toml"
    assert oct(config.stat().st_mode & 0o777) == "0o600"
    assert 'device_id = "emu-pi"' in config.read_text() and "heartbeat_s = 2.0" in config.read_text()

    rc, devices = cli("devices")
    assert rc == 0 and {"emu-pi": "online"}.items() <= {d["device_id"]: d["state"] for d in devices["devices"]}.items()

    # 2. the emulated device benchmarks a small TFLite model with LiteRT (aarch64 code under qemu)
    rc, exported = cli(
        "export", "mlp", "--formats", "dense,sparse-int8", "--prune", "0.8", "--out", str(tmp_path / "art")
    )
    assert rc == 0, exported
    rc, bench = cli("bench", "--model", str(tmp_path / "art"), "--devices", "emu-pi", "--runs", "30", "--warmup", "3")
    assert rc == 0, bench
    results = {r["artifact"]: r for r in bench["devices"]["emu-pi"]["artifacts"]}
    assert set(results) == {"model-dense", "model-sparse-int8"}
    for r in results.values():
        assert r["status"] == "ok", r
        assert r["latency_ms"]["p50"] > 0

    # 3. upgrade in place: a newer agent version, same identity, config and state
    state_marker = ROOTFS / "home/pi/.local/state/edgeprune/agent/marker"
    state_marker.write_text("kept")
    src = agentwheel.copy_sources(ROOT, tmp_path / "src-0.1.1")
    for f in ("pyproject.toml", "edge_agent/__init__.py"):
        p = src / f
        p.write_text(p.read_text().replace('"0.1.0"', '"0.1.1"', 1))
    newer = bundle.build(PLATFORM, tmp_path / "agent-0.1.1.tar.gz", offline=True, source_root=src)
    assert newer["edgeprune"] == "0.1.1"
    pid_before = _agents_running()
    rc, out = cli("flash", cli.target(), *cli.ssh, "--device-id", "emu-pi", "--from-bundle", newer["path"])
    assert rc == 0, out
    assert out["install"]["upgraded"] and out["caps"]["agent_version"] == "0.1.1"
    assert state_marker.read_text() == "kept"
    assert "heartbeat_s = 2.0" in config.read_text()  # earlier settings survive
    assert _agents_running() and _agents_running() != pid_before

    # a second flash with another identity is refused and leaves the agent as it was
    rc, out = cli("flash", cli.target(), *cli.ssh, "--device-id", "emu-other", "--from-bundle", newer["path"])
    assert rc == 1 and "already flashed as 'emu-pi'" in out["error"]["message"]

    # 4. unflash: service stopped, files gone, the fleet forgets it
    rc, out = cli("unflash", cli.target(), *cli.ssh, "--device-id", "emu-pi")
    assert rc == 0, out
    assert not _installed("pi") and not (ROOTFS / "home/pi/.local/state/edgeprune").exists()
    deadline = time.monotonic() + 20
    while _agents_running() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _agents_running()
    rc, devices = cli("devices")
    assert "emu-pi" not in {d["device_id"] for d in devices["devices"]}, devices


OLD_LAYOUT = "e599cf574eefc8db85a50d68286869a070660beb"  # before edge_agent/common/ and edge_agent/ml/ existed


def test_upgrade_from_the_old_layout(cli, pi, mosquitto, tmp_path):
    """A device flashed with the agent as it was before the shared layer moved (edge_agent/link.py,
    edge_agent/tfenv.py, ...) upgrades in place to this one: the entry points the installed service
    calls (`python -m edge_agent.service`, `edgeprune-agent run`) keep working across the move."""
    if subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{OLD_LAYOUT}^{{commit}}"]).returncode != 0:
        pytest.skip(f"this checkout does not have commit {OLD_LAYOUT[:12]} (a shallow clone?)")
    src = tmp_path / "old-src"
    src.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", OLD_LAYOUT], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    assert (src / "edge_agent" / "link.py").exists() and not (src / "edge_agent" / "common").exists()
    for f in ("pyproject.toml", "edge_agent/__init__.py"):
        p = src / f
        p.write_text(p.read_text().replace('"0.1.0"', '"0.0.9"', 1))
    old = bundle.build(PLATFORM, tmp_path / "agent-0.0.9.tar.gz", offline=True, source_root=src)
    assert old["edgeprune"] == "0.0.9"
    try:
        rc, out = cli("flash", cli.target(), *cli.ssh, "--device-id", "emu-old", "--from-bundle", old["path"])
        assert rc == 0, out
        assert out["caps"]["agent_version"] == "0.0.9"
        marker = ROOTFS / "home/pi/.local/state/edgeprune/agent/marker"
        marker.write_text("kept")
        rc, out = cli("flash", cli.target(), *cli.ssh, "--device-id", "emu-old", "--offline")
        assert rc == 0, out
        assert out["install"]["upgraded"] and out["caps"]["agent_version"] == bundle.__version__
        assert marker.read_text() == "kept"
        rc, pong = cli("ping", "--device", "emu-old", "--count", "1")
        assert rc == 0, pong
    finally:
        rc, out = cli("unflash", cli.target(), *cli.ssh, "--device-id", "emu-old")
    assert rc == 0, out
    assert not _installed("pi")


def test_flash_as_root_into_a_secure_fleet(cli, pi, tmp_path):
    """As root, with a TLS broker: system paths, the device's own certificate installed 0600, online over
    mutual TLS; unflash removes it all."""
    from coordinator import pki

    pki.init(cli.home)
    secure = broker_mod.start(
        "mosquitto", "127.0.0.1", 0, tmp_path / "sb", log_file=tmp_path / "sb.log", pki_dir=pki.pki_dir(cli.home)
    )
    try:
        rc, out = cli(
            "flash", cli.target("root"), *cli.ssh, "--device-id", "emu-root", "--offline", "--broker", secure.url
        )
        assert rc == 0, out
        assert out["install"]["root"] and out["install"]["config"] == "/etc/edgeprune/agent.toml"
        assert out["caps"]["arch"] == "aarch64"
        assert (ROOTFS / "opt/edgeprune/current/bin/python").exists()
        assert oct((ROOTFS / "etc/edgeprune/agent.toml").stat().st_mode & 0o777) == "0o600"
        key = ROOTFS / "etc/edgeprune/tls/device.key"
        assert oct(key.stat().st_mode & 0o777) == "0o600"
        assert key.read_bytes() == (cli.home / "pki/devices/emu-root.key").read_bytes()
        assert 'tls_cert = "/etc/edgeprune/tls/device.crt"' in (ROOTFS / "etc/edgeprune/agent.toml").read_text()
        rc, out = cli("unflash", cli.target("root"), *cli.ssh, "--device-id", "emu-root", "--broker", secure.url)
        assert rc == 0, out
        for p in ("opt/edgeprune", "etc/edgeprune", "var/lib/edgeprune"):
            assert not (ROOTFS / p).exists(), p
    finally:
        secure.stop()
