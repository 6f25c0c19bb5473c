import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.protocol import args, serde
from edge_agent.protocol.constants import PROTOCOL_VERSION
from edge_agent.protocol.errors import ErrorCode, ProtocolError
from edge_agent.protocol.messages import ChunkFrame, Command, CoordinatorStatus, Reply, Status, error_dict


def test_status_round_trip():
    s = Status(device_id="pi1", state="online", ts=1.5, seq=3, heartbeat_s=10.0, task=None, agent_version="0.1.0")
    raw = serde.encode(s)
    obj = json.loads(raw)
    assert obj["v"] == PROTOCOL_VERSION and obj["type"] == "status"
    assert serde.decode(Status, raw) == s


def test_unknown_keys_tolerated_and_minor_versions_accepted():
    obj = json.loads(serde.encode(Command(id="r1", cmd="ping", ts=1.0)))
    obj["v"] = "1.7"
    obj["future_field"] = {"x": 1}
    cmd = serde.decode(Command, json.dumps(obj).encode())
    assert cmd.cmd == "ping" and cmd.args == {}


@pytest.mark.parametrize("version", ["2.0", "0.9", "", None, 1])
def test_wrong_major_version_refused(version):
    obj = json.loads(serde.encode(Command(id="r1", cmd="ping", ts=1.0)))
    obj["v"] = version
    with pytest.raises(ProtocolError) as e:
        serde.decode(Command, json.dumps(obj).encode())
    assert e.value.code == ErrorCode.BAD_VERSION


@pytest.mark.parametrize(
    "payload,code",
    [
        (b"\xff\xfe", ErrorCode.MALFORMED),
        (b"not json", ErrorCode.MALFORMED),
        (b"[1, 2]", ErrorCode.MALFORMED),
        (b'{"v":"1.0","type":"status","device_id":"a","state":"online"}', ErrorCode.BAD_FIELD),  # ts missing
        (b'{"v":"1.0","type":"status","device_id":"a","state":"online","ts":"now"}', ErrorCode.BAD_FIELD),
        (b'{"v":"1.0","type":"status","device_id":"a","state":"online","ts":1,"seq":true}', ErrorCode.BAD_FIELD),
        (b'{"v":"1.0","type":"cmd","device_id":"a"}', ErrorCode.MALFORMED),  # wrong type for Status
    ],
)
def test_bad_status_payloads(payload, code):
    with pytest.raises(ProtocolError) as e:
        serde.decode(Status, payload)
    assert e.value.code == code


def test_nan_is_not_a_valid_float():
    with pytest.raises(ProtocolError) as e:
        serde.decode(Status, b'{"v":"1.0","type":"status","device_id":"a","state":"online","ts":NaN}')
    assert e.value.code == ErrorCode.BAD_FIELD


def test_oversize_refused_before_parsing():
    payload = b'{"v":"1.0","type":"cmd","id":"r","cmd":"ping","ts":1,"args":{"pad":"' + b"x" * 2000 + b'"}}'
    with pytest.raises(ProtocolError) as e:
        serde.decode(Command, payload, max_bytes=1000)
    assert e.value.code == ErrorCode.TOO_LARGE
    assert serde.decode(Command, payload, max_bytes=4000).cmd == "ping"


def test_command_id_validated_and_peekable():
    with pytest.raises(ProtocolError) as e:
        serde.decode(Command, b'{"v":"1.0","type":"cmd","id":"bad id!","cmd":"ping","ts":1}')
    assert e.value.code == ErrorCode.BAD_TOPIC
    assert serde.peek_request_id(b'{"v":"9.0","id":"abc"}') == "abc"
    assert serde.peek_request_id(b'{"id":"bad id!"}') is None
    assert serde.peek_request_id(b"\x00garbage") is None


def test_reply_semantics():
    r = Reply(id="r1", device_id="d", kind="error", ts=1.0, error=error_dict(ErrorCode.BUSY, "busy"))
    back = serde.decode(Reply, serde.encode(r))
    assert not back.ok and back.error_code == "busy"
    with pytest.raises(ProtocolError):
        serde.decode(Reply, b'{"v":"1.0","type":"reply","id":"r","device_id":"d","kind":"weird","ts":1}')
    with pytest.raises(ProtocolError):
        serde.decode(Reply, b'{"v":"1.0","type":"reply","id":"r","device_id":"d","kind":"error","ts":1}')


def test_coordinator_status_round_trip():
    c = CoordinatorStatus(coordinator_id="c1", state="online", ts=2.0)
    assert serde.decode(CoordinatorStatus, serde.encode(c)) == c


@given(
    data=st.binary(max_size=2048),
    index=st.integers(0, 99),
    extra=st.integers(1, 50),
    req=st.one_of(st.none(), st.from_regex(r"\A[A-Za-z0-9_-]{1,20}\Z")),
)
def test_frame_round_trip(data, index, extra, req):
    f = ChunkFrame("cd" * 32, index, index + extra, 123456, data, req)
    assert serde.decode_frame(serde.encode_frame(f)) == f


@pytest.mark.parametrize(
    "mutate,code",
    [
        (lambda b: b"XXXX" + b[4:], ErrorCode.MALFORMED),
        (lambda b: b[:6], ErrorCode.MALFORMED),
        (lambda b: b[:4] + (10**6).to_bytes(4, "big") + b[8:], ErrorCode.MALFORMED),
    ],
)
def test_bad_frames(mutate, code):
    good = serde.encode_frame(ChunkFrame("cd" * 32, 0, 1, 3, b"abc"))
    with pytest.raises(ProtocolError) as e:
        serde.decode_frame(mutate(good))
    assert e.value.code == code


def test_frame_field_checks():
    with pytest.raises(ProtocolError) as e:
        serde.decode_frame(serde.encode_frame(ChunkFrame("cd" * 32, 5, 5, 3, b"abc")))
    assert e.value.code == ErrorCode.BAD_FIELD
    with pytest.raises(ProtocolError) as e:
        serde.decode_frame(serde.encode_frame(ChunkFrame("cd" * 32, 0, 1, 3, b"abcd")), max_chunk_bytes=3)
    assert e.value.code == ErrorCode.TOO_LARGE


def test_error_code_coerce():
    assert ErrorCode.coerce("busy") is ErrorCode.BUSY
    assert ErrorCode.coerce("from_the_future") is ErrorCode.INTERNAL


# -- command arguments (protocol.args) ---------------------------------------

SHA = "ab" * 32
ROUND = {"run_id": "r1", "round": 3, "model": {"sha256": SHA, "bytes": 10, "chunks": 1}}


def test_train_round_args_round_trip_and_defaults():
    a = serde.decode_args(args.TrainRound, "train_round", {**ROUND, "lr": 0.01, "targets": {"d/kernel": 0.5}})
    assert a.model == args.BlobRef(SHA, 10, 1) and a.lr == 0.01 and a.targets == {"d/kernel": 0.5}
    assert a.epochs == 1 and a.fetch_timeout_s == 300.0 and a.importance is None  # the agent's defaults
    again = serde.decode_args(args.TrainRound, "train_round", json.loads(json.dumps(serde.encode_args(a))))
    assert again == a
    assert "importance" not in serde.encode_args(a)  # None is left out: an older agent reads its default


def test_unknown_argument_keys_are_tolerated():
    a = serde.decode_args(args.Logs, "logs", {"since": 4, "colour": "blue"})
    assert a == args.Logs(since=4)


@pytest.mark.parametrize(
    "cls, cmd, bad, needle",
    [
        (args.TrainRound, "train_round", {**ROUND, "fetch_timeout_s": "soon"}, "'fetch_timeout_s' must be float"),
        (args.TrainRound, "train_round", {**ROUND, "fetch_timeout_s": -1}, "fetch_timeout_s must be a positive"),
        (args.TrainRound, "train_round", {**ROUND, "round": True}, "'round' must be int"),
        (args.TrainRound, "train_round", {**ROUND, "targets": {"k": "half"}}, "'targets' must map names to float"),
        (args.TrainRound, "train_round", {**ROUND, "targets": {"k": 1.5}}, "sparsity target"),
        (args.TrainRound, "train_round", {"run_id": "r1", "round": 1}, "missing argument 'model'"),
        (args.TrainRound, "train_round", {**ROUND, "model": {"bytes": 3}}, "missing argument 'model.sha256'"),
        (args.TrainRound, "train_round", {**ROUND, "model": "abc"}, "'model' must be an object"),
        (args.Bench, "bench", {"artifacts": []}, "non-empty list"),
        (args.Bench, "bench", {"artifacts": [{"name": "a", "sha256": SHA, "bytes": "9"}]}, "'artifacts[0].bytes'"),
        (args.Bench, "bench", {"artifacts": [{"name": "a", "sha256": SHA, "bytes": 9}], "runs": 0}, "positive"),
        (args.BlobGet, "blob_get", {"sha256": SHA, "chunks": [1, -2]}, "chunk indices"),
        (args.BlobGet, "blob_get", {"sha256": SHA, "chunks": ["1"]}, "'chunks[0]' must be int"),
        (args.Ack, "ack", {"ids": "r1"}, "'ids' must be a list"),
        (args.Sleep, "sleep", {"seconds": float("inf")}, "'seconds' must be float"),
    ],
)
def test_bad_arguments_are_bad_args_with_the_argument_named(cls, cmd, bad, needle):
    with pytest.raises(ProtocolError) as e:
        serde.decode_args(cls, cmd, bad)
    assert e.value.code in (ErrorCode.BAD_ARGS, ErrorCode.BAD_FIELD) and needle in e.value.message, e.value.message
    assert e.value.message.startswith(cmd) or "sha256" in e.value.message


def test_a_bad_hash_inside_an_argument_is_refused():
    with pytest.raises(ProtocolError):
        serde.decode_args(args.TrainRound, "train_round", {**ROUND, "model": {"sha256": "nothex"}})


# -- chunk frame versions -----------------------------------------------------------


def test_both_frame_versions_round_trip_and_differ_only_in_magic_and_byte_order():
    f = ChunkFrame("cd" * 32, 2, 5, 1000, b"chunk", "r9")
    new, old = serde.encode_frame(f), serde.encode_frame(f, 1)
    assert new[:4] == b"EPF2" and old[:4] == b"EPF1"
    assert new[4:8] == old[4:8][::-1] and new[8:] == old[8:]  # the length in the other byte order
    assert serde.decode_frame(new) == serde.decode_frame(old) == f


def test_a_frame_written_by_a_1_1_peer_is_still_read():
    header = b'{"v":"1.1","blob":"' + b"cd" * 32 + b'","i":0,"n":1,"size":3,"req":null}'
    legacy = b"EPF1" + len(header).to_bytes(4, "big") + header + b"abc"  # as protocol 1.1 wrote it
    assert serde.decode_frame(legacy) == ChunkFrame("cd" * 32, 0, 1, 3, b"abc")


@pytest.mark.parametrize(
    "version, frame", [("1.2", 2), ("1.10", 2), ("2.0", 2), ("1.1", 1), ("1.0", 1), (None, 1), ("junk", 1)]
)
def test_the_frame_version_a_peer_reads(version, frame):
    assert serde.frame_version_for(version) == frame
