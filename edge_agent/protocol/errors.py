"""Error codes carried in error replies, so failures travel as data."""

from __future__ import annotations

import enum


class ErrorCode(str, enum.Enum):
    MALFORMED = "malformed"  # not JSON / not a frame / wrong structure
    BAD_VERSION = "bad_version"  # protocol major version differs
    BAD_FIELD = "bad_field"  # missing field or wrong type
    TOO_LARGE = "too_large"  # payload over the configured limit
    BAD_TOPIC = "bad_topic"  # topic or id fails validation
    UNKNOWN_COMMAND = "unknown_command"
    BAD_ARGS = "bad_args"  # command arguments invalid
    BUSY = "busy"  # agent is already running a long job
    UNSUPPORTED = "unsupported"  # agent cannot do it (e.g. no TensorFlow)
    NOT_FOUND = "not_found"  # referenced blob/run unknown
    INTEGRITY = "integrity"  # hash mismatch, corrupted data
    BAD_SIGNATURE = "bad_signature"  # unsigned, or the signature does not verify
    REPLAYED = "replayed"  # a request id already used, or too old / an earlier round
    REJECTED = "rejected"  # valid message refused by policy (NaN update...)
    RESOURCES = "resources"  # not enough disk/RAM
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    INTERNAL = "internal"  # bug or unexpected exception

    @classmethod
    def coerce(cls, value: object) -> "ErrorCode":
        """The code for ``value``; INTERNAL for codes a newer peer may send that we do not know."""
        try:
            return cls(value)
        except ValueError:
            return cls.INTERNAL


class EdgepruneError(Exception):
    """The base of every error edgeprune raises on purpose, on either side: a stable ``code`` (what
    ``--json`` and error replies carry; an :class:`ErrorCode` on the wire) and a message that names the
    problem and the fix. Anything that is not one of these is a bug."""

    code: str = "error"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class ProtocolError(EdgepruneError):
    """A message that cannot be accepted. ``code`` says why, for the error reply."""

    code: ErrorCode

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message, ErrorCode(code))

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message}"
