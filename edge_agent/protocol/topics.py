"""MQTT topic scheme: builders, subscription filters and the one parser.

::

    edgeprune/v1/<fleet>/device/<id>/status   retained  online|busy|offline + heartbeat
    edgeprune/v1/<fleet>/device/<id>/caps     retained  capabilities
    edgeprune/v1/<fleet>/device/<id>/cmd                coordinator -> device commands
    edgeprune/v1/<fleet>/device/<id>/reply              device -> coordinator replies
    edgeprune/v1/<fleet>/device/<id>/data               device -> coordinator chunk frames
    edgeprune/v1/<fleet>/device/<id>/want               device -> coordinator: broadcast chunks it missed
    edgeprune/v1/<fleet>/coordinator/status   retained  coordinator online|offline
    edgeprune/v1/<fleet>/blob/<sha256>/<n>    retained  broadcast chunks (models, artifacts); re-sent
                                                        non-retained to devices that ask (``want``)

Every id that becomes a topic level passes :func:`validate_id`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .constants import TOPIC_ROOT, TOPIC_VERSION
from .errors import ErrorCode, ProtocolError

ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
DEVICE_CHANNELS = ("status", "caps", "cmd", "reply", "data", "want", "down")
"""``down`` (protocol 1.3): broadcast chunks re-sent to one device that asked for them (``blob_want``)."""
PREFIX = f"{TOPIC_ROOT}/{TOPIC_VERSION}"


def validate_id(value: object, what: str = "id") -> str:
    """Return ``value`` if it is a valid topic-level id, else raise BAD_TOPIC."""
    if not isinstance(value, str) or not ID_RE.match(value):
        raise ProtocolError(
            ErrorCode.BAD_TOPIC,
            f"invalid {what} {value!r}: use 1-64 characters from [A-Za-z0-9_-]",
        )
    return value


def validate_sha256(value: object) -> str:
    if not isinstance(value, str) or not SHA256_RE.match(value):
        raise ProtocolError(ErrorCode.BAD_FIELD, f"invalid sha256 {value!r}")
    return value


def device(fleet: str, device_id: str, channel: str) -> str:
    if channel not in DEVICE_CHANNELS:
        raise ValueError(f"unknown device channel {channel!r}")
    return f"{PREFIX}/{validate_id(fleet, 'fleet')}/device/{validate_id(device_id, 'device id')}/{channel}"


def device_filter(fleet: str, channel: str) -> str:
    """Subscription filter for one channel of every device in a fleet."""
    if channel not in DEVICE_CHANNELS:
        raise ValueError(f"unknown device channel {channel!r}")
    return f"{PREFIX}/{validate_id(fleet, 'fleet')}/device/+/{channel}"


def coordinator_status(fleet: str) -> str:
    return f"{PREFIX}/{validate_id(fleet, 'fleet')}/coordinator/status"


def blob_chunk(fleet: str, sha256: str, index: int) -> str:
    return f"{PREFIX}/{validate_id(fleet, 'fleet')}/blob/{validate_sha256(sha256)}/{int(index)}"


def blob_filter(fleet: str, sha256: str) -> str:
    return f"{PREFIX}/{validate_id(fleet, 'fleet')}/blob/{validate_sha256(sha256)}/+"


@dataclass(frozen=True)
class Topic:
    """A parsed topic. ``kind`` is ``device``, ``coordinator`` or ``blob``."""

    fleet: str
    kind: str
    device_id: str | None = None
    channel: str | None = None
    blob_sha256: str | None = None
    chunk_index: int | None = None


def parse(topic: str) -> Topic:
    """Parse and validate any edgeprune topic; raise BAD_TOPIC on anything else."""
    parts = topic.split("/")
    if len(parts) < 5 or parts[0] != TOPIC_ROOT or parts[1] != TOPIC_VERSION:
        raise ProtocolError(ErrorCode.BAD_TOPIC, f"not an edgeprune/{TOPIC_VERSION} topic: {topic!r}")
    fleet = validate_id(parts[2], "fleet")
    kind = parts[3]
    if kind == "device" and len(parts) == 6 and parts[5] in DEVICE_CHANNELS:
        return Topic(fleet, "device", device_id=validate_id(parts[4], "device id"), channel=parts[5])
    if kind == "coordinator" and len(parts) == 5 and parts[4] == "status":
        return Topic(fleet, "coordinator", channel="status")
    if kind == "blob" and len(parts) == 6 and parts[5].isdigit():
        return Topic(fleet, "blob", blob_sha256=validate_sha256(parts[4]), chunk_index=int(parts[5]))
    raise ProtocolError(ErrorCode.BAD_TOPIC, f"unknown topic layout: {topic!r}")
