"""Run the agent as a service on a device: install, upgrade, roll back, remove.

Called by the bundle's ``install.sh`` (``python -m edge_agent.service install``)
and by ``edgeprune unflash``. Standard library only: it runs from a fresh venv. Where
things live and what keeps the agent running (systemd, or the supervisor) is
:mod:`.servicemgr`.

Layout (root / normal user):
  venvs     /opt/edgeprune/venvs/<bundle id>   ~/.local/share/edgeprune/venvs/<bundle id>
  current   /opt/edgeprune/current -> venvs/<id>  (switched atomically; the unit runs current/bin/python)
  config    /etc/edgeprune/agent.toml          ~/.config/edgeprune/agent.toml   (mode 0600)
  state     /var/lib/edgeprune/agent           ~/.local/state/edgeprune/agent   (kept across upgrades)
  service   systemd system unit                systemd user unit + lingering
            where systemd does not run: a supervisor process (restarts the agent on failure),
            started at boot from cron @reboot when cron exists.
An upgrade installs the new venv beside the old one, switches ``current`` and
restarts; if the new agent does not stay up, ``current`` goes back to the old
venv and the old config. A first install that fails removes what it created.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from .servicemgr import (
    UNIT_NAME,
    InstallError,
    Layout,
    Supervisor,
    Systemd,
    layout,
    manager,
    supervise,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

INSTALLER_DIR = Path(__file__).with_name("installer")  # install.sh / uninstall.sh, copied into bundles
RESULT_PREFIX = "EDGEPRUNE_RESULT "
STAY_UP_S = 4.0  # a new agent must survive this long after start (settings errors exit at once)


# -- config --------------------------------------------------------------------------------------


def toml_dumps(table: dict) -> str:
    """Scalars only (all agent settings are): no TOML writer in the standard library."""
    lines = ["# edgeprune agent settings, written by `edgeprune flash` (edgeprune-agent settings lists all)"]
    for key, value in table.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        elif isinstance(value, str):
            text = json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
        else:
            raise InstallError(f"setting {key}: cannot write {type(value).__name__} to TOML")
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


def read_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, "rb") as f:
        table = tomllib.load(f)
    return dict(table.get("agent", table))


def merged_config(existing: dict, updates: dict) -> dict:
    """Re-flashing keeps the device's identity: a different device id is refused, not silently applied."""
    old_id, new_id = existing.get("device_id"), updates.get("device_id")
    if old_id and new_id and old_id != new_id:
        raise InstallError(
            f"this device is already flashed as {old_id!r}; flash it with --device-id {old_id}, "
            f"or `edgeprune unflash` it first to give it a new identity"
        )
    return {**existing, **{k: v for k, v in updates.items() if v is not None}}


def check_config(table: dict) -> None:
    """Validate with the agent's own settings loader, exactly as the agent will read it."""
    from . import settings

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "agent.toml"
        path.write_text(toml_dumps(table))
        try:
            settings.load({}, str(path), environ={})
        except settings.SettingsError as exc:
            raise InstallError(f"bad agent setting: {str(exc).replace(str(path), 'config')}") from None


def write_private(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically with a file that is mode 0600 from the start (keys, credentials)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_config(path: Path, table: dict) -> None:
    """Check, then replace atomically; mode 0600 (it may hold credentials)."""
    check_config(table)
    write_private(path, toml_dumps(table).encode("utf-8"))


# -- install / uninstall -------------------------------------------------------------------------


def _read_record(lay: Layout) -> dict:
    try:
        return json.loads(lay.record.read_text())
    except (OSError, ValueError):
        return {}


def _switch(lay: Layout, venv: Path) -> None:
    tmp = lay.prefix / ".current.new"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(venv.relative_to(lay.prefix))
    os.replace(tmp, lay.current)  # atomic: the unit always finds a whole venv


def _stays_up(mgr, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not mgr.running():
            return False
        time.sleep(0.25)
    return mgr.running()


def _log_tail(lay: Layout, mgr) -> str:
    if isinstance(mgr, Systemd):
        cmd = ["journalctl"] + ([] if lay.root else ["--user"]) + ["-u", UNIT_NAME, "-n", "20", "--no-pager"]
        return subprocess.run(cmd, capture_output=True, text=True).stdout[-3000:]
    try:
        return lay.log.read_text()[-3000:]
    except OSError:
        return ""


SECURITY_FILES = (
    ("tls_ca", "ca.crt"),
    ("tls_cert", "device.crt"),
    ("tls_key", "device.key"),
    ("sign_key", "device.sign.key"),
    ("coordinator_key", "coordinator.sign.pub"),
)
PASSWORD_FILE = ("password_file", "mqtt.password")  # MQTT password authentication, kept with the keys
PRIVATE_FILES = (*SECURITY_FILES, PASSWORD_FILE)


def _tls_dir(lay: Layout) -> Path:
    return lay.config.parent / "tls"


def _snapshot(lay: Layout) -> dict[str, bytes]:
    """The config and security files as they are now: what an undo or a rollback puts back."""
    files = {"agent.toml": lay.config.read_bytes()} if lay.config.is_file() else {}
    for _, name in PRIVATE_FILES:
        path = _tls_dir(lay) / name
        if path.is_file():
            files[f"tls/{name}"] = path.read_bytes()
    return files


def _restore(lay: Layout, files: dict[str, bytes]) -> None:
    for rel in ["agent.toml"] + [f"tls/{name}" for _, name in PRIVATE_FILES]:
        path = lay.config.parent / rel
        if rel in files:
            write_private(path, files[rel])
        else:
            path.unlink(missing_ok=True)
    try:
        _tls_dir(lay).rmdir()  # only if empty
    except OSError:
        pass


def install_tls(lay: Layout, tls_dir: Path) -> None:
    """Copy the device's certificate and keys, the fleet CA and the coordinator's public signing key next to
    the config (files 0600, directory 0700)."""
    dest = _tls_dir(lay)
    dest.mkdir(parents=True, exist_ok=True)
    os.chmod(dest, 0o700)
    for _, name in SECURITY_FILES:
        write_private(dest / name, (tls_dir / name).read_bytes())


def install(
    venv: Path,
    bundle_id: str,
    updates: dict,
    lay: Layout | None = None,
    tls_dir: Path | None = None,
    password_file: Path | None = None,
) -> dict:
    """Point ``current`` at ``venv``, write the config (and keys), (re)start the service; undo on failure.

    Everything is checked before anything is touched; what was there before is kept in
    ``<prefix>/rollback`` so a re-flash that fails later (device never online) can be undone too."""
    lay = lay or layout()
    venv = venv.resolve()
    record = _read_record(lay)
    table = merged_config(read_config(lay.config), updates)
    table.setdefault("state_dir", str(lay.state / "agent"))
    staged = dict(table)
    if tls_dir is not None:
        missing = [name for _, name in SECURITY_FILES if not (tls_dir / name).is_file()]
        if missing:
            raise InstallError(f"security files missing from {tls_dir}: {', '.join(missing)}")
        table.update({setting: str(_tls_dir(lay) / name) for setting, name in SECURITY_FILES})
        staged.update({setting: str(tls_dir / name) for setting, name in SECURITY_FILES})
    if password_file is not None:  # copied next to the keys, 0600; the config names the copy
        table[PASSWORD_FILE[0]] = str(_tls_dir(lay) / PASSWORD_FILE[1])
        staged[PASSWORD_FILE[0]] = str(password_file)
    check_config(staged)  # refuse before stopping or overwriting anything
    first = not lay.current.exists()
    previous = lay.current.resolve() if not first else None  # the venv running now (may be this one)
    before = _snapshot(lay)

    mgr = manager(lay)
    notes: list[str] = []
    mgr.stop()
    try:
        if tls_dir is not None:
            install_tls(lay, tls_dir)
        if password_file is not None:
            _tls_dir(lay).mkdir(parents=True, exist_ok=True)
            os.chmod(_tls_dir(lay), 0o700)
            write_private(_tls_dir(lay) / PASSWORD_FILE[1], password_file.read_bytes())
        write_config(lay.config, table)
        Path(table["state_dir"]).mkdir(parents=True, exist_ok=True)
        _switch(lay, venv)
        notes += mgr.install()
        mgr.start()
        if not _stays_up(mgr, STAY_UP_S):
            raise InstallError(f"the agent did not stay up after starting:\n{_log_tail(lay, mgr)}")
    except BaseException:
        _undo(lay, mgr, first, previous, before)
        raise
    rb = lay.prefix / "rollback"
    shutil.rmtree(rb, ignore_errors=True)
    for rel, data in before.items():
        write_private(rb / rel, data)
    kept = {venv.name} | ({previous.name} if previous else set())
    for old in (lay.prefix / "venvs").iterdir():
        if old.name not in kept:
            shutil.rmtree(old, ignore_errors=True)
    result = {
        "device_id": table.get("device_id"),
        "bundle_id": bundle_id,
        "venv": str(venv),
        "previous_bundle_id": record.get("bundle_id") if not first and record.get("bundle_id") != bundle_id else None,
        "upgraded": not first and record.get("bundle_id") != bundle_id,
        "first_install": first,
        "config": str(lay.config),
        "state_dir": table["state_dir"],
        "service": mgr.name,
        "service_detail": mgr.describe(),
        "notes": notes,
        "root": lay.root,
        "installed_at": time.time(),
    }
    lay.record.write_text(
        json.dumps(
            {**result, "previous": str(previous) if previous else None, "previous_bundle": record.get("bundle_id")},
            indent=2,
        )
    )
    return result


def _undo(lay: Layout, mgr, first: bool, previous: Path | None, before: dict[str, bytes]) -> None:
    mgr.stop()
    _restore(lay, before)
    if first:
        mgr.remove()
        lay.current.unlink(missing_ok=True)
        return
    if previous is not None and previous.exists():
        _switch(lay, previous)
        try:
            mgr.start()
        except InstallError:
            pass


def rollback(lay: Layout | None = None) -> dict:
    """Undo the last install: the venv, config and keys from before it (a re-flash that never came online)."""
    lay = lay or layout()
    record = _read_record(lay)
    prev = record.get("previous")
    if not prev or not Path(prev).exists():
        raise InstallError("nothing to roll back to: no previous installation is kept")
    mgr = manager(lay)
    mgr.stop()
    rb = lay.prefix / "rollback"
    if rb.is_dir():
        _restore(lay, {str(p.relative_to(rb)): p.read_bytes() for p in rb.rglob("*") if p.is_file()})
    _switch(lay, Path(prev))
    mgr.start()
    lay.record.write_text(
        json.dumps(
            {**record, "bundle_id": record.get("previous_bundle"), "previous": None, "rolled_back_at": time.time()},
            indent=2,
        )
    )
    return {"rolled_back_to": prev, "service": mgr.name}


def uninstall(lay: Layout | None = None, keep_state: bool = False) -> dict:
    lay = lay or layout()
    mgr = manager(lay)
    removed = []
    if lay.unit.exists() or isinstance(mgr, Systemd):
        mgr.remove()
    Supervisor(lay).remove()  # also covers an install made while systemd was absent
    if lay.unit.exists():
        lay.unit.unlink()
    paths = [lay.prefix, lay.config, lay.config.parent / "tls"] + ([] if keep_state else [lay.state])
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(str(p))
        elif p.exists() or p.is_symlink():
            p.unlink()
            removed.append(str(p))
    try:
        lay.config.parent.rmdir()
    except OSError:
        pass
    return {"removed": removed, "kept_state": str(lay.state) if keep_state else None}


def status(lay: Layout | None = None) -> dict:
    lay = lay or layout()
    mgr = manager(lay)
    return {
        "installed": lay.current.exists(),
        "running": mgr.running(),
        "service": mgr.name,
        "record": _read_record(lay),
        "layout": {k: str(v) for k, v in asdict(lay).items()},
    }


# -- command line (device side) ------------------------------------------------------------------


def emit_result(obj: dict) -> None:
    """The installer's answer to the laptop: one line, read back by :func:`parse_result`."""
    print(RESULT_PREFIX + json.dumps(obj), flush=True)


def parse_result(line: str) -> dict | None:
    """The object of an :func:`emit_result` line (also what uninstall.sh echoes); None for any other line."""
    if not line.startswith(RESULT_PREFIX):
        return None
    try:
        obj = json.loads(line[len(RESULT_PREFIX) :])
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m edge_agent.service",
        description="Install, start, stop or remove the edgeprune agent service on this device.",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("install", help="switch to a venv, write the config, (re)start the service")
    i.add_argument("--venv", required=True)
    i.add_argument("--bundle-id", required=True)
    i.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="agent setting for the config")
    i.add_argument("--tls-dir", help="directory with ca.crt, device.crt, device.key to install for mqtts://")
    i.add_argument(
        "--password-file",
        help="file with the MQTT password (mode 0600) to install for username/password " "authentication",
    )
    u = sub.add_parser("uninstall", help="stop and remove the service, the venvs, the config and the state")
    u.add_argument("--keep-state", action="store_true")
    for name in ("start", "stop", "status", "rollback", "supervise"):
        sub.add_parser(name)
    for sp in sub.choices.values():
        sp.add_argument(
            "--layout",
            choices=["root", "user"],
            help="root (/opt, /etc, system unit) or user (~/.local, user unit); default: by who runs it",
        )
    args = p.parse_args(argv)
    from . import settings

    lay = layout(None if args.layout is None else args.layout == "root")
    try:
        if args.cmd == "install":
            updates = {}
            for item in args.set:
                key, sep, value = item.partition("=")
                if not sep:
                    raise InstallError(f"--set {item!r}: expected KEY=VALUE")
                if key not in settings.BY_NAME:
                    raise InstallError(f"--set {key}: unknown agent setting (edgeprune-agent settings lists them)")
                try:
                    updates[key] = settings.convert(settings.BY_NAME[key], value, f"--set {key}")
                except settings.SettingsError as exc:
                    raise InstallError(str(exc)) from None
            emit_result(
                {
                    "ok": True,
                    **install(
                        Path(args.venv),
                        args.bundle_id,
                        updates,
                        lay,
                        Path(args.tls_dir) if args.tls_dir else None,
                        Path(args.password_file) if args.password_file else None,
                    ),
                }
            )
        elif args.cmd == "uninstall":
            emit_result({"ok": True, **uninstall(lay, args.keep_state)})
        elif args.cmd == "start":
            manager(lay).start()
        elif args.cmd == "stop":
            manager(lay).stop()
        elif args.cmd == "status":
            emit_result({"ok": True, **status(lay)})
        elif args.cmd == "rollback":
            emit_result({"ok": True, **rollback(lay)})
        elif args.cmd == "supervise":
            return supervise(lay)
    except (InstallError, OSError) as exc:
        emit_result({"ok": False, "error": str(exc)})
        print(f"edgeprune: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
