"""A real :class:`~edge_agent.daemon.Agent` in the test's own process (for tests that reach inside it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import edge_agent.commands  # noqa: F401  (registers the commands)
from edge_agent import settings as agent_settings
from edge_agent.daemon import Agent

TEST_DEFAULTS: dict[str, Any] = {"heartbeat_s": 0.5, "keepalive_s": 5, "reconnect_min_s": 0.1, "reconnect_max_s": 0.5}


def in_process_agent(url: str, state_dir: Path, *, fleet: str = "t", device_id: str = "pi1", **settings: Any) -> Agent:
    """An agent of ``fleet`` on broker ``url`` (not started), with quick heartbeats and reconnects."""
    values = agent_settings.load(
        {
            "broker": url,
            "fleet": fleet,
            "device_id": device_id,
            "state_dir": str(state_dir),
            **TEST_DEFAULTS,
            **settings,
        },
        environ={},
    )
    return Agent(values)
