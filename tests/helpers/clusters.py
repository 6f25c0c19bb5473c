"""Real clustered brokers for tests, through the same ./scripts/cluster a person uses.

Going through the command (not importing its modules) tests the tool itself and
keeps the brokers in their own sessions, so a crashed test leaves nothing that
the context manager's stop does not find in DIR/state.json.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "scripts" / "cluster"
CLI = ROOT / "scripts" / "clusters" / "cli.py"


def cluster_command(*args: str, timeout_s: float = 120) -> dict:
    """Run ``scripts/cluster ARGS --json`` and return its JSON; a cluster error raises RuntimeError."""
    proc = subprocess.run(
        [str(CLUSTER), *args, "--json"],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )
    try:
        out = json.loads(proc.stdout)
    except ValueError:
        raise RuntimeError(
            f"scripts/cluster {' '.join(args)} exited {proc.returncode}: "
            f"{proc.stdout.strip()} {proc.stderr.strip()}"
        ) from None
    if "error" in out:
        raise RuntimeError(f"scripts/cluster {' '.join(args)}: {out['error']['code']}: {out['error']['message']}")
    return out


def cluster_unavailable(kind: str) -> str | None:
    """A skip reason when this machine lacks what a kind needs (./scripts/test installs it), else None.
    Asks the tool itself (`check`), which installs nothing."""
    proc = subprocess.run(
        [sys.executable, str(CLI), "check", "--kind", kind, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    try:
        out = json.loads(proc.stdout)
    except ValueError:
        return f"scripts/cluster check --kind {kind} failed: {proc.stderr.strip()}"
    return out["error"]["message"] if "error" in out else None


@dataclass
class Cluster:
    kind: str
    dir: Path
    state: dict = field(repr=False)

    @property
    def nodes(self) -> list[dict]:
        return self.state["nodes"]

    @property
    def urls(self) -> list[str]:
        return [n["url"] for n in self.nodes]

    @property
    def username(self) -> str | None:
        return self.state.get("username")

    @property
    def password(self) -> str | None:
        return self.state.get("password")

    def url(self, name: str) -> str:
        return self.node(name)["url"]

    def node(self, name: str) -> dict:
        return next(n for n in self.nodes if n["name"] == name)

    def _run(self, *args: str) -> dict:
        self.state = cluster_command(*args, "--dir", str(self.dir))
        return self.state

    def status(self) -> dict:
        return self._run("status")

    def kill(self, name: str) -> dict:
        """SIGKILL one node; returns the new status."""
        return self._run("kill", name)

    def restart(self, name: str) -> dict:
        """Start a killed node again on its port; returns once it accepts MQTT."""
        return self._run("restart", name)

    def stop(self) -> dict:
        return cluster_command("stop", "--dir", str(self.dir))

    def log(self, name: str) -> str:
        path = self.dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


@contextlib.contextmanager
def running_cluster(kind: str, nodes: int, dir: Path):
    """A started cluster (every node accepting MQTT), always stopped at exit, even after a failed start."""
    dir = Path(dir)
    try:
        state = cluster_command("start", "--kind", kind, "--nodes", str(nodes), "--dir", str(dir))
        yield Cluster(kind, dir, state)
    finally:
        cluster_command("stop", "--dir", str(dir))
