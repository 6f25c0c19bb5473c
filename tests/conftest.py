"""Shared fixtures: real brokers on free loopback ports and real agent processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from coordinator import broker as broker_mod
from coordinator.session import Session

BROKER_KINDS = ["mosquitto", "embedded"]


def pytest_collection_modifyitems(config, items):
    if broker_mod.mosquitto_path() is None:
        skip = pytest.mark.skip(reason="mosquitto not installed (./scripts/test installs it)")
        for item in items:
            if "mosquitto" in item.keywords or "[mosquitto]" in item.nodeid:
                item.add_marker(skip)


@pytest.fixture(params=BROKER_KINDS)
def broker(request, tmp_path):
    """A real broker (Mosquitto, then the embedded amqtt one) on a free loopback port."""
    b = broker_mod.start(request.param, "127.0.0.1", 0, tmp_path / "broker", log_file=tmp_path / "broker.log")
    yield b
    b.stop()


@pytest.fixture
def mosquitto(tmp_path):
    b = broker_mod.start("mosquitto", "127.0.0.1", 0, tmp_path / "broker", log_file=tmp_path / "broker.log")
    yield b
    b.stop()


class AgentProcess:
    def __init__(self, proc: subprocess.Popen, device_id: str, log: Path, args: list[str]):
        self.proc, self.device_id, self.log, self.args = proc, device_id, log, args

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            return self.proc.wait(timeout)
        return self.proc.returncode

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


@pytest.fixture
def agents(tmp_path):
    """Factory: start real `edgeprune-agent run` processes; all are stopped at teardown."""
    started: list[AgentProcess] = []

    def start(
        broker_url: str,
        device_id: str,
        fleet: str = "test",
        *extra: str,
        env: dict | None = None,
        module: str = "edge_agent",
    ) -> AgentProcess:
        state = tmp_path / f"agent-{device_id}"
        log = tmp_path / f"agent-{device_id}.log"
        args = [
            sys.executable,
            "-m",
            module,
            "run",
            "--broker",
            broker_url,
            "--fleet",
            fleet,
            "--device-id",
            device_id,
            "--state-dir",
            str(state),
            "--heartbeat-s",
            "0.5",
            "--keepalive-s",
            "2",
            "--reconnect-min-s",
            "0.1",
            "--reconnect-max-s",
            "1",
            "--log-level",
            "debug",
            *extra,
        ]
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        full_env.pop("EDGEPRUNE_CONFIG", None)
        proc = subprocess.Popen(
            args,
            stdout=open(log, "ab"),
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=Path(__file__).resolve().parent.parent,
        )
        a = AgentProcess(proc, device_id, log, args)
        started.append(a)
        return a

    yield start
    for a in started:
        if a.alive():
            a.proc.kill()
            a.proc.wait(10)


@pytest.fixture
def session_factory(tmp_path):
    from coordinator.store import Store

    sessions: list[Session] = []

    def make(broker_url: str, fleet: str = "test", long_running: bool = False, **kw) -> Session:
        s = Session(broker_url, fleet, Store(tmp_path / "home"), long_running=long_running, **kw).start(10)
        sessions.append(s)
        return s

    yield make
    for s in sessions:
        try:
            s.close()
        except Exception:
            pass


@pytest.fixture
def live(mosquitto, session_factory, tmp_path):
    """An in-process agent ``pi1`` of fleet ``t`` on Mosquitto, and a long-running session that sees it."""
    from .helpers.inproc import in_process_agent

    agent = in_process_agent(mosquitto.url, tmp_path / "a", chunk_bytes=32 * 1024)
    agent.start()
    s = session_factory(mosquitto.url, "t", long_running=True)
    assert wait_until(lambda: "pi1" in s.online(), 10)
    yield agent, s
    agent.stop()


def wait_until(predicate, timeout_s: float = 10.0, interval_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    return predicate()


def raw_client(url: str, on_message=None) -> mqtt.Client:
    host, port = url.split("//")[1].split(":")
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    if on_message:
        c.on_message = on_message
    c.connect(host, int(port))
    c.loop_start()
    return c
