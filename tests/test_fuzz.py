"""Fuzzing the parsers both sides use, then a real agent through a real broker.

More than 10,000 generated inputs: JSON control messages (random bytes, random
JSON, valid messages with fields replaced, removed or added, wrong versions),
binary chunk frames and sparse-tensor bundles (valid ones with bytes flipped,
cut or inserted), and topics. The contract: a parser returns a valid object or
raises ProtocolError with an ErrorCode; nothing else escapes.
"""

from __future__ import annotations

import json
import os
import queue
import random
import time

import numpy as np
import paho.mqtt.client as mqtt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.protocol import codec, serde, topics
from edge_agent.protocol.constants import PROTOCOL_VERSION
from edge_agent.protocol.errors import ErrorCode, ProtocolError
from edge_agent.protocol.messages import Capabilities, ChunkFrame, Command, CoordinatorStatus, Reply, Status

from .conftest import wait_until

# The same cases every run, so CI is reproducible; EDGEPRUNE_FUZZ_RANDOM=1 explores new ones.
FUZZ = settings(
    max_examples=3000,
    deadline=None,
    database=None,
    derandomize=os.environ.get("EDGEPRUNE_FUZZ_RANDOM") != "1",
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
COUNT: dict[str, int] = {}

VALID = {
    Command: serde.encode(Command(id="r1", cmd="ping", ts=1.0, args={"a": 1})),
    Reply: serde.encode(Reply(id="r1", device_id="d", kind="result", ts=1.0, result={"ok": 1})),
    Status: serde.encode(Status(device_id="d", state="online", ts=1.0)),
    CoordinatorStatus: serde.encode(CoordinatorStatus(coordinator_id="c", state="online", ts=1.0)),
    Capabilities: serde.encode(
        Capabilities(
            device_id="d",
            agent_version="0",
            protocol_version=PROTOCOL_VERSION,
            os="Linux",
            os_release="x",
            arch="aarch64",
            cpu_model="c",
            cpu_cores=4,
            python_version="3.11",
            ram_total_bytes=1,
            ram_available_bytes=1,
            disk_free_bytes=1,
            ts=1.0,
        )
    ),
}
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _typed(fn, *args, **kwargs):
    """Call a parser; only a result or a ProtocolError with a real ErrorCode is acceptable."""
    try:
        return fn(*args, **kwargs)
    except ProtocolError as exc:
        assert isinstance(exc.code, ErrorCode) and exc.message
        return exc


def _mutate(data: bytes, rnd: random.Random, ops: int) -> bytes:
    b = bytearray(data)
    for _ in range(ops):
        op = rnd.randrange(4)
        if op == 0 and b:
            b[rnd.randrange(len(b))] = rnd.randrange(256)
        elif op == 1 and b:
            del b[rnd.randrange(len(b)) :]
        elif op == 2:
            pos = rnd.randrange(len(b) + 1)
            b[pos:pos] = rnd.randbytes(rnd.randrange(1, 9))
        elif b:
            i = rnd.randrange(len(b))
            b[i] ^= 1 << rnd.randrange(8)
    return bytes(b)


@st.composite
def control_payloads(draw):
    cls = draw(st.sampled_from(list(VALID)))
    how = draw(st.integers(0, 4))
    if how == 0:
        return cls, draw(st.binary(max_size=300))
    if how == 1:
        return cls, json.dumps(draw(JSON)).encode()
    obj = json.loads(VALID[cls])
    if how == 2:  # replace or delete fields
        for key in draw(st.lists(st.sampled_from(sorted(obj)), max_size=3)):
            if draw(st.booleans()):
                obj[key] = draw(JSON)
            else:
                obj.pop(key, None)
    elif how == 3:  # extra fields and versions from elsewhere
        obj.update(draw(st.dictionaries(st.text(max_size=8), JSON, max_size=3)))
        obj["v"] = draw(st.one_of(st.text(max_size=6), st.integers(), st.none()))
    else:  # valid JSON, then bytes mutated
        return cls, _mutate(
            json.dumps(obj).encode(), random.Random(draw(st.integers(0, 2**32))), draw(st.integers(1, 4))
        )
    return cls, json.dumps(obj, allow_nan=True).encode()


def test_control_messages_4000():
    @settings(FUZZ, max_examples=4000)
    @given(control_payloads())
    def run(case):
        cls, payload = case
        COUNT["control"] = COUNT.get("control", 0) + 1
        out = _typed(serde.decode, cls, payload)
        assert isinstance(out, (cls, ProtocolError))
        rid = serde.peek_request_id(payload)  # used to address the error reply: must never raise
        assert rid is None or isinstance(rid, str)

    run()
    assert COUNT["control"] >= 4000


FRAME = serde.encode_frame(ChunkFrame("ab" * 32, 1, 3, 1000, b"x" * 200, "r1"))


def test_chunk_frames_3000():
    @FUZZ
    @given(st.integers(0, 2**32), st.integers(1, 6), st.booleans(), st.binary(max_size=400))
    def run(seed, ops, raw, junk):
        COUNT["frame"] = COUNT.get("frame", 0) + 1
        payload = junk if raw else _mutate(FRAME, random.Random(seed), ops)
        out = _typed(serde.decode_frame, payload)
        assert isinstance(out, (ChunkFrame, ProtocolError))

    run()
    assert COUNT["frame"] >= 3000


def _bundle():
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(16, 8)).astype(np.float32)
    mask = rng.random(kernel.shape) > 0.8
    bias = rng.normal(size=(8,)).astype(np.float32)
    ref = [kernel, bias]
    data = codec.encode(
        [kernel * mask, bias + 0.1],
        names=["k", "b"],
        masks=[mask, None],
        kind="update",
        values="int4",
        reference=ref,
        reference_masks=[mask, None],
    )
    return data, ref, [mask, None]


BUNDLE, REF, REF_MASKS = _bundle()


def test_tensor_bundles_3000():
    @FUZZ
    @given(st.integers(0, 2**32), st.integers(1, 5), st.booleans())
    def run(seed, ops, with_reference):
        COUNT["bundle"] = COUNT.get("bundle", 0) + 1
        payload = _mutate(BUNDLE, random.Random(seed), ops)
        kwargs = {"reference": REF, "reference_masks": REF_MASKS} if with_reference else {}
        out = _typed(codec.decode, payload, **kwargs)
        assert isinstance(out, (codec.Bundle, ProtocolError))

    run()
    assert COUNT["bundle"] >= 3000


def test_topics_1000():
    good = topics.device("f", "d", "reply")

    @settings(FUZZ, max_examples=1000)
    @given(
        st.one_of(
            st.text(max_size=80),
            st.integers(0, 2**32).map(lambda s: _mutate(good.encode(), random.Random(s), 3).decode("utf-8", "replace")),
        )
    )
    def run(topic):
        COUNT["topic"] = COUNT.get("topic", 0) + 1
        assert isinstance(_typed(topics.parse, topic), (topics.Topic, ProtocolError))

    run()
    assert COUNT["topic"] >= 1000


def test_agent_stays_up_under_raw_garbage(mosquitto, agents, session_factory):
    """Garbage on every topic the agent listens to, through a real Mosquitto: each garbage command
    gets a typed error reply, the rest is ignored, and the agent still answers a ping."""
    agent = agents(mosquitto.url, "fuzzed")
    s = session_factory(mosquitto.url)
    assert s.wait_online(1, 15) == ["fuzzed"]
    replies: queue.Queue = queue.Queue()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    c.on_message = lambda cl, u, m: replies.put(m.payload)
    c.connect("127.0.0.1", mosquitto.port)
    c.subscribe(topics.device("test", "fuzzed", "reply"), qos=1)
    c.loop_start()
    time.sleep(0.3)
    rnd = random.Random(7)
    sent_cmds = 0
    for i in range(1500):
        kind = i % 3
        payload = _mutate(VALID[Command], rnd, rnd.randint(1, 6)) if i % 2 else rnd.randbytes(rnd.randrange(400))
        if kind == 0:
            topic = topics.device("test", "fuzzed", "cmd")
            try:  # a mutation may by chance still be a valid command: those get real replies, not errors
                serde.decode(Command, payload)
                continue
            except ProtocolError:
                sent_cmds += 1
        elif kind == 1:
            topic = topics.coordinator_status("test")
        else:
            topic = topics.blob_chunk("test", "%064x" % rnd.getrandbits(256), rnd.randrange(5))
        c.publish(topic, payload, qos=1)
    errors = 0
    deadline = time.monotonic() + 30
    while errors < sent_cmds and time.monotonic() < deadline:
        try:
            reply = serde.decode(Reply, replies.get(timeout=1))
        except queue.Empty:
            continue
        assert reply.kind == "error" and ErrorCode.coerce(reply.error_code) is not ErrorCode.INTERNAL, reply
        errors += 1
    c.loop_stop()
    c.disconnect()
    assert errors == sent_cmds > 400
    assert agent.alive()
    assert wait_until(lambda: s.call("fuzzed", "ping", timeout_s=5).ok, 10)
