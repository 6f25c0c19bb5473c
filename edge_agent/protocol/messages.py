"""Control messages: frozen dataclasses, one per message type.

Each travels as a JSON object ``{"v": "<protocol version>", "type": TYPE, ...fields}``
(see :mod:`.serde`). Unknown keys are dropped on decode so agents and
coordinators of different minor versions interoperate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import ErrorCode

DEVICE_STATES = ("online", "busy", "offline")
REPLY_KINDS = ("accepted", "progress", "result", "error")


@dataclass(frozen=True)
class Status:
    """Retained on ``device/<id>/status``; re-published at every heartbeat."""

    TYPE: ClassVar[str] = "status"
    device_id: str
    state: str
    ts: float
    seq: int = 0
    heartbeat_s: float = 0.0
    uptime_s: float = 0.0
    task: str | None = None
    agent_version: str = ""


@dataclass(frozen=True)
class Capabilities:
    """Retained on ``device/<id>/caps``: what the device is and what it can run."""

    TYPE: ClassVar[str] = "caps"
    device_id: str
    agent_version: str
    protocol_version: str
    os: str
    os_release: str
    arch: str
    cpu_model: str
    cpu_cores: int
    python_version: str
    ram_total_bytes: int
    ram_available_bytes: int
    disk_free_bytes: int
    ts: float
    cpu_max_mhz: float | None = None
    runtimes: dict[str, Any] = field(default_factory=dict)
    can_train: bool = False
    train_stack: dict[str, Any] = field(default_factory=dict)
    has_data: bool | None = None  # training data configured (None: an agent older than protocol 1.1)
    sensors: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Command:
    """Coordinator -> device. ``id`` is echoed in every reply to it."""

    TYPE: ClassVar[str] = "cmd"
    id: str
    cmd: str
    ts: float
    args: dict[str, Any] = field(default_factory=dict)
    timeout_s: float | None = None
    to: str | None = None  # the device it is for: signed, so a captured command cannot be aimed at another
    sig: str | None = None  # Ed25519 by the coordinator, over signing.canonical(); required in a secure fleet


@dataclass(frozen=True)
class Reply:
    """Device -> coordinator. ``kind`` is accepted, progress, result or error."""

    TYPE: ClassVar[str] = "reply"
    id: str | None
    device_id: str
    kind: str
    ts: float
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    sig: str | None = None  # Ed25519 by the device, over signing.canonical()

    @property
    def ok(self) -> bool:
        return self.kind != "error"

    @property
    def error_code(self) -> str | None:
        return (self.error or {}).get("code")

    @property
    def error_message(self) -> str | None:
        return (self.error or {}).get("message")


@dataclass(frozen=True)
class CoordinatorStatus:
    """On ``coordinator/status``. Agents re-announce whenever they see ``online``.

    A long-running coordinator (train, bench) publishes it retained with a Will;
    one-shot queries (devices, ping) publish it non-retained as a discovery probe.
    """

    TYPE: ClassVar[str] = "coordinator"
    coordinator_id: str
    state: str
    ts: float


@dataclass(frozen=True)
class BlobWant:
    """Device -> coordinator on ``device/<id>/want``: chunks of a broadcast blob that did not arrive.

    Brokers that do not replay retained messages to wildcard subscriptions (RabbitMQ)
    or replicate them late (ejabberd) deliver none of ``blob/<sha>/+``; the coordinator
    answers with ordinary (non-retained) chunks. ``chunks`` None means all of them.
    """

    TYPE: ClassVar[str] = "blob_want"
    device_id: str
    sha256: str
    ts: float
    chunks: list[int] | None = None


@dataclass(frozen=True)
class ChunkFrame:
    """One piece of a blob. Travels as a binary frame, not JSON (see serde)."""

    blob_sha256: str
    index: int
    count: int
    total_bytes: int
    data: bytes
    request_id: str | None = None


def error_dict(code: ErrorCode | str, message: str) -> dict[str, Any]:
    return {"code": ErrorCode(code).value, "message": message}


MESSAGE_TYPES = {cls.TYPE: cls for cls in (Status, Capabilities, Command, Reply, CoordinatorStatus, BlobWant)}
