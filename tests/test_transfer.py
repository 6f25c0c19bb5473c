"""Blob transfer, pure logic: what a pull accepts, what it drops, what it asks for again."""

import random
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.common import transfer
from edge_agent.common.blobs import split
from edge_agent.protocol.errors import ErrorCode, ProtocolError
from edge_agent.protocol.messages import ChunkFrame


def _frames(data: bytes, chunk: int, rid: str | None = None) -> list[ChunkFrame]:
    return list(split(data, chunk, request_id=rid))


@settings(max_examples=50)
@given(data=st.binary(max_size=5000), chunk=st.integers(1, 700), seed=st.integers(0, 1000))
def test_any_order_with_duplicates(data, chunk, seed):
    frames = _frames(data, chunk, "r1")
    shuffled = frames + frames[: len(frames) // 2]  # QoS 1 duplicates
    random.Random(seed).shuffle(shuffled)
    rx = transfer.Receiver()
    pull = rx.open(frames[0].blob_sha256, "dev", expected_bytes=len(data))
    rx.expect(pull, "r1")
    for f in shuffled:
        rx.feed(f, "dev")
    assert pull.done.is_set() and pull.result() == data and pull.pending_bytes == 0


def _failed(pull) -> ErrorCode:
    assert pull.done.is_set()
    with pytest.raises(ProtocolError) as e:
        pull.result()
    return e.value.code


def test_hash_mismatch_and_foreign_bytes():
    data = b"hello world" * 100
    frames = _frames(data, 100)
    pull = transfer.Pull(frames[0].blob_sha256, "dev")
    bad = ChunkFrame(frames[3].blob_sha256, 3, frames[3].count, frames[3].total_bytes, b"x" * len(frames[3].data))
    for f in frames[:3] + [bad] + frames[4:]:
        pull.add(f)
    assert _failed(pull) == ErrorCode.INTEGRITY and pull.pending_bytes == 0
    # four foreign bytes inside a chunk (the PUBACK race): more bytes than announced
    pull = transfer.Pull(frames[0].blob_sha256, "dev")
    for f in frames[:-1]:
        pull.add(f)
    pull.add(
        ChunkFrame(
            frames[-1].blob_sha256,
            frames[-1].index,
            frames[-1].count,
            frames[-1].total_bytes,
            b"\x40\x02\x00\x07" + frames[-1].data,
        )
    )
    assert _failed(pull) == ErrorCode.INTEGRITY


def test_expected_size_bounds_the_pull():
    frames = _frames(b"a" * 1000, 100)
    sha = frames[0].blob_sha256
    pull = transfer.Pull(sha, "dev", expected_bytes=1000)  # the peer's result said 1000 bytes
    pull.add(ChunkFrame(sha, 0, 8, (1 << 30) * 8, b"a" * 100))  # a frame claiming 8 GiB
    assert _failed(pull) == ErrorCode.INTEGRITY
    with pytest.raises(ProtocolError) as e:
        transfer.Pull(sha, "dev", expected_bytes=2000, max_bytes=1500)
    assert e.value.code == ErrorCode.TOO_LARGE
    pull = transfer.Pull(sha, "dev", max_bytes=500)  # no expectation: the limit still holds
    pull.add(frames[0])
    assert _failed(pull) == ErrorCode.TOO_LARGE
    pull = transfer.Pull(sha, "dev")
    pull.add(frames[0])
    pull.add(ChunkFrame(sha, 1, 99, 1000, frames[1].data))  # inconsistent count
    assert _failed(pull) == ErrorCode.INTEGRITY
    pull = transfer.Pull(sha, "dev")
    pull.add(ChunkFrame(sha, 0, 1, 10_000_000, b"a"))  # one chunk cannot hold 10 MB
    assert _failed(pull) == ErrorCode.BAD_FIELD
    pull = transfer.Pull(sha, "dev")
    other = _frames(b"b" * 1000, 100)[0]
    pull.add(other)  # a chunk of another blob
    assert _failed(pull) == ErrorCode.BAD_FIELD


def test_late_chunks_cannot_recreate_a_closed_pull():
    data = bytes(range(256)) * 8
    frames = _frames(data, 256, "r1")
    rx = transfer.Receiver()
    pull = rx.open(frames[0].blob_sha256, "dev")
    rx.expect(pull, "r1")
    assert rx.feed(frames[0], "dev")
    rx.close(pull)
    assert _failed(pull) == ErrorCode.TIMEOUT and pull.pending_bytes == 0
    assert not any(rx.feed(f, "dev") for f in frames)  # nobody waits for them any more
    assert rx.pending_bytes == 0


def test_expired_pull_frees_memory_and_drops_chunks():
    frames = _frames(b"z" * 1000, 100, "r1")
    rx = transfer.Receiver()
    pull = rx.open(frames[0].blob_sha256, "dev", deadline_s=0.0)
    rx.expect(pull, "r1")
    assert not rx.feed(frames[0], "dev")
    assert _failed(pull) == ErrorCode.TIMEOUT and rx.pending_bytes == 0


def test_two_pulls_of_one_blob_do_not_mix():
    data = b"0123456789" * 50
    rx = transfer.Receiver()
    sha = _frames(data, 100)[0].blob_sha256
    a, b = rx.open(sha, "dev"), rx.open(sha, "dev")
    rx.expect(a, "ra")
    rx.expect(b, "rb")
    for f in _frames(data, 100, "ra"):
        rx.feed(f, "dev")
    assert a.result() == data and not b.done.is_set()  # b's chunks are its own
    assert b.progress() == (0, 0)
    for f in _frames(data, 50, "rb"):  # a different chunking: only consistent within one pull
        rx.feed(f, "dev")
    assert b.result() == data
    # a frame from another device with a known request id is not taken
    c = rx.open(sha, "dev")
    rx.expect(c, "rc")
    assert not rx.feed(_frames(data, 100, "rc")[0], "intruder")


def test_broadcast_pull_is_shared():
    data = b"m" * 300
    rx = transfer.Receiver()
    sha = _frames(data, 100)[0].blob_sha256
    a = rx.open(sha, "broadcast", broadcast=True)
    b = rx.open(sha, "broadcast", broadcast=True)
    assert a is b and a.users == 2
    rx.close(a)
    for f in _frames(data, 100):  # retained chunks carry no request id
        rx.feed(f, "broadcast")
    assert b.result() == data
    rx.close(b)


def test_wait_asks_for_the_missing_chunks_only():
    data = bytes(random.Random(1).randbytes(1000))
    frames = _frames(data, 100, "r1")
    rx = transfer.Receiver()
    pull = rx.open(frames[0].blob_sha256, "dev", expected_bytes=len(data))
    rx.expect(pull, "r1")
    for f in frames:
        if f.index not in (2, 7):  # lost on the way
            rx.feed(f, "dev")
    asked = []

    def ask(missing):
        asked.append(missing)
        for f in frames:
            if f.index in (missing or []):
                threading.Timer(0.01, rx.feed, (f, "dev")).start()

    assert transfer.wait(pull, 5.0, ask, first_ask_s=0.1, idle_s=0.1) == data
    assert asked == [[2, 7]] and pull.asks == 1


def test_wait_asks_for_all_when_nothing_came_and_times_out_with_progress():
    frames = _frames(b"q" * 500, 100)
    pull = transfer.Pull(frames[0].blob_sha256, "dev")
    asked = []
    with pytest.raises(ProtocolError) as e:
        transfer.wait(pull, 0.5, asked.append, first_ask_s=0.1, idle_s=0.1, max_idle_s=0.2)
    assert e.value.code == ErrorCode.TIMEOUT and "0/0 chunks" in e.value.message
    assert asked and all(a is None for a in asked) and 2 <= len(asked) <= 4  # repeats back off


class _DeadLink:
    """A Link whose broker never acknowledges: publish returns paho's 'not connected'."""

    def publish(self, topic, payload, retain=False):
        import paho.mqtt.client as mqtt

        info = mqtt.MQTTMessageInfo(1)
        info.rc = mqtt.MQTT_ERR_NO_CONN
        return info


def test_a_publish_that_is_never_acknowledged_is_an_error():
    with pytest.raises(ProtocolError) as e:
        transfer.send_frames(_DeadLink(), _frames(b"x" * 300, 100), "t", timeout_s=0.2)
    assert e.value.code == ErrorCode.TIMEOUT
