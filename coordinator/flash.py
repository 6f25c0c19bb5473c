"""``edgeprune flash`` / ``unflash``: put the agent on a device over SSH, or take it off.

Steps, each reported: probe the device (one SSH call: architecture, OS, Python,
glibc, disk, systemd, root, and whether the device reaches the broker), build or
reuse the offline bundle for exactly that platform, copy it with scp, run its
``install.sh`` (venv, ``pip --no-index``, config, service), then wait until the
device is online over MQTT and print its capabilities. Every check that can fail
fails *before* anything is installed; an install that fails later is undone on
the device (see ``edge_agent.service``).

The system OpenSSH client does the transport (:mod:`.ssh`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

from edge_agent.common.link import parse_broker_url
from edge_agent.service import INSTALLER_DIR, parse_result

from . import bundle
from .fleet import is_live
from .ssh import FlashError, Ssh, Target

MIN_PYTHON = (3, 10)
REMOTE_DIR = ".cache/edgeprune-flash"  # relative to the SSH user's home
INSTALL_TIMEOUT_S = 1800.0  # pip on an emulated or slow device
ONLINE_TIMEOUT_S = 120.0


# -- probe -----------------------------------------------------------------------------------

PROBE = r"""
PY="$1"; BHOST="$2"; BPORT="$3"
echo "arch=$(uname -m)"
if [ -r /etc/os-release ]; then . /etc/os-release; echo "os=${PRETTY_NAME:-unknown}"; fi
echo "uid=$(id -u)"
echo "user=$(id -un)"
echo "home=$HOME"
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then echo systemd=1; else echo systemd=0; fi
if [ "$(id -u)" = 0 ]; then P=/opt/edgeprune; else P="$HOME/.local/share/edgeprune"; fi
D="$P"; while [ ! -d "$D" ]; do D="$(dirname "$D")"; done
echo "free_kb=$(df -Pk "$D" | awk 'NR==2 {print $4}')"
[ -f "$P/install.json" ] && echo "installed=$(tr -d '\n' < "$P/install.json")"
if command -v "$PY" >/dev/null 2>&1; then
  "$PY" - "$BHOST" "$BPORT" <<'EOF' || echo "python_error=$PY does not run"
import platform, socket, sys
print("python=%d.%d.%d" % sys.version_info[:3])
print("glibc=" + (platform.libc_ver()[1] or ""))
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()
    print("broker=ok")
except OSError as exc:
    print("broker=" + (str(exc) or type(exc).__name__))
EOF
else
  echo "python="
fi
"""


def probe(ssh: Ssh, python: str, broker_host: str, broker_port: int) -> dict:
    rc, out, err = ssh.run(PROBE, [python, broker_host, str(broker_port)], timeout=60)
    if rc != 0:
        raise FlashError("probe", f"probing {ssh.target} failed (exit {rc}): {err.strip()}")
    info: dict = {}
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            info[key] = value
    if "installed" in info:
        try:
            info["installed"] = json.loads(info["installed"])
        except ValueError:
            info["installed"] = None
    for key in ("uid", "free_kb"):
        info[key] = int(info[key]) if info.get(key, "").isdigit() else None
    info["systemd"] = info.get("systemd") == "1"
    return info


def check(info: dict, target: Target, python: str, broker_url: str) -> None:
    """Refuse what cannot work, before anything is copied or installed."""
    version = info.get("python") or ""
    if not version:
        raise FlashError(
            "no_python",
            f"{target} has no {python}"
            + (f" ({info['python_error']})" if info.get("python_error") else "")
            + ": install Python 3.10 or newer (Raspberry Pi OS / Debian: sudo apt install python3), "
            "or pass --remote-python PATH if it lives elsewhere",
        )
    if tuple(int(x) for x in version.split(".")[:2]) < MIN_PYTHON:
        raise FlashError(
            "old_python",
            f"{target} has Python {version}; edgeprune needs 3.10 or newer. Upgrade the OS "
            f"(Raspberry Pi OS Bookworm has 3.11) or pass --remote-python PATH to a newer one",
        )
    if info.get("broker") != "ok":
        raise FlashError(
            "broker_unreachable",
            f"{target} cannot reach the broker {broker_url} ({info.get('broker')}). --broker must be the "
            f"address as the *device* sees it (your laptop's LAN address, not 127.0.0.1 unless the broker "
            f"runs on the device), and the broker must listen on it: edgeprune broker --host 0.0.0.0",
        )


# -- flash ----------------------------------------------------------------------------------


def _platform(info: dict) -> bundle.Platform:
    glibc = info.get("glibc") or None
    major_minor = ".".join(info["python"].split(".")[:2])
    try:
        return bundle.Platform.parse(
            info.get("arch", "?"), major_minor, glibc if glibc and re.fullmatch(r"\d+\.\d+", glibc) else None
        )
    except bundle.BundleError as exc:
        raise FlashError("platform", str(exc)) from None


def _disk_needed_kb(manifest: dict, info: dict) -> int:
    installed = (info.get("installed") or {}).get("bundle_id") == manifest["bundle_id"]
    install_kb = 0 if installed else manifest["wheel_bytes"] * 3 // 1024 + 50 * 1024
    return manifest["bundle_bytes"] * 2 // 1024 + install_kb  # the .tar.gz and its unpacked copy


def flash(
    target: Target,
    ssh: Ssh,
    *,
    device_id: str,
    broker_url: str,
    fleet: str,
    home: Path,
    python: str = "python3",
    data: str | None = None,
    train: bool = False,
    reinstall: bool = False,
    offline: bool = False,
    from_bundle: Path | None = None,
    extra_settings: list[str] = (),
    device_username: str | None = None,
    device_password_file: Path | None = None,
    say: Callable[[str], None] = print,
) -> dict:
    """Everything up to a running service on the device; waiting for it online is :func:`wait_online`."""
    try:
        b = parse_broker_url(broker_url)
    except ValueError as exc:
        raise FlashError("usage", f"--broker: {exc}") from None
    from . import pki

    try:
        pki.check_device_name(device_id)
    except pki.PkiError as exc:
        raise FlashError("usage", f"--device-id: {exc}") from None
    if bool(device_username) != bool(device_password_file):
        raise FlashError("usage", "--device-username and --device-password-file go together")
    if device_password_file is not None:
        from edge_agent.settings import SettingsError, read_secret

        try:
            read_secret(str(device_password_file), "--device-password-file")
        except SettingsError as exc:
            raise FlashError("usage", str(exc)) from None
    say(f"[1/5] probing {target}")
    info = probe(ssh, python, b.host, b.port)
    say(
        f"      {info.get('arch')}, {info.get('os', 'unknown OS')}, Python {info.get('python') or 'none'}, "
        f"{'root' if info.get('uid') == 0 else 'user ' + str(info.get('user'))}, "
        f"{'systemd' if info['systemd'] else 'no systemd'}, {(info.get('free_kb') or 0) // 1024} MB free"
    )
    check(info, target, python, broker_url)
    platform = _platform(info)

    if from_bundle:
        say(f"[2/5] using bundle {from_bundle}")
        try:
            manifest = bundle.read_manifest(from_bundle)
        except bundle.BundleError as exc:
            raise FlashError("bundle", str(exc)) from None
        if (manifest["arch"], manifest["python"]) != (platform.arch, platform.python):
            raise FlashError(
                "bundle",
                f"{from_bundle} is for {manifest['arch']} / Python {manifest['python']}, "
                f"the device is {platform.arch} / Python {platform.python}",
            )
    else:
        say(f"[2/5] offline bundle for {platform.arch} / Python {platform.python}{' + training' if train else ''}")
        try:
            manifest = bundle.cached_build(
                platform, home, train=train, offline=offline, say=lambda m: say("      " + m)
            )
        except bundle.BundleError as exc:
            raise FlashError(exc.code, str(exc)) from None
    need_kb = _disk_needed_kb(manifest, info)
    if info.get("free_kb") is not None and info["free_kb"] < need_kb:
        raise FlashError(
            "disk",
            f"not enough disk on {target}: {info['free_kb'] // 1024} MB free, about "
            f"{need_kb // 1024 + 1} MB needed. Free some space (sudo apt clean; remove old "
            f"files) or use a bigger SD card, then flash again",
        )

    size_mb = manifest["bundle_bytes"] / 1e6
    say(f"[3/5] copying {Path(manifest['path']).name} ({size_mb:.1f} MB)")
    rc, _, err = ssh.run(f'mkdir -p "$HOME/{REMOTE_DIR}"', timeout=60)
    if rc != 0:
        raise FlashError("copy", f"cannot create ~/{REMOTE_DIR} on {target}: {err.strip()}")
    remote_tar = f"{REMOTE_DIR}/{Path(manifest['path']).name}"
    ssh.copy(Path(manifest["path"]), remote_tar)

    args = ["--device-id", device_id, "--broker", broker_url, "--fleet", fleet, "--python", python]
    if b.tls:  # a secure fleet: the device gets its own certificate (CN = device id) and the CA
        args += ["--tls", _send_identity(ssh, home, device_id, say)]
    if device_password_file is not None:  # password authentication: the file travels like the keys
        args += [
            "--set",
            f"username={device_username}",
            "--password-file",
            _send_private(ssh, {"mqtt.password": Path(device_password_file).read_bytes()}),
        ]
    say(f"[4/5] installing on {target}")
    if data:
        args += ["--data", data]
    for kv in extra_settings:
        args += ["--set", kv]
    if reinstall:
        args.append("--reinstall")
    script = (
        f'set -e; cd "$HOME/{REMOTE_DIR}"; rm -rf "{manifest["dir"]}"; '
        f'tar xzf "{Path(remote_tar).name}"; rc=0; sh "{manifest["dir"]}/install.sh" "$@" || rc=$?; '
        f'rm -rf "$HOME/{REMOTE_DIR}/tls" "$HOME/{REMOTE_DIR}"/*.tar.gz; '  # never leave keys behind
        f'[ $rc = 0 ] && rm -rf "$HOME/{REMOTE_DIR}"; exit $rc'
    )  # on failure the unpacked bundle and pip.log stay
    result: dict = {}

    def on_line(line: str) -> None:
        if (parsed := parse_result(line)) is not None:
            result.update(parsed)
        elif line.strip():
            say("      " + line.removeprefix("==> "))

    rc, _, err = ssh.run(script, args, timeout=INSTALL_TIMEOUT_S, on_line=on_line)
    if rc != 0:
        raise FlashError(
            _INSTALL_CODES.get(rc, "install"),
            f"installing on {target} failed (exit {rc}): {result.get('error') or err.strip()}",
        )
    return {
        "target": str(target),
        "device_id": device_id,
        "probe": info,
        "bundle": _bundle_summary(manifest),
        "install": result,
    }


def _send_private(ssh: Ssh, files: dict[str, bytes]) -> str:
    """Copy secrets to ~/REMOTE_DIR/tls (0700, files 0600; removed after the install); the path of the
    last one, relative to where install.sh runs."""
    import tempfile

    remote = f"{REMOTE_DIR}/tls"
    rc, _, err = ssh.run(f'umask 077; mkdir -p "$HOME/{remote}"', timeout=60)
    if rc != 0:
        raise FlashError("copy", f"cannot create ~/{remote} on {ssh.target}: {err.strip()}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            local = Path(tmp) / name
            local.write_bytes(data)
            local.chmod(0o600)
            ssh.copy(local, f"{remote}/{name}")
    return f"tls/{name}"


def _send_identity(ssh: Ssh, home: Path, device_id: str, say) -> str:
    from . import pki

    ident = pki.identity(home, device_id, device=True)
    if ident is not None and not (ident.sign_key.exists() and ident.coordinator_pub.exists()):
        raise FlashError(
            "pki",
            f"{device_id}'s certificate has no signing key (issued by an older version): "
            f"re-issue it with `edgeprune pki issue {device_id}`",
        )
    if ident is None:
        try:
            ident = pki.issue(home, device_id)
        except pki.PkiError as exc:
            raise FlashError("pki", f"{exc} (a mqtts:// broker needs the fleet CA: edgeprune pki init)") from None
        say(f"      issued a certificate for {device_id}")
    _send_private(
        ssh,
        {
            name: Path(src).read_bytes()
            for src, name in (
                (ident.ca, "ca.crt"),
                (ident.cert, "device.crt"),
                (ident.key, "device.key"),
                (ident.sign_key, "device.sign.key"),
                (ident.coordinator_pub, "coordinator.sign.pub"),
            )
        },
    )
    return "tls"  # install.sh runs in ~/REMOTE_DIR


_INSTALL_CODES = {10: "platform", 11: "no_python", 12: "old_python", 13: "disk", 14: "install", 15: "service"}


def _bundle_summary(manifest: dict) -> dict:
    return {
        k: manifest.get(k)
        for k in (
            "path",
            "bundle_id",
            "edgeprune",
            "build",
            "arch",
            "python",
            "extras",
            "versions",
            "bundle_bytes",
            "wheel_bytes",
            "reused",
        )
    } | {"wheels": len(manifest.get("wheels", []))}


def wait_online(session, device_id: str, timeout_s: float = ONLINE_TIMEOUT_S) -> dict | None:
    """The device's capabilities once its (new) agent is live on the broker, else None."""
    session.announce()  # agents re-announce when the coordinator says it is online

    def live(rows: list[dict]) -> bool:
        view = session.views.get(device_id)
        return bool(
            view
            and view.caps
            and view.last_heard is not None
            and any(r["device_id"] == device_id and is_live(r) for r in rows)
        )

    if not session.wait_for(live, timeout_s):
        return None
    return session.views[device_id].caps


def undo_after_timeout(ssh: Ssh, first_install: bool) -> str:
    """The agent is running but never came online: do not leave it like that."""
    cmd = "uninstall" if first_install else "rollback"
    lay = '"$HOME/.local/share/edgeprune"'
    script = f'P={lay}; [ "$(id -u)" = 0 ] && P=/opt/edgeprune; ' f'"$P/current/bin/python" -m edge_agent.service {cmd}'
    rc, out, err = ssh.run(script, timeout=300)
    ok = any((parse_result(line) or {}).get("ok") for line in out.splitlines())
    if rc != 0 or not ok:
        raise FlashError(
            "undo",
            f"could not {cmd} on {ssh.target} (exit {rc}): {err.strip()[-500:]}; "
            f"run `edgeprune unflash {ssh.target}` to remove it",
        )
    return "removed the new installation" if first_install else "rolled back to the previous version and config"


def unflash(ssh: Ssh, keep_state: bool = False) -> dict:
    script = (INSTALLER_DIR / "uninstall.sh").read_text()
    rc, out, err = ssh.run(script, ["--keep-state"] if keep_state else [], timeout=300)
    result: dict = {}
    for line in out.splitlines():
        result = parse_result(line) or result
    if rc != 0 or not result.get("ok", False):
        raise FlashError(
            "uninstall",
            f"removing the agent from {ssh.target} failed (exit {rc}): " f"{result.get('error') or err.strip()}",
        )
    return result
