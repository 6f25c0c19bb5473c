"""Where the agent lives on a device, and what keeps it running: systemd, or edgeprune's own supervisor.

:func:`manager` picks a systemd unit (system, or user with lingering) where systemd runs, and
otherwise a supervisor process (:func:`supervise`, restarting the agent with growing delays,
started at boot from cron ``@reboot``). :mod:`.service` installs, upgrades and removes the
agent through them. Standard library only: it runs from a fresh venv.

Processes: the supervisor (``python -m edge_agent.service supervise``) is one process with
one thread; the agent is its child. Nothing here starts a thread.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .protocol.errors import EdgepruneError

UNIT_NAME = "edgeprune-agent.service"
CRON_MARK = "# edgeprune-agent"
STOP_TIMEOUT_S = 15.0  # graceful stop before SIGKILL
RESTART_DELAY_S = (1.0, 30.0)  # fallback supervisor: first and longest delay between restarts


class InstallError(EdgepruneError, RuntimeError):
    """Installing or removing failed; the message says what and what to do."""

    code = "install"


@dataclass(frozen=True)
class Layout:
    root: bool
    prefix: Path
    config: Path
    state: Path
    unit: Path

    @property
    def current(self) -> Path:
        return self.prefix / "current"

    @property
    def record(self) -> Path:
        return self.prefix / "install.json"

    @property
    def log(self) -> Path:
        return self.state / "agent.log"

    @property
    def pidfile(self) -> Path:
        return self.state / "supervisor.pid"


def layout(root: bool | None = None, home: Path | None = None) -> Layout:
    root = os.geteuid() == 0 if root is None else root
    if root:
        return Layout(
            True,
            Path("/opt/edgeprune"),
            Path("/etc/edgeprune/agent.toml"),
            Path("/var/lib/edgeprune"),
            Path("/etc/systemd/system") / UNIT_NAME,
        )
    home = home or Path.home()
    return Layout(
        False,
        home / ".local/share/edgeprune",
        home / ".config/edgeprune/agent.toml",
        home / ".local/state/edgeprune",
        home / ".config/systemd/user" / UNIT_NAME,
    )


# -- service managers ----------------------------------------------------------------------------


def has_systemd() -> bool:
    return os.path.isdir("/run/systemd/system") and shutil.which("systemctl") is not None


def unit_text(lay: Layout) -> str:
    return "\n".join(
        [
            "[Unit]",
            "Description=edgeprune device agent (federated pruning-aware training, on-device benchmarks)",
            "After=network-online.target",
            "Wants=network-online.target",
            "StartLimitIntervalSec=0",
            "",
            "[Service]",
            "Type=simple",
            f"ExecStart={lay.current}/bin/python -m edge_agent.cli run --config {lay.config}",
            "Restart=on-failure",
            "RestartSec=5",
            "RestartPreventExitStatus=2",  # bad settings or keys: restarting cannot help
            "Environment=PYTHONUNBUFFERED=1",
            "",
            "[Install]",
            f"WantedBy={'multi-user.target' if lay.root else 'default.target'}",
            "",
        ]
    )


def _systemctl(lay: Layout, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["systemctl"] + ([] if lay.root else ["--user"]) + list(args)
    env = dict(os.environ)
    if not lay.root:
        env.setdefault("XDG_RUNTIME_DIR", f"/run/user/{os.getuid()}")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise InstallError(f"{' '.join(cmd)} failed: {(proc.stderr or proc.stdout).strip()}")
    return proc


class Systemd:
    name = "systemd"

    def __init__(self, lay: Layout):
        self.lay = lay

    def install(self) -> list[str]:
        notes = []
        self.lay.unit.parent.mkdir(parents=True, exist_ok=True)
        self.lay.unit.write_text(unit_text(self.lay))
        if not self.lay.root:
            # without lingering the user manager, and the agent with it, stops when the user logs out and
            # never starts at boot: a flash that "succeeded" would leave a device that goes offline
            user = os.environ.get("USER") or pwd.getpwuid(os.getuid()).pw_name
            flag = Path("/var/lib/systemd/linger") / user
            if not flag.exists():
                linger = subprocess.run(["loginctl", "enable-linger", user], capture_output=True, text=True)
                if not flag.exists():
                    raise InstallError(
                        f"cannot enable lingering for {user} ({linger.stderr.strip() or 'refused'}): without it "
                        f"the agent's user unit stops when {user} logs out and never starts at boot; run "
                        f"`sudo loginctl enable-linger {user}` once on the device (or flash as root), then flash again"
                    )
        _systemctl(self.lay, "daemon-reload")
        _systemctl(self.lay, "enable", UNIT_NAME)
        return notes

    def start(self) -> None:
        _systemctl(self.lay, "restart", UNIT_NAME)

    def stop(self) -> None:
        _systemctl(self.lay, "stop", UNIT_NAME, check=False)

    def running(self) -> bool:
        return _systemctl(self.lay, "is-active", "--quiet", UNIT_NAME, check=False).returncode == 0

    def remove(self) -> None:
        self.stop()
        _systemctl(self.lay, "disable", UNIT_NAME, check=False)
        self.lay.unit.unlink(missing_ok=True)
        _systemctl(self.lay, "daemon-reload", check=False)

    def describe(self) -> str:
        scope = "system" if self.lay.root else "user"
        return (
            f"systemd {scope} unit {self.lay.unit} (restart on failure); logs: "
            f"journalctl {'' if self.lay.root else '--user '}-u {UNIT_NAME}"
        )


class Supervisor:
    """No systemd (containers, chroots, minimal images): a small supervisor process restarts the agent."""

    name = "supervisor"

    def __init__(self, lay: Layout):
        self.lay = lay

    def _pid(self) -> int | None:
        try:
            pid = int(self.lay.pidfile.read_text().strip())
            # after a power cut the pid may belong to something else now: never signal that
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"edge_agent.service" not in f.read():
                    return None
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    def _cmd(self, action: str) -> list[str]:
        return [
            str(self.lay.current / "bin" / "python"),
            "-m",
            "edge_agent.service",
            action,
            "--layout",
            "root" if self.lay.root else "user",
        ]

    def install(self) -> list[str]:
        if shutil.which("crontab") is None:
            return [
                f"no systemd and no cron here: the agent will not start at boot; add "
                f"`{' '.join(self._cmd('start'))}` to the boot scripts"
            ]
        line = f"@reboot {' '.join(self._cmd('start'))} {CRON_MARK}"
        current = subprocess.run(["crontab", "-l"], capture_output=True, text=True).stdout
        kept = [ln for ln in current.splitlines() if CRON_MARK not in ln]
        subprocess.run(["crontab", "-"], input="\n".join(kept + [line]) + "\n", text=True, check=False)
        return []

    def start(self) -> None:
        self.stop()
        self.lay.state.mkdir(parents=True, exist_ok=True)
        with open(self.lay.log, "ab") as log:
            proc = subprocess.Popen(
                self._cmd("supervise"),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.lay.state,
                start_new_session=True,
                close_fds=True,
            )  # cwd: the installer's directory is deleted
        deadline = time.monotonic() + 30  # Python start-up on a slow or emulated device
        while self._pid() is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)

    def stop(self) -> None:
        pid = self._pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S + 5
        while time.monotonic() < deadline:
            if not _alive(pid):
                break
            time.sleep(0.1)
        else:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
        self.lay.pidfile.unlink(missing_ok=True)

    def running(self) -> bool:
        return self._pid() is not None

    def remove(self) -> None:
        self.stop()
        if shutil.which("crontab"):
            current = subprocess.run(["crontab", "-l"], capture_output=True, text=True).stdout
            if CRON_MARK in current:
                kept = [ln for ln in current.splitlines() if CRON_MARK not in ln]
                subprocess.run(["crontab", "-"], input="\n".join(kept) + "\n", text=True, check=False)

    def describe(self) -> str:
        return (
            f"no systemd: supervisor process (pid file {self.lay.pidfile}, restarts the agent on failure); "
            f"logs: {self.lay.log}"
        )


def _alive(pid: int) -> bool:
    """Running, not a zombie (a supervisor we started ourselves is our child until reaped)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def manager(lay: Layout):
    if has_systemd() and (lay.root or _systemctl(lay, "show-environment", check=False).returncode == 0):
        return Systemd(lay)
    return Supervisor(lay)


def supervise(lay: Layout) -> int:
    """Run the agent; restart it with growing delays when it fails; stop it on SIGTERM."""
    lay.pidfile.write_text(str(os.getpid()))
    child: subprocess.Popen | None = None
    stopping = False

    def _stop(signum, frame):
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.terminate()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    delay = RESTART_DELAY_S[0]
    try:
        while not stopping:
            started = time.monotonic()
            child = subprocess.Popen([sys.executable, "-m", "edge_agent.cli", "run", "--config", str(lay.config)])
            while True:
                try:
                    rc = child.wait(timeout=STOP_TIMEOUT_S if stopping else None)
                    break
                except subprocess.TimeoutExpired:
                    child.kill()
            if stopping or rc == 0:
                return 0
            if rc == 2:  # bad settings or keys (the agent said why above): restarting cannot help
                print(
                    "edgeprune supervisor: the agent cannot start with this configuration; not restarting", flush=True
                )
                return 2
            delay = RESTART_DELAY_S[0] if time.monotonic() - started > 60 else min(delay * 2, RESTART_DELAY_S[1])
            print(f"edgeprune supervisor: agent exited with {rc}; restarting in {delay:.0f} s", flush=True)
            end = time.monotonic() + delay
            while not stopping and time.monotonic() < end:
                time.sleep(0.2)
        return 0
    finally:
        if lay.pidfile.read_text().strip() == str(os.getpid()):
            lay.pidfile.unlink(missing_ok=True)
