"""Process-level presence: Will on kill -9, offline on graceful stop, stale on silence,
reconnect after a broker restart. Real agents, real brokers."""

from __future__ import annotations

import os
import signal
import time

from coordinator import broker as broker_mod
from tests.conftest import wait_until


def state(session, device_id):
    return next((r["state"] for r in session.device_table() if r["device_id"] == device_id), None)


def test_kill9_shows_offline_via_will(broker, agents, session_factory):
    a = agents(broker.url, "victim")  # keepalive 2 s: the broker fires the Will after ~3 s of silence
    s = session_factory(broker.url)
    assert s.wait_for(lambda rows: state(s, "victim") == "online", 20)
    t0 = time.monotonic()
    a.kill9()
    assert s.wait_for(lambda rows: state(s, "victim") == "offline", 10), s.device_table()
    elapsed = time.monotonic() - t0
    assert elapsed < 8.0, f"Will took {elapsed:.1f} s"
    assert wait_until(lambda: s.store.devices("test")[0]["state"] == "offline", 5)  # the registry follows


def test_graceful_stop_shows_offline_at_once(broker, agents, session_factory):
    a = agents(broker.url, "calm")
    s = session_factory(broker.url)
    assert s.wait_for(lambda rows: state(s, "calm") == "online", 20)
    assert a.terminate() == 0
    t0 = time.monotonic()
    assert s.wait_for(lambda rows: state(s, "calm") == "offline", 5)
    assert time.monotonic() - t0 < 1.0  # published by the agent itself, not the keepalive-delayed Will
    assert "stopped" in a.log_text()


def test_silent_device_becomes_stale_then_recovers(broker, agents, session_factory):
    a = agents(broker.url, "frozen", "test", "--keepalive-s", "30")  # heartbeat 0.5 s; Will far away
    s = session_factory(broker.url)
    assert s.wait_for(lambda rows: state(s, "frozen") == "online", 20)
    os.kill(a.proc.pid, signal.SIGSTOP)
    try:
        assert s.wait_for(lambda rows: state(s, "frozen") == "stale", 5)  # 3 missed beats = 1.5 s
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
    assert s.wait_for(lambda rows: state(s, "frozen") == "online", 5)


def test_broker_restart_is_survived(broker, agents, session_factory, tmp_path):
    for i in range(3):
        agents(broker.url, f"dev{i}")
    s = session_factory(broker.url)
    assert s.wait_for(lambda rows: sum(r["state"] == "online" for r in rows) == 3, 20)
    broker.kill()
    assert s.wait_for(lambda rows: all(r["state"] == "stale" for r in rows), 10)
    restarted = broker_mod.start(broker.kind, broker.host, broker.port, tmp_path / "broker2")
    try:
        # retained state died with the broker: seeing 'online' again means each agent re-announced
        assert s.wait_for(lambda rows: sum(r["state"] == "online" for r in rows) == 3, 20), s.device_table()
        assert all(s.call(f"dev{i}", "ping", timeout_s=5).ok for i in range(3))
        assert s.link.connect_count >= 2
    finally:
        restarted.stop()


def test_agents_reannounce_when_coordinator_comes_online(broker, agents, session_factory):
    agents(broker.url, "pi1", "test", "--heartbeat-s", "60")  # no heartbeat during the test
    first = session_factory(broker.url)
    assert first.wait_for(lambda rows: state(first, "pi1") == "online", 20)
    second = session_factory(broker.url, long_running=True)
    # the retained status replayed on subscribe is not 'live'; the re-announcement is
    assert wait_until(lambda: second.views.get("pi1") and second.views["pi1"].last_heard is not None, 5)
    rows = second.discover(1.0)
    assert rows[0]["state"] == "online"


def test_long_running_coordinator_status_retained_and_cleared(broker, session_factory):
    import paho.mqtt.client as mqtt

    from edge_agent.protocol import serde, topics
    from edge_agent.protocol.messages import CoordinatorStatus

    s = session_factory(broker.url, long_running=True)
    got = []
    host, port = broker.url.split("//")[1].split(":")
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    c.on_message = lambda cl, u, m: m.topic == topics.coordinator_status("test") and got.append(
        serde.decode(CoordinatorStatus, m.payload)
    )
    c.connect(host, int(port))
    c.loop_start()
    c.subscribe(topics.coordinator_status("test"), 1)
    assert wait_until(lambda: got and got[-1].state == "online", 5)
    s.close()
    assert wait_until(lambda: got[-1].state == "offline", 5)
    c.loop_stop()
    c.disconnect()


def test_frozen_device_gets_will_after_keepalive(broker, agents, session_factory):
    """A device that stops talking without closing its socket (power loss, Wi-Fi gone).

    Mosquitto fires the Will after 1.5 x keepalive (2 s here). amqtt 0.12.1 never
    enforces keepalive (its BrokerProtocolHandler.handle_read_timeout is a no-op), so
    there the coordinator's own heartbeat tracking must catch it: the device is stale."""
    a = agents(broker.url, "unplugged", "test", "--keepalive-s", "2")
    s = session_factory(broker.url)
    assert s.wait_for(lambda rows: state(s, "unplugged") == "online", 20)
    os.kill(a.proc.pid, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        if broker.kind == "mosquitto":
            assert s.wait_for(lambda rows: state(s, "unplugged") == "offline", 15), s.device_table()
            assert time.monotonic() - t0 < 10
        else:
            assert s.wait_for(lambda rows: state(s, "unplugged") == "stale", 5), s.device_table()
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
