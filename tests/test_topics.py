import pytest

from edge_agent.protocol import topics
from edge_agent.protocol.errors import ErrorCode, ProtocolError

SHA = "ab" * 32


def test_builders_and_parser_round_trip():
    t = topics.device("fleet-1", "pi_4", "cmd")
    assert t == "edgeprune/v1/fleet-1/device/pi_4/cmd"
    p = topics.parse(t)
    assert (p.fleet, p.kind, p.device_id, p.channel) == ("fleet-1", "device", "pi_4", "cmd")
    p = topics.parse(topics.coordinator_status("f"))
    assert (p.kind, p.channel) == ("coordinator", "status")
    p = topics.parse(topics.blob_chunk("f", SHA, 3))
    assert (p.kind, p.blob_sha256, p.chunk_index) == ("blob", SHA, 3)


@pytest.mark.parametrize("bad", ["", "a b", "a/b", "a+b", "#", "x" * 65, "dévice", "a.b"])
def test_invalid_ids_refused(bad):
    with pytest.raises(ProtocolError) as e:
        topics.device("fleet", bad, "status")
    assert e.value.code == ErrorCode.BAD_TOPIC


@pytest.mark.parametrize(
    "topic",
    [
        "edgeprune/v1/f/device/a b/status",
        "edgeprune/v2/f/device/a/status",
        "other/v1/f/device/a/status",
        "edgeprune/v1/f/device/a/unknown",
        "edgeprune/v1/f/device/a",
        "edgeprune/v1/f/blob/notasha/0",
        "edgeprune/v1/f/blob/" + SHA + "/x",
        "edgeprune/v1/f/coordinator/other",
    ],
)
def test_parser_rejects_bad_topics(topic):
    with pytest.raises(ProtocolError) as e:
        topics.parse(topic)
    assert e.value.code in (ErrorCode.BAD_TOPIC, ErrorCode.BAD_FIELD)


def test_filters():
    assert topics.device_filter("f", "status") == "edgeprune/v1/f/device/+/status"
    assert topics.blob_filter("f", SHA) == f"edgeprune/v1/f/blob/{SHA}/+"
    with pytest.raises(ValueError):
        topics.device_filter("f", "nope")
