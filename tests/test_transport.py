"""One writer per MQTT socket, and exact bytes when sends are partial and acknowledgements late.

The agent and the coordinator run in this process (so the test can watch every
``send()`` paho makes) against a real Mosquitto on a loopback port, while
commands, replies, heartbeats, acknowledgements and blob chunks are published
from several threads at once: the MQTT network thread, the agent's io pool and
heartbeat thread, and three caller threads on the coordinator side.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import paho.mqtt.client as mqtt
import pytest

from edge_agent.daemon import Agent
from edge_agent.protocol import serde

from .conftest import wait_until
from .helpers.brokerlog import abnormal_disconnects
from .helpers.inproc import in_process_agent


def _agent(url: str, tmp_path, **over) -> Agent:
    return in_process_agent(url, tmp_path / "a", heartbeat_s=0.05, chunk_bytes=64 * 1024, **over)


@pytest.fixture
def watched_sends(monkeypatch):
    """Every socket send paho makes: (client id, socket, thread name, bytes)."""
    sends: list[tuple[str, int, str, int]] = []
    original = mqtt.Client._sock_send

    def record(self, buf):
        sends.append((self._client_id.decode(), id(self._sock), threading.current_thread().name, len(buf)))
        return original(self, buf)

    monkeypatch.setattr(mqtt.Client, "_sock_send", record)
    return sends


def _exercise(session, agent, rounds: int = 6) -> list[bytes]:
    """Traffic from many threads at once; returns the blobs pulled back."""
    blobs = [os.urandom(300_000 + i * 7919) for i in range(rounds)]
    shas = [agent.blobs.put(b) for b in blobs]
    ref = session.publish_blob(os.urandom(200_000))
    got: list[bytes] = []
    with ThreadPoolExecutor(3) as pool:
        pings = [pool.submit(session.call, "pi1", "ping", None, 10.0) for _ in range(30)]
        fetch = pool.submit(session.call, "pi1", "blob_fetch", serde.encode_args(ref), 30.0)
        for sha, blob in zip(shas, blobs):
            got.append(session.fetch_blob("pi1", sha, timeout_s=30, expected_bytes=len(blob)))
        assert all(p.result().ok for p in pings)
        assert fetch.result().ok, fetch.result().error
    return got


def test_exactly_one_thread_writes_each_socket(mosquitto, session_factory, tmp_path, watched_sends):
    agent = _agent(mosquitto.url, tmp_path)
    agent.start()
    try:
        s = session_factory(mosquitto.url, "t", long_running=True)
        assert wait_until(lambda: "pi1" in s.online(), 10)
        del watched_sends[:]  # from here on: after connect, every thread busy
        blobs = _exercise(s, agent)
        assert [hashlib.sha256(b).hexdigest() for b in blobs] == [
            hashlib.sha256(agent.blobs.get(sha)).hexdigest() for sha in (hashlib.sha256(b).hexdigest() for b in blobs)
        ]
    finally:
        agent.stop()
    writers: dict[tuple[str, int], set[str]] = defaultdict(set)
    for client, sock, thread, _ in watched_sends:
        writers[(client, sock)].add(thread)
    assert {c for c, _ in writers} >= {"ep-t-pi1", f"ep-t-{s.coordinator_id}"}
    for (client, _), threads in writers.items():
        assert len(threads) == 1, f"{client}: socket written by {sorted(threads)}"
        assert next(iter(threads)).startswith("paho-mqtt-client-"), threads


def test_partial_sends_and_late_acknowledgements_keep_bytes_exact(mosquitto, session_factory, tmp_path, monkeypatch):
    """A young TCP connection behind a slow link: every send() is partial, and a PUBACK is held back long
    enough that, with two writers, it would land inside a chunk (what corrupted blobs before)."""
    original = mqtt.Client._sock_send

    def slow_partial(self, buf):
        if len(buf) == 4 and buf[0] == 0x40:  # a PUBACK: late, as if its thread had been descheduled
            time.sleep(0.01)
            return original(self, buf)
        time.sleep(0.0005)
        return original(self, bytes(buf[:1400]))  # one TCP segment per call

    monkeypatch.setattr(mqtt.Client, "_sock_send", slow_partial)
    agent = _agent(mosquitto.url, tmp_path)
    agent.start()
    try:
        s = session_factory(mosquitto.url, "t", long_running=True)
        assert wait_until(lambda: "pi1" in s.online(), 10)
        blobs = [os.urandom(107_433 + i) for i in range(10)]
        for blob in blobs:
            sha = agent.blobs.put(blob)
            assert s.fetch_blob("pi1", sha, timeout_s=60, expected_bytes=len(blob)) == blob
            assert s.call("pi1", "ping", timeout_s=10).ok
        assert s.stats.rejected_in == 0
    finally:
        agent.stop()
    time.sleep(0.2)
    assert abnormal_disconnects(mosquitto.log_text()) == []


def test_stopping_paho_loop_survives_its_thread_ending_at_the_same_time():
    """paho's loop_stop reads ``_thread`` twice; its thread clears it on exit. Reproduced deterministically:
    the thread object clears it between the two reads, as a network thread ending at that moment does."""
    from edge_agent.common.link import stop_loop

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)

    def racing_thread():
        done = threading.Event()
        real = threading.Thread(target=lambda: done.wait(5) and time.sleep(0.2), daemon=True)
        real.start()

        class EndsDuringTheCheck:
            def __ne__(self, other):  # loop_stop's `current_thread() != self._thread`: the thread exits now
                client._thread = None
                done.set()
                return True

            def join(self, timeout=None):
                real.join(timeout)

        client._thread = EndsDuringTheCheck()
        return real

    racing_thread()
    with pytest.raises(AttributeError):  # what paho does on its own
        mqtt.Client.loop_stop(client)
    real = racing_thread()
    stop_loop(client)  # ours: no exception, and it returns only once the thread has ended
    assert not real.is_alive()
