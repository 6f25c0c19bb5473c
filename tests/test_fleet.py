"""Contract tests: the same fleet scenarios against real Mosquitto and the embedded broker,
with real agent processes."""

from __future__ import annotations

import os
import threading
import time

from edge_agent.protocol import serde, topics
from edge_agent.protocol.messages import Command, Reply
from tests.conftest import raw_client, wait_until


def online_count(session) -> int:
    return sum(r["state"] == "online" and r["caps"] is not None for r in session.device_table())


def test_three_agents_come_online_with_capabilities(broker, agents, session_factory):
    for i in range(3):
        agents(broker.url, f"dev{i}")
    s = session_factory(broker.url)
    assert s.wait_for(lambda rows: online_count(s) == 3, 20), s.device_table()
    for row in s.device_table():
        caps = row["caps"]
        assert caps["device_id"] == row["device_id"]
        for key in (
            "arch",
            "os_release",
            "cpu_model",
            "cpu_cores",
            "ram_total_bytes",
            "ram_available_bytes",
            "disk_free_bytes",
            "python_version",
            "runtimes",
            "can_train",
            "sensors",
            "agent_version",
        ):
            assert key in caps, key
        assert caps["cpu_cores"] >= 1 and caps["ram_total_bytes"] > 0
    registry = {d["device_id"]: d for d in s.store.devices("test")}
    assert set(registry) == {"dev0", "dev1", "dev2"}
    assert all(d["caps"] for d in registry.values())


def test_status_and_caps_are_retained(broker, agents, session_factory):
    agents(broker.url, "pi1")
    s = session_factory(broker.url)
    assert s.wait_for(lambda rows: online_count(s) == 1, 20)
    seen: dict[str, bool] = {}
    got = threading.Event()

    def on_message(client, userdata, msg):
        seen.setdefault(msg.topic, msg.retain)  # the first delivery after subscribing: the retained copy
        if topics.device("test", "pi1", "status") in seen and topics.device("test", "pi1", "caps") in seen:
            got.set()

    c = raw_client(broker.url, on_message)
    c.subscribe("edgeprune/v1/test/device/pi1/+", 1)
    assert got.wait(5)
    c.loop_stop()
    c.disconnect()
    assert seen[topics.device("test", "pi1", "status")] is True
    assert seen[topics.device("test", "pi1", "caps")] is True


def test_ping_and_unknown_command(broker, agents, session_factory):
    agents(broker.url, "pi1")
    s = session_factory(broker.url)
    assert s.wait_for(lambda rows: online_count(s) == 1, 20)
    reply = s.call("pi1", "ping", timeout_s=5)
    assert reply.ok and reply.result["agent_ts"] > 0
    reply = s.call("pi1", "launch_rockets", timeout_s=5)
    assert reply.kind == "error" and reply.error_code == "unknown_command"
    reply = s.call("nobody", "ping", timeout_s=0.5)
    assert reply.error_code == "timeout"


GARBAGE = [
    (b"garbage{", "malformed"),
    (b"\xff\xfe\x00", "malformed"),
    (b"[1,2,3]", "malformed"),
    (b"", "malformed"),
    (b'{"v":"2.0","type":"cmd","id":"g1","cmd":"ping","ts":1}', "bad_version"),
    (b'{"type":"cmd","id":"g2","cmd":"ping","ts":1}', "bad_version"),
    (b'{"v":"1.0","type":"cmd","id":"g3","ts":1}', "bad_field"),
    (b'{"v":"1.0","type":"cmd","id":"g4","cmd":"ping","ts":"yesterday"}', "bad_field"),
    (b'{"v":"1.0","type":"cmd","id":"g5","cmd":"ping","ts":1,"args":[1]}', "bad_field"),
    (b'{"v":"1.0","type":"cmd","id":"g6 bad","cmd":"ping","ts":1}', "bad_topic"),
    (b'{"v":"1.0","type":"cmd","id":"g7","cmd":"sleep","ts":1,"args":{"seconds":"x"}}', "bad_args"),
    (b'{"v":"1.0","type":"cmd","id":"g8","cmd":"blob_get","ts":1,"args":{"sha256":"' + b"0" * 64 + b'"}}', "not_found"),
    (b'{"v":"1.0","type":"cmd","id":"g9","cmd":"ping","ts":1,"args":{"pad":"' + b"x" * 5000 + b'"}}', "too_large"),
    (
        b'{"v":"1.1","type":"cmd","id":"g10","cmd":"blob_fetch","ts":1,"args":{"sha256":"'
        + b"0" * 64
        + b'","timeout_s":"soon"}}',
        "bad_args",
    ),
    (b'{"v":"1.1","type":"cmd","id":"g11","cmd":"ack","ts":1,"args":{"ids":"g1"}}', "bad_args"),
]


def test_garbage_commands_get_error_replies_and_agent_stays_up(broker, agents, session_factory):
    agent = agents(broker.url, "pi1", "test", "--max-message-bytes", "4096")
    s = session_factory(broker.url)
    assert s.wait_for(lambda rows: online_count(s) == 1, 20)
    replies: list[Reply] = []
    lock = threading.Lock()

    def on_message(client, userdata, msg):
        if msg.topic.endswith("/reply"):  # amqtt also replays unrelated retained messages on connect
            with lock:
                replies.append(serde.decode(Reply, msg.payload))

    c = raw_client(broker.url, on_message)
    c.subscribe(topics.device("test", "pi1", "reply"), 1)
    time.sleep(0.3)
    cmd_topic = topics.device("test", "pi1", "cmd")
    for payload, _ in GARBAGE:
        c.publish(cmd_topic, payload, qos=1).wait_for_publish(5)
    assert wait_until(lambda: len([r for r in replies if r.kind == "error"]) >= len(GARBAGE), 15), replies
    c.loop_stop()
    c.disconnect()
    errors = [r for r in replies if r.kind == "error"]
    # io and job commands answer from other threads, so compare without order
    assert sorted(r.error_code for r in errors) == sorted(code for _, code in GARBAGE)
    by_id = {r.id: r for r in errors if r.id}
    assert by_id["g1"].error_code == "bad_version"  # error reply addressed to the request id it could read
    assert all(r.error_message for r in errors)
    assert agent.alive()
    assert s.call("pi1", "ping", timeout_s=5).ok


def test_coordinator_survives_garbage_from_devices(broker, agents, session_factory):
    agents(broker.url, "good")
    s = session_factory(broker.url)
    assert s.wait_for(lambda rows: online_count(s) == 1, 20)
    c = raw_client(broker.url)
    evil = [
        ("edgeprune/v1/test/device/spoof/status", b"{not json"),
        (
            "edgeprune/v1/test/device/spoof/status",
            b'{"v":"1.0","type":"status","device_id":"good","state":"offline","ts":1}',
        ),
        ("edgeprune/v1/test/device/spoof/caps", b'{"v":"1.0","type":"caps"}'),
        (
            "edgeprune/v1/test/device/bad id/status",
            b'{"v":"1.0","type":"status","device_id":"bad id","state":"online","ts":1}',
        ),
        ("edgeprune/v1/test/device/x/status", b'{"v":"1.0","type":"status","device_id":"x","state":"exploded","ts":1}'),
        ("edgeprune/v1/test/device/x/reply", b'{"v":"9.0","type":"reply"}'),
        ("edgeprune/v1/test/device/x/data", b"EPF1\xff\xff\xff\xff"),
        ("edgeprune/v1/test/device/x/data", os.urandom(300)),
    ]
    before = s.stats.rejected_in
    for t, p in evil:
        c.publish(t, p, qos=1).wait_for_publish(5)
    assert wait_until(lambda: s.stats.rejected_in - before >= len(evil), 10), s.stats
    c.loop_stop()
    c.disconnect()
    rows = {r["device_id"]: r for r in s.device_table()}
    assert rows["good"]["state"] == "online"  # the spoofed 'offline' was refused
    assert "bad id" not in rows and rows.get("x", {}).get("state") in (None, "unknown")
    assert s.call("good", "ping", timeout_s=5).ok


def test_busy_state_busy_error_and_inline_commands_while_busy(broker, agents, session_factory):
    agents(broker.url, "pi1")
    s = session_factory(broker.url)
    assert s.wait_for(lambda rows: online_count(s) == 1, 20)
    progress = []
    rid, fut = s.submit("pi1", "sleep", {"seconds": 2.0}, on_progress=progress.append)
    assert s.wait_for(lambda rows: rows[0]["state"] == "busy", 5)
    assert s.device_table()[0]["task"] == "sleep"
    second = s.call("pi1", "sleep", {"seconds": 0.1}, timeout_s=5)
    assert second.error_code == "busy"
    assert s.call("pi1", "ping", timeout_s=2).ok  # answered while the job runs
    final = fut.result(10)
    assert final.ok and final.result["slept_s"] == 2.0
    assert [p.kind for p in progress] == ["accepted"]
    assert s.wait_for(lambda rows: rows[0]["state"] == "online", 5)


def test_duplicate_command_runs_once(broker, agents, session_factory):
    agents(broker.url, "pi1")
    s = session_factory(broker.url)
    assert s.wait_for(lambda rows: online_count(s) == 1, 20)
    replies = []
    c = raw_client(
        broker.url, lambda cl, u, m: m.topic.endswith("/reply") and replies.append(serde.decode(Reply, m.payload))
    )
    c.subscribe(topics.device("test", "pi1", "reply"), 1)
    time.sleep(0.3)
    raw = serde.encode(Command(id="dup1", cmd="sleep", ts=time.time(), args={"seconds": 0.5}))
    c.publish(topics.device("test", "pi1", "cmd"), raw, qos=1).wait_for_publish(5)
    c.publish(topics.device("test", "pi1", "cmd"), raw, qos=1).wait_for_publish(5)  # a QoS-1 re-delivery
    assert wait_until(lambda: any(r.kind == "result" for r in replies), 10)
    c.publish(topics.device("test", "pi1", "cmd"), raw, qos=1).wait_for_publish(5)  # after completion
    # (the session also sees these results; it acknowledges unknown ones with an `ack`, whose own
    # result lands on the same topic, so count only dup1's)
    assert wait_until(lambda: sum(r.kind == "result" and r.id == "dup1" for r in replies) >= 2, 5)
    time.sleep(0.3)
    c.loop_stop()
    c.disconnect()
    kinds = [r.kind for r in replies if r.id == "dup1"]
    assert kinds.count("result") == 2
    assert "error" not in kinds, replies  # never 'busy': the duplicate was recognised, not queued
    assert kinds.count("accepted") == 1


def test_blob_broadcast_down_and_pull_up(broker, agents, session_factory):
    agents(broker.url, "pi1", "test", "--chunk-bytes", "65536")
    agents(broker.url, "pi2")
    s = session_factory(broker.url, chunk_bytes=65536)
    assert s.wait_for(lambda rows: online_count(s) == 2, 20)
    blob = os.urandom(600_000)
    ref = s.publish_blob(blob)
    assert ref.chunks == 10
    for dev in ("pi1", "pi2"):
        reply = s.call(dev, "blob_fetch", {"sha256": ref.sha256}, timeout_s=30)
        assert reply.ok, reply.error
        assert reply.result == {"sha256": ref.sha256, "bytes": 600_000, "cached": False}
    again = s.call("pi1", "blob_fetch", {"sha256": ref.sha256}, timeout_s=10)
    assert again.result["cached"] is True  # crosses the network once
    assert s.fetch_blob("pi1", ref.sha256, timeout_s=30) == blob
    s.clear_blob(ref.sha256)
    missing = s.call("pi2", "blob_fetch", {"sha256": "ab" * 32, "timeout_s": 0.5}, timeout_s=5)
    assert missing.error_code == "timeout"


def test_starting_a_session_twice_keeps_one_connection(mosquitto, session_factory, tmp_path):
    """`Session(...).start()` then `with session:` starts it again; a second network thread on the same
    client id made the broker kick one connection for the other every few seconds (replies were lost)."""
    import threading

    s = session_factory(mosquitto.url)
    with s:
        time.sleep(1.5)
        assert [t.name for t in threading.enumerate()].count("mqtt-coordinator") == 1
        assert "already connected" not in (tmp_path / "broker.log").read_text()
