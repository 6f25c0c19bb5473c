"""The fleet contract, run against every transport: the in-memory one, Mosquitto and the embedded broker.

The same in-process agents and session (real :class:`~edge_agent.daemon.Agent` and
:class:`~coordinator.session.Session`) over ``memory://``, then over real brokers on
loopback ports: presence with capabilities, retained state a late coordinator sees,
commands and their error replies, the one job slot, duplicates, blobs both ways, a
clean stop. What passes here over ``memory://`` is what the round-loop tests
(test_round_policy) may rely on. Crashes, restarts and partitions need a real socket and
a real broker: test_presence and test_netfaults.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

import pytest

import edge_agent.commands  # noqa: F401  (registers the commands)
from coordinator import broker as broker_mod
from coordinator.session import Session
from coordinator.store import Store
from edge_agent.common.memlink import MemoryBroker
from edge_agent.daemon import Agent
from edge_agent.protocol import serde, topics
from edge_agent.protocol.messages import Command

from .conftest import wait_until
from .helpers.inproc import in_process_agent

TRANSPORTS = ["memory", "mosquitto", "embedded"]


@pytest.fixture(params=TRANSPORTS)
def url(request, tmp_path):
    if request.param == "memory":
        name = f"contract-{os.getpid()}-{id(tmp_path)}"
        yield f"memory://{name}"
        MemoryBroker.drop(name)
        return
    b = broker_mod.start(request.param, "127.0.0.1", 0, tmp_path / "broker", log_file=tmp_path / "broker.log")
    yield b.url
    b.stop()


@pytest.fixture
def fleet(url, tmp_path):
    """(start_agent, session_factory) over the transport; everything is stopped at teardown."""
    agents: list[Agent] = []
    sessions: list[Session] = []

    def agent(device_id: str) -> Agent:
        a = in_process_agent(url, tmp_path / device_id, fleet="c", device_id=device_id, heartbeat_s=0.2)
        a.start()
        agents.append(a)
        return a

    def session() -> Session:
        s = Session(url, "c", Store(tmp_path / "home")).start(10)
        sessions.append(s)
        return s

    yield agent, session
    for s in sessions:
        s.close()
    for a in agents:
        a.stop()


def _online(s: Session, n: int) -> bool:
    """``n`` devices online with their capabilities."""
    return s.wait_for(lambda rows: sum(r["state"] == "online" and bool(r["caps"]) for r in rows) >= n, 20)


def test_devices_come_online_with_capabilities_and_a_late_coordinator_sees_them(fleet):
    agent, session = fleet
    for d in ("pi1", "pi2"):
        agent(d)
    s = session()
    assert _online(s, 2), s.device_table()
    rows = {r["device_id"]: r for r in s.device_table()}
    assert set(rows) == {"pi1", "pi2"} and rows["pi1"]["arch"] and rows["pi1"]["caps"]["agent_version"]
    late = session()  # retained status and caps: a coordinator started afterwards knows the fleet at once
    assert _online(late, 2)


def test_commands_and_their_errors(fleet):
    agent, session = fleet
    agent("pi1")
    s = session()
    assert _online(s, 1)
    assert s.call("pi1", "ping", timeout_s=5).ok
    assert s.call("pi1", "launch_rockets", timeout_s=5).error_code == "unknown_command"
    bad = s.call("pi1", "blob_fetch", {"sha256": "ab" * 32, "timeout_s": "soon"}, timeout_s=5)
    assert bad.error_code == "bad_args" and "timeout_s" in bad.error_message
    assert s.call("nobody", "ping", timeout_s=0.3).error_code == "timeout"


def test_one_job_at_a_time_and_inline_commands_while_busy(fleet):
    agent, session = fleet
    agent("pi1")
    s = session()
    assert _online(s, 1)
    _, first = s.submit("pi1", "sleep", {"seconds": 1.0})
    assert wait_until(lambda: s.device_table()[0]["state"] == "busy", 5)
    assert s.call("pi1", "sleep", {"seconds": 0.1}, timeout_s=5).error_code == "busy"
    assert s.call("pi1", "ping", timeout_s=5).ok  # answered while the job runs
    assert first.result(10).result == {"slept_s": 1.0}
    assert wait_until(lambda: s.device_table()[0]["state"] == "online", 5)


def test_a_duplicated_command_runs_once(fleet):
    agent, session = fleet
    a = agent("pi1")
    s = session()
    assert _online(s, 1)
    runs = []
    real = a.acknowledge
    a.acknowledge = lambda ids: runs.append(ids) or real(ids)  # type: ignore[method-assign]
    cmd = serde.encode(Command(id="dup-1", cmd="ack", ts=0.0, args={"ids": ["x"]}, to="pi1"))
    for _ in range(3):  # QoS 1 may deliver a command more than once
        s.link.publish(topics.device("c", "pi1", "cmd"), cmd)
    assert s.call("pi1", "ping", timeout_s=5).ok  # delivered in order after the three
    assert runs.count(["x"]) == 1  # (the session may ack the stray reply to dup-1 itself: ["dup-1"])


def test_blobs_down_by_broadcast_and_up_by_pull(fleet):
    agent, session = fleet
    a = agent("pi1")
    s = session()
    assert _online(s, 1)
    blob = os.urandom(700_000)  # three chunks
    ref = s.publish_blob(blob)
    reply = s.call("pi1", "blob_fetch", serde.encode_args(ref), timeout_s=30)
    assert reply.ok and reply.result["bytes"] == len(blob) and a.blobs.get(ref.sha256) == blob
    up = os.urandom(300_000)
    sha = a.blobs.put(up)
    assert s.fetch_blob("pi1", sha, timeout_s=30, expected_bytes=len(up)) == up


def test_a_clean_stop_shows_offline_at_once(fleet):
    agent, session = fleet
    a = agent("pi1")
    s = session()
    assert _online(s, 1)
    stopper = threading.Thread(target=a.stop)
    stopper.start()
    assert s.wait_for(lambda rows: rows and rows[0]["state"] == "offline", 5), s.device_table()
    stopper.join(10)


@pytest.mark.parametrize(
    "pattern, topic, match",
    [
        ("a/+/c", "a/b/c", True),
        ("a/+/c", "a/b/d", False),
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("a/+", "a/b/c", False),
        ("a/b", "a/b", True),
        ("a/b", "a/b/c", False),
    ],
)
def test_memory_broker_filters(pattern, topic, match):
    from edge_agent.common.memlink import topic_matches

    assert topic_matches(pattern, topic) is match


def test_memory_broker_retains_clears_and_publishes_the_will_of_a_killed_link(tmp_path):
    from edge_agent.common.link import Will
    from edge_agent.common.memlink import MemoryLink

    got: list[tuple[str, bytes, bool]] = []
    dying = MemoryLink("memory://wills", "a", on_message=lambda *m: None, will=Will("t/status", b"offline"))
    dying.start(2)
    dying.publish("t/kept", b"1", retain=True)
    dying.publish("t/cleared", b"1", retain=True)
    dying.publish("t/cleared", b"", retain=True)
    dying.kill()
    assert not dying.publish("t/x", b"late").is_published()  # not connected: never acknowledged
    watcher = MemoryLink("memory://wills", "b", on_message=lambda *m: got.append(m))
    watcher.subscribe("t/#")
    watcher.start(2)
    assert wait_until(lambda: len(got) == 2, 2)
    assert sorted(got) == [("t/kept", b"1", True), ("t/status", b"offline", True)]
    watcher.stop()
    MemoryBroker.drop("wills")


def _frames_on(url: str, topic: str) -> list[bytes]:
    from edge_agent.common.memlink import MemoryLink

    got: list[bytes] = []
    link = MemoryLink(url, "spy", on_message=lambda t, p, r: got.append(p))
    link.subscribe(topic)
    link.start(2)
    return got


@contextlib.contextmanager
def _memory_fleet(tmp_path, name: str, devices=("pi1",)):
    """In-process agents ``devices`` and a coordinator session on ``memory://name``, all online."""
    url = f"memory://{name}"
    agents = [in_process_agent(url, tmp_path / d, fleet="c", device_id=d) for d in devices]
    for a in agents:
        a.start()
    s = Session(url, "c", Store(tmp_path / "home")).start(5)
    try:
        assert _online(s, len(agents))
        yield url, s, agents
    finally:
        s.close()
        for a in agents:
            a.stop()
        MemoryBroker.drop(name)


def test_each_peer_gets_chunk_frames_in_the_version_it_reads(tmp_path):
    """1.2 frames (little-endian, EPF2) go only to peers that speak 1.2; a 1.1 coordinator, which sends
    blob_get without ``frame``, and a fleet with a 1.1 device get EPF1, which they read."""
    with _memory_fleet(tmp_path, "frames") as (url, s, (a,)):
        sha = a.blobs.put(os.urandom(1000))
        up = _frames_on(url, topics.device("c", "pi1", "data"))
        assert s.call("pi1", "blob_get", {"sha256": sha}, timeout_s=5).ok  # as a 1.1 coordinator asks
        assert s.fetch_blob("pi1", sha, timeout_s=5, expected_bytes=1000)  # as this one asks
        assert wait_until(lambda: len(up) == 2, 2) and [f[:4] for f in up] == [b"EPF1", b"EPF2"]
        assert s.broadcast_frame_version() == 2
        down = _frames_on(url, "edgeprune/v1/c/blob/+/+")
        s.presence.update_caps("old-pi", {"protocol_version": "1.1"}, retained=True)
        assert s.broadcast_frame_version() == 1
        ref = s.publish_blob(os.urandom(500))
        assert wait_until(lambda: len(down) == 1, 2) and down[0][:4] == b"EPF1"
        assert s.call("pi1", "blob_fetch", serde.encode_args(ref), timeout_s=5).ok  # and the 1.2 device reads it


def test_chunks_a_device_asks_for_go_to_it_alone(tmp_path):
    """A want is answered on the asker's own ``down`` topic: a thousand devices that ask (a broker slow to
    replay retained chunks to all of them) cost a thousand blobs, not a thousand times the fleet."""
    with _memory_fleet(tmp_path, "wants", ("pi1", "pi2")) as (url, s, agents):
        fanout = _frames_on(url, "edgeprune/v1/c/blob/+/+")
        own = _frames_on(url, topics.device("c", "pi1", "down"))
        other = _frames_on(url, topics.device("c", "pi2", "down"))
        ref = s.offer_blob(os.urandom(600_000))  # not broadcast: only a want brings it
        assert s.call("pi1", "blob_fetch", serde.encode_args(ref), timeout_s=10).ok
        assert len(own) == ref.chunks and not fanout and not other
        assert s.stats.wants_in >= 1 and s.stats.resent_chunks == ref.chunks


def test_a_device_that_saw_the_broker_replay_retained_chunks_is_patient_before_asking(tmp_path):
    """Once a broker has replayed a broadcast's retained chunks, a broadcast slow to come is slow, not
    missing: the device waits BROADCAST_PATIENCE_S, not BROADCAST_WAIT_S, before its first want."""
    from edge_agent.protocol.constants import BROADCAST_PATIENCE_S, BROADCAST_WAIT_S

    with _memory_fleet(tmp_path, "patience") as (url, s, (a,)):
        assert a.replays_retained is None
        ref = s.publish_blob(os.urandom(1000))
        assert s.call("pi1", "blob_fetch", serde.encode_args(ref), timeout_s=10).ok
        assert a.replays_retained == a.link.failovers and s.stats.wants_in == 0
        hidden = s.offer_blob(os.urandom(1000))  # as if its retained chunks were slow to come
        t0 = time.monotonic()
        reply = s.call("pi1", "blob_fetch", serde.encode_args(hidden), timeout_s=30)
        took = time.monotonic() - t0
        assert reply.ok and s.stats.wants_in == 1
        assert BROADCAST_PATIENCE_S <= took < BROADCAST_PATIENCE_S + 3 and took > 2 * BROADCAST_WAIT_S
