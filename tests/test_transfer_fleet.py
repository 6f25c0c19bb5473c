"""Blob transfer against a real Mosquitto: lost chunks, corrupted chunks, broadcasts nobody replays,
credentials and failover. Agent and coordinator run in this process so the test can drop or damage
exactly one chunk on the way."""

from __future__ import annotations

import json
import os
import time

import pytest

from coordinator import broker as broker_mod
from edge_agent import settings as agent_settings
from edge_agent.daemon import Agent
from edge_agent.protocol import serde, topics
from edge_agent.protocol.messages import Reply

from .conftest import raw_client, wait_until
from .helpers.brokerlog import abnormal_disconnects
from .helpers.inproc import in_process_agent


def _agent(url: str, tmp_path, **over) -> Agent:
    return in_process_agent(url, tmp_path / "a", chunk_bytes=32 * 1024, **over)


def _tamper(agent: Agent, change):
    """Route the agent's publishes through ``change(topic, payload) -> payload | None`` (None drops it)."""
    original = agent.link.publish
    commands: list[dict] = []

    def publish(topic, payload, **kw):
        new = change(topic, payload)
        if new is None:
            return original(topic + "/dropped-by-test", b"", **kw)  # still a real publish: the sender sees a PUBACK
        return original(topic, new, **kw)

    agent.link.publish = publish
    handle = agent._on_command

    def on_command(payload):
        commands.append(json.loads(payload))
        handle(payload)

    agent._on_command = on_command
    return commands


def test_lost_chunks_are_asked_for_again_and_only_those(live):
    agent, s = live
    blob = os.urandom(300_000)
    sha = agent.blobs.put(blob)
    dropped: set[int] = set()

    def drop_two(topic, payload):
        if topic.endswith("/data"):
            frame = serde.decode_frame(payload)
            if frame.index in (2, 5) and frame.index not in dropped:
                dropped.add(frame.index)
                return None
        return payload

    commands = _tamper(agent, drop_two)
    t0 = time.monotonic()
    assert s.fetch_blob("pi1", sha, timeout_s=60, expected_bytes=len(blob)) == blob
    elapsed = time.monotonic() - t0
    gets = [c["args"] for c in commands if c["cmd"] == "blob_get"]
    frame = {"frame": serde.FRAME_VERSION}
    assert gets == [{"sha256": sha, **frame}, {"sha256": sha, "chunks": [2, 5], **frame}]
    assert elapsed < 10, f"the missing chunks took {elapsed:.1f} s (asked for once the device said it had sent all)"


def test_a_corrupted_blob_is_pulled_once_more(live):
    agent, s = live
    blob = os.urandom(100_000)
    sha = agent.blobs.put(blob)
    damaged = []

    def corrupt_once(topic, payload):
        if topic.endswith("/data") and not damaged:
            damaged.append(1)
            return payload[:-4] + b"\x40\x02\x00\x07"  # the old PUBACK race: four foreign bytes
        return payload

    commands = _tamper(agent, corrupt_once)
    assert s.fetch_blob("pi1", sha, timeout_s=60, expected_bytes=len(blob)) == blob
    frame = {"frame": serde.FRAME_VERSION}
    assert [c["args"] for c in commands if c["cmd"] == "blob_get"] == [{"sha256": sha, **frame}] * 2


def test_a_size_other_than_the_announced_one_is_refused(live):
    from edge_agent.protocol.errors import ErrorCode, ProtocolError

    agent, s = live
    sha = agent.blobs.put(os.urandom(50_000))
    with pytest.raises(ProtocolError) as e:
        s.fetch_blob("pi1", sha, timeout_s=20, expected_bytes=1000)
    assert e.value.code == ErrorCode.INTEGRITY and "expected 1000" in e.value.message


def test_a_broadcast_the_broker_does_not_replay_arrives_on_request(live, mosquitto):
    """As on RabbitMQ: the retained chunks never reach the device's wildcard subscription."""
    agent, s = live
    blob = os.urandom(200_000)
    ref = s.publish_blob(blob)
    c = raw_client(mosquitto.url)
    for i in range(ref.chunks):  # the broker forgets them; the coordinator still has the blob
        c.publish(topics.blob_chunk("t", ref.sha256, i), b"", qos=1, retain=True).wait_for_publish(5)
    c.disconnect()
    t0 = time.monotonic()
    reply = s.call("pi1", "blob_fetch", serde.encode_args(ref), timeout_s=30)
    assert reply.ok, reply.error
    assert agent.blobs.get(ref.sha256) == blob
    assert time.monotonic() - t0 < 10


def test_retained_chunks_that_come_at_once_are_not_lost(live, mosquitto):
    """The broker replays a broadcast's retained chunks the moment the device subscribes; none may be
    dropped for arriving before the device is ready for them. This blob is one the coordinator does not
    have, so a lost chunk cannot be asked for again: every chunk must come from the replay."""
    import hashlib

    from edge_agent.common.blobs import split

    agent, s = live
    blob = os.urandom(18 * 65536)
    sha = hashlib.sha256(blob).hexdigest()
    c = raw_client(mosquitto.url)
    for f in split(blob, 65536, sha256=sha):
        c.publish(topics.blob_chunk("t", sha, f.index), serde.encode_frame(f), qos=1, retain=True).wait_for_publish(5)
    c.disconnect()
    opened = agent.receiver.open

    def slow_open(*a, **kw):  # widen the window between subscribing and being ready (as under load)
        time.sleep(0.5)
        return opened(*a, **kw)

    agent.receiver.open = slow_open
    reply = s.call("pi1", "blob_fetch", {"sha256": sha, "bytes": len(blob), "chunks": 18}, timeout_s=30)
    assert reply.ok, reply.error
    assert agent.blobs.get(sha) == blob


def test_an_update_not_yet_pulled_is_never_evicted(mosquitto, session_factory, tmp_path):
    agent = _agent(mosquitto.url, tmp_path, blob_cache_bytes=150_000)
    agent.start()
    try:
        s = session_factory(mosquitto.url, "t", long_running=True)
        assert wait_until(lambda: "pi1" in s.online(), 10)
        # A finished round's result that the coordinator has not pulled. Any replay of the outbox (on a
        # reconnect, or the coordinator's announce arriving late) would show it to the coordinator, which
        # acks a result nobody asked for; so its replays never reach the coordinator here.
        update = os.urandom(100_000)
        sha = agent.blobs.put(update)
        _tamper(agent, lambda topic, payload: None if topic.endswith("/reply") and b'"r1"' in payload else payload)
        reply = Reply(id="r1", device_id="pi1", kind="result", ts=time.time(), result={"update": {"sha256": sha}})
        (agent.outbox / "r1.json").write_bytes(serde.encode(reply))
        ref = s.publish_blob(os.urandom(120_000))  # over the cache limit together with the update
        assert s.call("pi1", "blob_fetch", serde.encode_args(ref), timeout_s=30).ok
        assert agent.blobs.has(sha) and agent.blobs.has(ref.sha256)
        agent.acknowledge(["r1"])  # pulled and acknowledged: now it may go
        ref2 = s.publish_blob(os.urandom(120_000))
        assert s.call("pi1", "blob_fetch", serde.encode_args(ref2), timeout_s=30).ok
        assert not agent.blobs.has(sha)
    finally:
        agent.stop()


# -- credentials -------------------------------------------------------------


@pytest.fixture
def password_broker(tmp_path):
    if broker_mod.mosquitto_path() is None:
        pytest.skip("mosquitto not installed")
    b = broker_mod.start(
        "mosquitto",
        "127.0.0.1",
        0,
        tmp_path / "pw",
        log_file=tmp_path / "pw.log",
        users={"pi1": "s3cret-pi", "coordinator": "s3cret-c"},
    )
    yield b
    b.stop()


def test_username_and_password(password_broker, session_factory, tmp_path, agents):
    secret = tmp_path / "pi1.password"
    secret.write_text("s3cret-pi\n")
    os.chmod(secret, 0o600)
    toml = tmp_path / "agent.toml"
    toml.write_text(f'username = "pi1"\npassword_file = "{secret}"\n')
    a = agents(password_broker.url, "pi1", "t", "--config", str(toml))
    s = session_factory(password_broker.url, "t", username="coordinator", password="s3cret-c")
    assert wait_until(lambda: "pi1" in s.online(), 15), a.log_text()
    assert s.call("pi1", "ping", timeout_s=10).ok
    # a wrong password or none: refused by the broker, and said so
    from coordinator.session import Session

    for kw in ({"username": "coordinator", "password": "wrong"}, {}):
        with pytest.raises(ConnectionError):
            Session(password_broker.url, "t", **kw).start(3)
    assert "not authorised" in password_broker.log_text().lower() or "bad user" in password_broker.log_text().lower()


def test_passwords_are_refused_where_they_would_leak(tmp_path):
    from edge_agent.common.link import Link

    with pytest.raises(ValueError, match="plain TCP"):
        Link("mqtt://10.9.8.7:1883", "c", on_message=lambda *a: None, username="u", password="p")
    Link(
        "mqtt://10.9.8.7:1883", "c", on_message=lambda *a: None, username="u", password="p", force_plain_password=True
    )  # forced: allowed (a trusted network)
    Link("mqtts://10.9.8.7:8883", "c", on_message=lambda *a: None, username="u", password="p")
    loose = tmp_path / "pw"
    loose.write_text("p\n")
    os.chmod(loose, 0o644)
    with pytest.raises(agent_settings.SettingsError, match="chmod 600"):
        agent_settings.load({"username": "u", "password_file": str(loose)}, environ={})
    with pytest.raises(agent_settings.SettingsError, match="plain TCP"):
        agent_settings.load({"broker": "mqtt://10.9.8.7", "username": "u"}, environ={"EDGEPRUNE_PASSWORD": "p"})
    assert "--password" not in [s.flag for s in agent_settings.SETTINGS if s.flag_ok]


# -- failover ------------------------------------------------------------------


def test_agent_and_coordinator_fail_over_to_the_next_broker(tmp_path, session_factory, agents):
    if broker_mod.mosquitto_path() is None:
        pytest.skip("mosquitto not installed")
    a = broker_mod.start("mosquitto", "127.0.0.1", 0, tmp_path / "A", log_file=tmp_path / "A.log")
    b = broker_mod.start("mosquitto", "127.0.0.1", 0, tmp_path / "B", log_file=tmp_path / "B.log")
    try:
        urls = f"{a.url},{b.url}"
        agent = agents(urls, "pi1", "t")
        s = session_factory(urls, "t", long_running=True)
        assert wait_until(lambda: "pi1" in s.online(), 10)
        assert s.link.address.url == a.url
        a.kill()  # the node both are on dies
        t0 = time.monotonic()
        assert wait_until(lambda: s.link.connected.is_set() and s.link.address.url == b.url, 20)
        reply = None
        while time.monotonic() - t0 < 30:
            reply = s.call("pi1", "ping", timeout_s=2)
            if reply.ok:
                break
        assert reply is not None and reply.ok, agent.log_text()[-2000:]
        print(f"failover: ping answered through the second broker {time.monotonic() - t0:.1f} s after the kill")
        assert abnormal_disconnects(b.log_text()) == []
    finally:
        a.stop()
        b.stop()
