"""Typed arguments of the commands a coordinator sends, one frozen dataclass per command.

A :class:`~.messages.Command` carries its arguments as a JSON object; the agent decodes
it into the command's class with :func:`.serde.decode_args` (types checked from the
hints, unknown keys ignored, a wrong type or value a ``bad_args`` reply) and the
coordinator builds the same class and encodes it with :func:`.serde.encode_args`, so
an argument one side sends and the other never reads cannot exist. The defaults are
the agent's: a field left out (an older coordinator) means its default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from .constants import MAX_DELTA_CHAIN, MAX_WANTED_CHUNKS
from .errors import ErrorCode, ProtocolError
from .topics import validate_id, validate_sha256


def _bad(cmd: str, message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_ARGS, f"{cmd}: {message}")


def _non_negative(cmd: str, **values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 0:
            raise _bad(cmd, f"{name} must be a non-negative integer")


def _chunk_list(cmd: str, chunks: list[int] | None) -> None:
    if chunks is not None and (len(chunks) > MAX_WANTED_CHUNKS or any(i < 0 for i in chunks)):
        raise _bad(cmd, f"chunks must be a list of at most {MAX_WANTED_CHUNKS} chunk indices")


@dataclass(frozen=True)
class BlobRef:
    """A blob the device fetches by hash; its size and chunk count bound the download."""

    sha256: str
    bytes: int | None = None
    chunks: int | None = None

    def check(self, cmd: str) -> None:
        validate_sha256(self.sha256)
        _non_negative(cmd, bytes=self.bytes, chunks=self.chunks)


@dataclass(frozen=True)
class DeltaLink:
    """One broadcast of a catch-up chain: the blob, and the model (digest) it applies to; None: to nothing
    (a model on its own, such as a run's seeded first model)."""

    blob: BlobRef
    base: str | None = None

    def check(self, cmd: str) -> None:
        self.blob.check(cmd)
        if self.base is not None:
            validate_sha256(self.base)


@dataclass(frozen=True)
class Artifact:
    """One TFLite artifact to benchmark."""

    name: str
    sha256: str
    bytes: int

    def check(self, cmd: str) -> None:
        validate_sha256(self.sha256)
        _non_negative(cmd, bytes=self.bytes)


@dataclass(frozen=True)
class NoArgs:
    """Commands without arguments (ping, caps, commands, train_end, train_status)."""

    def check(self, cmd: str) -> None:
        pass


@dataclass(frozen=True)
class Ack:
    TYPE: ClassVar[str] = "ack"
    ids: list[str]

    def check(self, cmd: str) -> None:
        if len(self.ids) > 1000:
            raise _bad(cmd, "ids must be a list of at most 1000 request ids")


@dataclass(frozen=True)
class BlobGet:
    TYPE: ClassVar[str] = "blob_get"
    sha256: str
    chunks: list[int] | None = None  # None: every chunk
    frame: int = 1  # the chunk frame version the coordinator reads (1.2: 2; older ones send none)

    def check(self, cmd: str) -> None:
        validate_sha256(self.sha256)
        _chunk_list(cmd, self.chunks)
        if self.frame not in (1, 2):
            raise _bad(cmd, "frame must be 1 or 2")


@dataclass(frozen=True)
class BlobFetch:
    TYPE: ClassVar[str] = "blob_fetch"
    sha256: str
    timeout_s: float = 120.0
    bytes: int | None = None
    chunks: int | None = None

    def check(self, cmd: str) -> None:
        BlobRef(self.sha256, self.bytes, self.chunks).check(cmd)
        if self.timeout_s <= 0:
            raise _bad(cmd, "timeout_s must be a positive number")


@dataclass(frozen=True)
class Logs:
    TYPE: ClassVar[str] = "logs"
    since: int = 0
    lines: int = 200  # at most 1000 are returned

    def check(self, cmd: str) -> None:
        _non_negative(cmd, since=self.since, lines=self.lines)


@dataclass(frozen=True)
class Sleep:
    TYPE: ClassVar[str] = "sleep"
    seconds: float = 1.0

    def check(self, cmd: str) -> None:
        if not 0 <= self.seconds <= 3600:
            raise _bad(cmd, "seconds must be a number in 0..3600")


def _run_id(cmd: str, run_id: str) -> None:
    validate_id(run_id, "run id")


@dataclass(frozen=True)
class TrainPrepare:
    TYPE: ClassVar[str] = "train_prepare"
    run_id: str

    def check(self, cmd: str) -> None:
        _run_id(cmd, self.run_id)


@dataclass(frozen=True)
class TrainBegin:
    """Load the model architecture into a (warm) training worker."""

    TYPE: ClassVar[str] = "train_begin"
    run_id: str
    arch: BlobRef
    pruning: bool = False
    granularity: str = "unstructured"
    lr: float = 1e-3
    optimizer: str = "adam"
    training: dict[str, Any] | None = None  # a user model's own loss and metrics

    def check(self, cmd: str) -> None:
        _run_id(cmd, self.run_id)
        self.arch.check(cmd)


@dataclass(frozen=True)
class TrainRound:
    """Train one round from the broadcast global model ``model``."""

    TYPE: ClassVar[str] = "train_round"
    run_id: str
    round: int
    model: BlobRef
    epochs: int = 1
    batch_size: int = 32
    lr: float = 1e-3
    targets: dict[str, float] = field(default_factory=dict)  # sparsity per prunable tensor
    seed: int = 0
    update_format: str = "int8"
    regrow: float = 0.0
    importance: dict[str, Any] | None = None  # statistics for the structured step after this round
    fetch_timeout_s: float = 300.0
    # 1.3: the model's digest (codec.digest), and a smaller broadcast of it: a delta against the model
    # ``delta_base`` (a digest the device holds), or with no base a quantised model; ``model`` is then the
    # exact encoding, fetched by devices without the base or whose reconstruction does not match
    model_digest: str | None = None
    delta: BlobRef | None = None
    delta_base: str | None = None
    # 1.5: a device that missed rounds catches up: the broadcasts since ``delta_base``, in order, ``delta``
    # last; each names the model it applies to, so a device that holds a later one starts from there
    delta_chain: list[DeltaLink] = field(default_factory=list)

    def check(self, cmd: str) -> None:
        _run_id(cmd, self.run_id)
        self.model.check(cmd)
        if self.delta is not None:
            self.delta.check(cmd)
        if self.delta_chain and (
            len(self.delta_chain) > MAX_DELTA_CHAIN
            or self.delta is None
            or self.delta_chain[-1].blob != self.delta
            or self.delta_chain[0].base != self.delta_base
        ):
            raise _bad(
                cmd, f"delta_chain must be at most {MAX_DELTA_CHAIN} links, from delta_base's model to the delta"
            )
        for link in self.delta_chain:
            link.check(cmd)
        for d in (self.model_digest, self.delta_base):
            if d is not None:
                validate_sha256(d)
        if self.fetch_timeout_s <= 0:
            raise _bad(cmd, "fetch_timeout_s must be a positive number")
        if self.epochs < 1 or self.batch_size < 1:
            raise _bad(cmd, "epochs and batch_size must be positive")
        if not 0.0 <= self.regrow < 1.0:
            raise _bad(cmd, "regrow must be in [0, 1)")
        if not all(0.0 <= x < 1.0 for x in self.targets.values()):
            raise _bad(cmd, "every sparsity target must be in [0, 1)")


@dataclass(frozen=True)
class Bench:
    """Benchmark TFLite artifacts; ``runs`` and ``duration_s`` both None means 200 runs."""

    TYPE: ClassVar[str] = "bench"
    artifacts: list[Artifact]
    runs: int | None = None
    duration_s: float | None = None
    threads: int = 0  # 0: the runtime's default
    warmup: int = 10
    budget_s: float | None = None  # None: the device's bench_budget_s setting
    runtime: str = "auto"
    fetch_timeout_s: float = 300.0

    def check(self, cmd: str) -> None:
        if not self.artifacts:
            raise _bad(cmd, "artifacts must be a non-empty list of {name, sha256, bytes}")
        for a in self.artifacts:
            a.check(cmd)
        if (self.runs is not None and self.runs < 1) or (self.duration_s is not None and self.duration_s <= 0):
            raise _bad(cmd, "runs and duration_s must be positive")
        _non_negative(cmd, threads=self.threads, warmup=self.warmup)
        if self.fetch_timeout_s <= 0:
            raise _bad(cmd, "fetch_timeout_s must be a positive number")
