"""The `edgeprune` command line as a test drives it: a real subprocess, `--json`, its own home."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def json_cli(home: Path, broker_url: str, fleet: str, cwd: Path | None = None):
    """``run(*args, timeout=900) -> (exit code, parsed JSON)``; stderr's tail when stdout is empty."""

    def run(*args: str, timeout: float = 900) -> tuple[int, dict]:
        proc = subprocess.run(
            [sys.executable, "-m", "coordinator.cli", *args, "--json", "--home", str(home)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
            env={**os.environ, "EDGEPRUNE_BROKER": broker_url, "EDGEPRUNE_FLEET": fleet},
        )
        try:
            out = json.loads(proc.stdout) if proc.stdout.strip() else {"stderr": proc.stderr[-3000:]}
        except json.JSONDecodeError:
            pytest.fail(f"not JSON: {proc.stdout}\n{proc.stderr}")
        return proc.returncode, out

    return run
