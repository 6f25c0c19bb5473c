"""Network faults, for real: agents in a network namespace this test creates, behind a veth pair.

The broker listens on the host end of the veth (10.231.0.1); the agents connect
from inside the namespace, so every packet they send crosses the veth, where
the test shapes it (tbf rate limit; netem delay and loss where the kernel has
sch_netem) and cuts it (link down for longer than the MQTT keepalive, then up).
Federated rounds with real TF-MOT training must complete with every update
counted exactly once. Needs root and iproute2; skipped with the reason otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from coordinator import broker as broker_mod
from coordinator.progress import Reporter
from coordinator.session import Session
from coordinator.store import Store
from coordinator.train import TrainConfig, train

from .conftest import wait_until
from .helpers.brokerlog import abnormal_disconnects

NS, HOST_IF, NS_IF = "ep-netfault", "ep-nf-h", "ep-nf-d"
HOST_IP, NS_IP = "10.231.0.1", "10.231.0.2"
ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.tf]


def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) is not installed"
    if broker_mod.mosquitto_path() is None:
        return "mosquitto not installed"
    return None


REASON = _why_not()
if REASON:
    print(f"\n[test_netfaults] skipped: {REASON}", file=sys.stderr)
    pytestmark = [*pytestmark, pytest.mark.skip(reason=REASON)]


@pytest.fixture
def netns():
    _sh("ip", "netns", "del", NS, check=False)
    _sh("ip", "link", "del", HOST_IF, check=False)
    try:
        _sh("ip", "netns", "add", NS)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot create a network namespace here: {exc.stderr.strip()}")
    _sh("ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", NS_IF)
    _sh("ip", "link", "set", NS_IF, "netns", NS)
    _sh("ip", "addr", "add", f"{HOST_IP}/24", "dev", HOST_IF)
    _sh("ip", "link", "set", HOST_IF, "up")
    _sh("ip", "netns", "exec", NS, "ip", "addr", "add", f"{NS_IP}/24", "dev", NS_IF)
    _sh("ip", "netns", "exec", NS, "ip", "link", "set", NS_IF, "up")
    _sh("ip", "netns", "exec", NS, "ip", "link", "set", "lo", "up")
    shaping = {}
    # shape what the devices send: a slow uplink always; delay and loss only where sch_netem exists
    rate = _sh(
        "ip",
        "netns",
        "exec",
        NS,
        "tc",
        "qdisc",
        "add",
        "dev",
        NS_IF,
        "root",
        "handle",
        "1:",
        "tbf",
        "rate",
        "8mbit",
        "burst",
        "64kb",
        "latency",
        "200ms",
        check=False,
    )
    shaping["tbf 8mbit uplink"] = rate.returncode == 0 or rate.stderr.strip()
    netem = _sh(
        "ip",
        "netns",
        "exec",
        NS,
        "tc",
        "qdisc",
        "add",
        "dev",
        NS_IF,
        "parent",
        "1:1",
        "handle",
        "10:",
        "netem",
        "delay",
        "30ms",
        "10ms",
        "loss",
        "1%",
        check=False,
    )
    shaping["netem 30ms +-10ms, 1% loss"] = netem.returncode == 0 or netem.stderr.strip()
    if netem.returncode != 0:
        print(
            f"\n[test_netfaults] netem delay/loss not applied: {netem.stderr.strip()} (this kernel has no "
            f"sch_netem); rate limit and partition still run",
            file=sys.stderr,
        )
    yield shaping
    _sh("ip", "netns", "del", NS, check=False)
    _sh("ip", "link", "del", HOST_IF, check=False)


def _agent(url: str, device_id: str, shard: str, tmp: Path) -> subprocess.Popen:
    log = open(tmp / f"agent-{device_id}.log", "ab")
    return subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            NS,
            sys.executable,
            "-m",
            "edge_agent",
            "run",
            "--broker",
            url,
            "--fleet",
            "nf",
            "--device-id",
            device_id,
            "--state-dir",
            str(tmp / f"agent-{device_id}"),
            "--data",
            "digits",
            "--data-shard",
            shard,
            "--train-threads",
            "1",
            "--heartbeat-s",
            "1",
            "--keepalive-s",
            "3",
            "--reconnect-min-s",
            "0.2",
            "--reconnect-max-s",
            "2",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def test_rounds_survive_a_partition_on_a_shaped_link(netns, tmp_path):
    b = broker_mod.start("mosquitto", HOST_IP, 0, tmp_path / "broker", log_file=tmp_path / "broker.log")
    procs = [_agent(b.url, f"ns{i}", f"{i}/2", tmp_path) for i in range(2)]
    s = Session(b.url, "nf", Store(tmp_path / "home"), long_running=True, offline_grace_s=60).start(10)
    try:
        assert s.wait_for(lambda rows: sum(r["state"] == "online" and r["caps"] is not None for r in rows) == 2, 60), (
            tmp_path / "agent-ns0.log"
        ).read_text()[-2000:]
        result: dict = {}
        worker = threading.Thread(
            target=lambda: result.update(
                train(
                    TrainConfig(rounds=3, sparsity=0.5, local_epochs=4, seed=5, round_timeout_s=300),
                    s,
                    s.store,
                    Reporter(quiet=True),
                )
            ),
            daemon=True,
        )
        worker.start()
        # cut the link while round 2 trains, for longer than 1.5 x keepalive: the broker drops the agents
        # (their Wills say offline), they keep training, and reconnect when the link heals
        assert wait_until(lambda: any(r["round"] == 1 for r in s.store.rounds(result.get("run_id") or _run_id(s))), 240)
        assert wait_until(lambda: s.views["ns0"].status.task == "train_round", 120)
        cut = time.time()
        _sh("ip", "netns", "exec", NS, "ip", "link", "set", NS_IF, "down")
        saw_offline = wait_until(lambda: s.views["ns0"].status.state == "offline", 20)
        time.sleep(3)
        _sh("ip", "netns", "exec", NS, "ip", "link", "set", NS_IF, "up")
        healed = time.time()
        worker.join(600)
        assert result.get("state") == "done", result
        rounds = s.store.rounds(result["run_id"])
        assert [r["round"] for r in rounds] == [1, 2, 3]
        assert all(r["clients_ok"] == 2 and r["failures"] == 0 for r in rounds), [r["failure_reasons"] for r in rounds]
        per_client = [(c["round"], c["device_id"]) for c in s.store.client_rounds(result["run_id"]) if c["ok"]]
        assert sorted(per_client) == sorted({*per_client}) and len(per_client) == 6  # each (device, round) once
        assert saw_offline, "the partition did not last long enough for the broker to notice"
        assert all(p.poll() is None for p in procs)
        # the broker dropped nobody outside the partition (a corrupted stream ends in a protocol error or a
        # stalled one in a timeout; the partition's own timeouts are allowed, up to one keepalive after it)
        outside = [line for line in abnormal_disconnects(b.log_text()) if not cut - 1 <= _log_ts(line) <= healed + 6]
        assert outside == [], outside
    finally:
        s.close()
        for p in procs:
            p.kill()
            p.wait(10)
        b.stop()


def _log_ts(line: str) -> float:
    """Wall time of a Mosquitto log line (log_timestamp_format %Y-%m-%dT%H:%M:%S)."""
    import datetime

    try:
        return datetime.datetime.strptime(line[:19], "%Y-%m-%dT%H:%M:%S").timestamp()
    except ValueError:
        return 0.0


def _run_id(s: Session) -> str:
    runs = s.store.runs("train")
    return runs[0]["run_id"] if runs else "-"
