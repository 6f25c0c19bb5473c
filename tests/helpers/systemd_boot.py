"""Boot the emulated Raspberry Pi with systemd as PID 1: ``systemd-nspawn --boot`` on the arm64 rootfs.

The root filesystem is the one ``scripts/pi-emulator prepare --systemd`` builds (Debian 12 arm64
minbase + systemd, dbus, libpam-systemd, openssh-server, python3), cached in
/var/cache/edgeprune/pi-systemd. Every boot runs on an overlay (the cache is the read-only lower
layer, a per-test directory the upper one), so a test can reboot the machine and keep what it
installed, and leaves the cache untouched. arm64 code runs through qemu-user (binfmt_misc with the
F flag, so the interpreter need not be inside the rootfs).

What it takes on a host where systemd is *not* PID 1 (this project's VMs):
  * ``--register=no --keep-unit``: without them nspawn asks the host's systemd over D-Bus for a
    scope unit and stops with "Failed to open system bus: No such file or directory".
  * The host network is shared (no ``--private-network``: a veth needs the host side configured),
    so the rootfs's sshd is pinned to 127.0.0.1 and a port of our choosing.
  * Under qemu-user, units with ``LoadCredential=`` fail ("Failed to set up credentials: Invalid
    argument", 243/CREDENTIALS); the rootfs drops those credentials (see scripts/pi-emulator).
  * systemd --user (user@.service) logs "Failed to make us a subreaper, ignoring: Invalid argument"
    under qemu-user; harmless.
  * A reboot inside the container makes nspawn exit with 133; booting again is our job (what
    systemd-nspawn@.service's RestartForceExitStatus=133 does on a systemd host).
  * nspawn cannot remove /run/systemd/nspawn/propagate/<machine> when /run is not a tmpfs
    ("Attempted to remove disk file system ..."), leaves payload/ and supervisor/ cgroups behind
    (--keep-unit), and its lock in /run/systemd/nspawn/locks when killed: :meth:`Machine.close` (and
    :func:`reap_stale` for a run that was killed) removes them. Each machine gets its own cgroups.

Commands run inside with ``nsenter --all`` into the container's PID 1 (no machined on the host).
``python -m tests.helpers.systemd_boot probe`` boots once and prints (and caches) the result.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

BASE = Path(os.environ.get("EDGEPRUNE_PI_SYSTEMD_DIR", "/var/cache/edgeprune/pi-systemd"))
ROOTFS = BASE / "rootfs"
PROBE_CACHE = BASE / "boot-probe.json"
PREPARE = "sudo scripts/pi-emulator prepare --systemd"
REBOOT_EXIT = 133  # systemd-nspawn's exit status when the container asked for a reboot
BOOT_TIMEOUT_S = 240.0
ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
    "TERM": "dumb",
}


class BootError(RuntimeError):
    """systemd did not come up in the container; the message has the console's last lines."""


def _nspawn_version() -> str:
    try:
        out = subprocess.run(["systemd-nspawn", "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.splitlines()[0] if out else ""


def host_key() -> dict:
    """What a cached probe result depends on: the kernel, nspawn and the rootfs build."""
    complete = BASE / ".complete"
    return {
        "kernel": platform.release(),
        "nspawn": _nspawn_version(),
        "rootfs": complete.stat().st_mtime if complete.exists() else None,
    }


def cached_probe() -> dict | None:
    """The last boot probe on this machine, if it was made with this kernel, nspawn and rootfs."""
    try:
        cached = json.loads(PROBE_CACHE.read_text())
    except (OSError, ValueError):
        return None
    return cached if cached.get("key") == host_key() else None


def record_probe(ok: bool, detail: str) -> None:
    try:
        PROBE_CACHE.write_text(json.dumps({"key": host_key(), "ok": ok, "detail": detail, "at": time.time()}, indent=2))
    except OSError:
        pass


def why_not() -> str | None:
    """Why a systemd-booted Pi cannot run here (cheap: no boot), or None."""
    if os.geteuid() != 0:
        return "booting the emulated Pi under systemd-nspawn needs root"
    for tool, pkg in (("systemd-nspawn", "systemd-container"), ("nsenter", "util-linux")):
        if shutil.which(tool) is None:
            return f"no {tool} (apt-get install {pkg}; `{PREPARE}` installs it)"
    if not (BASE / ".complete").exists() or not (ROOTFS / "lib/systemd/systemd").exists():
        return f"no systemd arm64 root filesystem in {BASE}: run `{PREPARE}`"
    if not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
        return "binfmt_misc has no qemu-aarch64 entry (scripts/pi-emulator prepare registers it)"
    if "F" not in _binfmt_flags():
        return "the qemu-aarch64 binfmt entry lacks the F flag: the interpreter would have to be inside the rootfs"
    cached = cached_probe()
    if cached is not None and not cached["ok"]:
        return f"systemd does not boot in a container here (probe cached in {PROBE_CACHE}): {cached['detail']}"
    return None


def _binfmt_flags() -> str:
    try:
        for line in Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").read_text().splitlines():
            if line.startswith("flags:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _ns_pid_one(pid: int) -> bool:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                ids = line.split()[1:]
                return len(ids) > 1 and ids[-1] == "1"
    except OSError:
        pass
    return False


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def _own_cgroups(name: str) -> list[Path]:
    """A fresh cgroup per machine in each hierarchy nspawn uses (name=systemd and the unified one on a hybrid
    host, the unified one alone on a cgroup2 host), below the one we are in. With --keep-unit nspawn makes
    payload/ and supervisor/ inside its own cgroup: two machines in one cgroup would collide, and those
    directories outlive the container."""
    mine = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        num, controllers, path = line.split(":", 2)
        mine[controllers] = path
    roots = []
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():  # cgroup2 only
        roots.append((Path("/sys/fs/cgroup"), mine.get("", "/")))
    else:
        if Path("/sys/fs/cgroup/systemd/cgroup.procs").exists():
            roots.append((Path("/sys/fs/cgroup/systemd"), mine.get("name=systemd", "/")))
        if Path("/sys/fs/cgroup/unified/cgroup.procs").exists():
            roots.append((Path("/sys/fs/cgroup/unified"), mine.get("", "/")))
    return [root / path.lstrip("/") / f"edgeprune-{name}" for root, path in roots]


def _cgroup_pids(cg: Path) -> list[int]:
    pids = []
    for procs in cg.rglob("cgroup.procs") if cg.is_dir() else []:
        try:
            pids += [int(p) for p in procs.read_text().split()]
        except (OSError, ValueError):
            pass
    return pids


def _remove_cgroup(cg: Path) -> None:
    if not cg.is_dir():
        return
    for d in sorted((p for p in cg.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True) + [cg]:
        try:
            d.rmdir()
        except OSError:
            pass


def _mounted(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


class Machine:
    """One emulated Pi booted under systemd-nspawn, on an overlay kept in ``workdir`` across reboots."""

    def __init__(self, workdir: Path, name: str, ssh_port: int, authorized_keys: str):
        self.workdir = Path(workdir)
        self.name = name
        self.ssh_port = ssh_port
        self.authorized_keys = authorized_keys
        self.root = self.workdir / "merged"
        self.console = self.workdir / "console.log"
        self.proc: subprocess.Popen | None = None
        self.leader: int | None = None
        self.boots = 0
        self.cgroups = _own_cgroups(name)

    # -- life cycle ---------------------------------------------------------------------------
    def mount(self) -> None:
        for d in ("upper", "work", "merged"):
            (self.workdir / d).mkdir(parents=True, exist_ok=True)
        (self.workdir / "owner.pid").write_text(str(os.getpid()))  # for reap_stale()
        subprocess.run(
            [
                "mount",
                "-t",
                "overlay",
                "overlay",
                "-o",
                f"lowerdir={ROOTFS},upperdir={self.workdir / 'upper'},workdir={self.workdir / 'work'}",
                str(self.root),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        conf = self.root / "etc/ssh/sshd_config.d/10-edgeprune-emulator.conf"
        conf.write_text(
            f"# test: loopback only, port {self.ssh_port}\nListenAddress 127.0.0.1\nPort {self.ssh_port}\n"
            "PasswordAuthentication no\nPermitRootLogin prohibit-password\n"
        )
        for home, uid in (("root", 0), ("home/pi", 1000)):
            ssh = self.root / home / ".ssh"
            ssh.mkdir(mode=0o700, parents=True, exist_ok=True)
            (ssh / "authorized_keys").write_text(self.authorized_keys)
            (ssh / "authorized_keys").chmod(0o600)
            for p in (ssh, ssh / "authorized_keys"):
                os.chown(p, uid, uid)

    def boot(self, timeout_s: float = BOOT_TIMEOUT_S) -> str:
        """Start the container and wait until systemd has finished starting up; its state (running/degraded)."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.boots += 1
        log = open(self.console, "ab")
        log.write(f"\n===== boot {self.boots} =====\n".encode())
        log.flush()
        for cg in self.cgroups:
            cg.mkdir(exist_ok=True)
        join = "".join(f'echo $$ > "{cg}/cgroup.procs" && ' for cg in self.cgroups)
        self.proc = subprocess.Popen(
            [
                "sh",
                "-c",
                join + 'exec "$@"',
                "sh",
                "systemd-nspawn",
                "--quiet",
                "--directory",
                str(self.root),
                "--boot",
                "--register=no",
                "--keep-unit",
                f"--machine={self.name}",
                "--hostname=raspberrypi",
                "--console=read-only",
                "--resolv-conf=off",
                "--timezone=off",
                "--link-journal=no",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        self.leader = None
        while self.leader is None:
            if self.proc.poll() is not None:
                raise BootError(f"systemd-nspawn exited with {self.proc.returncode}:\n{self.console_tail()}")
            if time.monotonic() > deadline:
                raise BootError(f"no container PID 1 after {timeout_s:.0f} s:\n{self.console_tail()}")
            self.leader = next((c for c in _children(self.proc.pid) if _ns_pid_one(c)), None)
            time.sleep(0.1)
        state = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BootError(
                    f"the container stopped while booting (nspawn exit {self.proc.returncode}):\n"
                    f"{self.console_tail()}"
                )
            left = max(5.0, deadline - time.monotonic())
            r = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=left)
            state = r.stdout.strip()
            if state in ("running", "degraded"):
                return state
            time.sleep(0.5)  # its bus is not up yet
        raise BootError(
            f"systemd did not finish starting within {timeout_s:.0f} s (state {state!r}):\n" f"{self.console_tail()}"
        )

    def reboot(self, timeout_s: float = BOOT_TIMEOUT_S) -> str:
        """``systemctl reboot`` inside; nspawn exits 133; boot the same overlay again."""
        assert self.proc is not None
        self.run("systemctl", "reboot", check=False)
        try:
            rc = self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            raise BootError(f"the container did not shut down for the reboot:\n{self.console_tail()}") from None
        if rc != REBOOT_EXIT:
            raise BootError(f"systemd-nspawn exited with {rc}, not {REBOOT_EXIT} (reboot):\n{self.console_tail()}")
        self._after_exit()
        return self.boot(timeout_s)

    def close(self) -> None:
        """Power off (or kill) the container, unmount the overlay, remove what nspawn left in /run."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.run("systemctl", "poweroff", check=False, timeout=30)
                try:
                    self.proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    self.proc.send_signal(signal.SIGTERM)  # nspawn: halt the container
                    try:
                        self.proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        pass
            if self.proc is not None and self.proc.poll() is None:
                if self.leader and _ns_pid_one(self.leader):
                    os.kill(self.leader, signal.SIGKILL)  # PID 1 of the namespace: takes every process with it
                self.proc.kill()
                self.proc.wait(timeout=30)
        except (OSError, subprocess.SubprocessError):
            pass
        finally:
            for _ in range(50):  # anything still in our cgroups was started by this machine
                pids = [p for cg in self.cgroups for p in _cgroup_pids(cg)]
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                time.sleep(0.1)
            for cg in self.cgroups:
                _remove_cgroup(cg)
            self._after_exit()
            for _ in range(20):
                if not _mounted(self.root):
                    break
                if subprocess.run(["umount", str(self.root)], capture_output=True).returncode != 0:
                    time.sleep(0.5)
            if _mounted(self.root):
                subprocess.run(["umount", "-l", str(self.root)], capture_output=True)

    def _after_exit(self) -> None:
        shutil.rmtree(f"/run/systemd/nspawn/propagate/{self.name}", ignore_errors=True)
        try:  # nspawn's lock on the directory, left behind when nspawn is killed
            st = self.root.stat()
            Path(f"/run/systemd/nspawn/locks/inode-{st.st_dev}:{st.st_ino}").unlink(missing_ok=True)
        except OSError:
            pass
        self.leader = None

    # -- inside ----------------------------------------------------------------------------------
    def run(
        self, *cmd: str, check: bool = True, timeout: float = 120.0, input: str | None = None
    ) -> subprocess.CompletedProcess:
        """Run a command in the container (all its namespaces, root), as a service would see the system."""
        if self.leader is None:
            raise BootError("the container is not running")
        full = [
            "nsenter",
            "--target",
            str(self.leader),
            "--all",
            "--",
            "env",
            "-i",
            *[f"{k}={v}" for k, v in ENV.items()],
            *cmd,
        ]
        proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise BootError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
        return proc

    def show(self, unit: str, *props: str) -> dict[str, str]:
        props = props or (
            "ActiveState",
            "SubState",
            "MainPID",
            "NRestarts",
            "Result",
            "ExecMainStatus",
            "ExecMainCode",
            "UnitFileState",
            "LoadState",
        )
        out = self.run("systemctl", "show", unit, "--property=" + ",".join(props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str, lines: int = 40) -> str:
        return self.run("journalctl", "--no-pager", "-o", "cat", "-u", unit, "-n", str(lines), check=False).stdout

    def console_tail(self, lines: int = 40) -> str:
        try:
            text = self.console.read_text(errors="replace")
        except OSError:
            return ""
        import re

        text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text).replace("\r", "")
        return "\n".join(text.splitlines()[-lines:])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_stale() -> list[str]:
    """Machines whose owning process died without closing them (a killed test run): kill what runs in their
    cgroups and unmount their overlays. Machines of live processes (a concurrent run) are left alone."""
    done = []
    for cg in {c.parent for c in _own_cgroups("x")}:
        for d in cg.glob("edgeprune-edgeprune-*-*") if cg.is_dir() else []:
            owner = d.name.rsplit("-", 1)[1]
            if owner.isdigit() and not _alive(int(owner)):
                for pid in _cgroup_pids(d):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                time.sleep(0.5)
                _remove_cgroup(d)
                done.append(str(d))
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    for fields in mounts:
        target = Path(fields[4])
        if fields[fields.index("-") + 1] != "overlay" or f"lowerdir={ROOTFS}" not in fields[-1]:
            continue
        try:
            owner = int((target.parent / "owner.pid").read_text())
        except (OSError, ValueError):
            continue
        if not _alive(owner):
            try:
                st = target.stat()
                Path(f"/run/systemd/nspawn/locks/inode-{st.st_dev}:{st.st_ino}").unlink(missing_ok=True)
            except OSError:
                pass
            subprocess.run(["umount", "-l", str(target)], capture_output=True)
            shutil.rmtree(f"/run/systemd/nspawn/propagate/edgeprune-pi-{owner}", ignore_errors=True)
            done.append(str(target))
    return done


def probe(workdir: Path) -> tuple[bool, str]:
    """Boot once, record and return (booted, detail)."""
    reason = why_not()
    if reason:
        return False, reason
    workdir.mkdir(parents=True, exist_ok=True)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    m = Machine(workdir, f"edgeprune-probe-{os.getpid()}", port, "")
    try:
        m.mount()
        t0 = time.monotonic()
        state = m.boot()
        arch = m.run("uname", "-m").stdout.strip()
        failed = m.run("systemctl", "--failed", "--plain", "--no-legend", check=False).stdout.strip()
        detail = f"systemd booted as PID 1 ({arch}) in {time.monotonic() - t0:.0f} s, state {state}" + (
            f"; failed units: {failed}" if failed else ""
        )
        record_probe(True, detail)
        return True, detail
    except (BootError, subprocess.SubprocessError, OSError) as exc:
        detail = str(exc).strip()
        record_probe(False, detail)
        return False, detail
    finally:
        m.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:] != ["probe"]:
        sys.exit("usage: python -m tests.helpers.systemd_boot probe")
    import tempfile

    ok, detail = probe(Path(tempfile.mkdtemp(prefix="edgeprune-sd-probe-")) / "m")
    print(("booted: " if ok else "did not boot: ") + detail)
    sys.exit(0 if ok else 1)
