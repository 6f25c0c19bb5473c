"""SSH to a device with the system OpenSSH client: the user's ``~/.ssh/config``, keys and agent apply.

``BatchMode=yes``: a password prompt would hang a script, so key authentication is required
and its absence is reported as such (:func:`ssh_error` turns OpenSSH's stderr into a
:class:`FlashError` that names the fix).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edge_agent.protocol.errors import EdgepruneError


class FlashError(EdgepruneError, RuntimeError):
    """A flash step failed. ``code`` is stable for --json; the message names the problem and the fix."""

    def __init__(self, code: str, message: str):
        super().__init__(message, code)


@dataclass(frozen=True)
class Target:
    user: str | None
    host: str
    port: int | None

    @classmethod
    def parse(cls, text: str) -> "Target":
        m = re.fullmatch(r"(?:ssh://)?(?:([^@/:\s]+)@)?(\[[0-9a-fA-F:]+\]|[^@/:\s]+)(?::(\d{1,5}))?/?", text.strip())
        if not m:
            raise FlashError("usage", f"target {text!r}: expected [ssh://]USER@HOST[:PORT]")
        return cls(m.group(1), m.group(2).strip("[]"), int(m.group(3)) if m.group(3) else None)

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    def __str__(self) -> str:
        return self.destination + (f":{self.port}" if self.port else "")


class Ssh:
    def __init__(
        self,
        target: Target,
        identity: str | None = None,
        options: list[str] | None = None,
        connect_timeout: float = 10.0,
    ):
        self.target = target
        opts = [
            "-o",
            "BatchMode=yes",
            "-o",
            f"ConnectTimeout={int(connect_timeout)}",
            "-o",
            "StrictHostKeyChecking=accept-new",
            "-o",
            "ServerAliveInterval=15",
        ]
        if identity:
            if not Path(identity).expanduser().is_file():
                raise FlashError("usage", f"--identity {identity}: no such key file")
            opts += ["-i", str(Path(identity).expanduser()), "-o", "IdentitiesOnly=yes"]
        for o in options or []:
            opts += ["-o", o]
        self.opts = opts

    def _ssh(self) -> list[str]:
        return (
            ["ssh", *self.opts]
            + (["-p", str(self.target.port)] if self.target.port else [])
            + [self.target.destination]
        )

    def run(
        self, script: str, args: list[str] = (), timeout: float = 120.0, on_line: Callable[[str], None] | None = None
    ) -> tuple[int, str, str]:
        """Run a POSIX sh script on the device (sent on stdin); stream stdout lines to ``on_line``."""
        remote = "sh -s -- " + " ".join(shlex.quote(a) for a in args)
        proc = subprocess.Popen(
            [*self._ssh(), remote], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert proc.stdin and proc.stdout and proc.stderr
        out_lines: list[str] = []
        err_parts: list[str] = []

        def pump_out() -> None:  # streamed for progress; a reader per pipe so neither can fill and block ssh
            for line in proc.stdout:
                out_lines.append(line)
                if on_line:
                    on_line(line.rstrip("\n"))

        readers = [
            threading.Thread(target=pump_out, daemon=True),
            threading.Thread(target=lambda: err_parts.append(proc.stderr.read()), daemon=True),
        ]
        for r in readers:
            r.start()
        try:
            proc.stdin.write(script)
            proc.stdin.close()
        except BrokenPipeError:
            pass
        try:
            proc.wait(timeout=timeout)  # also fires when the remote side hangs silently
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise FlashError("timeout", f"{self.target}: the remote step took longer than {timeout:.0f} s") from None
        finally:
            for r in readers:
                r.join(5)
        err = "".join(err_parts)
        if proc.returncode == 255:
            raise ssh_error(self.target, err)
        return proc.returncode, "".join(out_lines), err

    def copy(self, local: Path, remote: str, timeout: float = 600.0) -> None:
        cmd = (
            ["scp", "-q", *self.opts]
            + (["-P", str(self.target.port)] if self.target.port else [])
            + [str(local), f"{self.target.destination}:{remote}"]
        )
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            err = proc.stderr
            if any(s in err for s in _UNREACHABLE + _AUTH):
                raise ssh_error(self.target, err)
            if "No space left" in err:
                raise FlashError(
                    "disk",
                    f"{self.target}: no space left on the device while copying the bundle; "
                    f"free some space and flash again",
                )
            raise FlashError("copy", f"scp to {self.target} failed: {err.strip()}")


_UNREACHABLE = (
    "Connection refused",
    "Connection timed out",
    "No route to host",
    "Could not resolve hostname",
    "Network is unreachable",
    "Connection closed by",
    "Connection reset",
    "timed out during banner",
)
_AUTH = ("Permission denied", "Too many authentication failures")


def ssh_error(target: Target, stderr: str) -> FlashError:
    err = stderr.strip().splitlines()[-1] if stderr.strip() else "ssh failed"
    if any(s in stderr for s in _AUTH):
        return FlashError(
            "auth",
            f"SSH authentication to {target} failed ({err}). flash logs in with a key, never "
            f"a password: pass --identity KEYFILE, or install your key with "
            f"`ssh-copy-id {target.destination}`, and check the user name",
        )
    if "Host key verification failed" in stderr or "HOST IDENTIFICATION HAS CHANGED" in stderr:
        return FlashError(
            "host_key",
            f"{target}'s SSH host key changed or is unknown ({err}). If the device was "
            f"re-imaged: ssh-keygen -R {target.host}",
        )
    if any(s in stderr for s in _UNREACHABLE):
        return FlashError(
            "unreachable",
            f"cannot reach {target} over SSH ({err}). Is the device powered, on this "
            f"network, and running an SSH server? (Raspberry Pi OS: enable SSH in "
            f"Raspberry Pi Imager or `sudo raspi-config`)",
        )
    return FlashError("ssh", f"ssh to {target} failed: {err}")
