"""The only place control messages and chunk frames are turned into bytes and back.

Control messages are UTF-8 JSON objects with a protocol version ``v`` and a
``type``. Chunk frames are binary, little-endian like the tensor codec::

    b"EPF2" | u32 little-endian header length | header (JSON) | chunk bytes

(``EPF1``, with a big-endian length, is what protocol 1.0 and 1.1 peers read and write: it is
still read, and written to a peer older than 1.2; see :func:`frame_version_for`)

with header ``{"v", "blob", "i", "n", "size", "req"}``. Tensor bundles inside
blobs have their own documented format in :mod:`.codec`.

Decoding validates everything a peer might get wrong (size, JSON, version,
type, required fields, field types) and raises :class:`ProtocolError` with a
code for the error reply. Unknown keys are ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
import types
import typing
from typing import Any, TypeVar

from .constants import (
    FRAMES_LITTLE_ENDIAN_SINCE,
    MAX_CHUNK_BYTES,
    MAX_CONTROL_BYTES,
    MAX_WANTED_CHUNKS,
    PROTOCOL_VERSION,
)
from .errors import ErrorCode, ProtocolError
from .messages import REPLY_KINDS, BlobWant, ChunkFrame, Command, Reply
from .topics import validate_id, validate_sha256

T = TypeVar("T")
FRAME_VERSION = 2
_FRAME_HEADS = {1: (b"EPF1", struct.Struct(">4sI")), 2: (b"EPF2", struct.Struct("<4sI"))}
_FRAME_MAGICS = {magic: head for magic, head in _FRAME_HEADS.values()}
_MAX_FRAME_HEADER_BYTES = 4096


def check_version(version: object) -> None:
    """Accept any minor of our major; refuse anything else with BAD_VERSION."""
    if not isinstance(version, str) or not version:
        raise ProtocolError(ErrorCode.BAD_VERSION, f"missing or invalid protocol version {version!r}")
    major = version.split(".", 1)[0]
    ours = PROTOCOL_VERSION.split(".", 1)[0]
    if major != ours:
        raise ProtocolError(
            ErrorCode.BAD_VERSION,
            f"protocol version {version} is not supported (this side speaks {PROTOCOL_VERSION})",
        )


def encode(msg: Any) -> bytes:
    body = {"v": PROTOCOL_VERSION, "type": msg.TYPE}
    body.update(dataclasses.asdict(msg))
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _load_json(payload: bytes, max_bytes: int) -> dict[str, Any]:
    if len(payload) > max_bytes:
        raise ProtocolError(
            ErrorCode.TOO_LARGE, f"message of {len(payload)} bytes exceeds the limit of {max_bytes} bytes"
        )
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(ErrorCode.MALFORMED, f"not valid UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.MALFORMED, f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint in (str, dict, list):
        return isinstance(value, hint)
    if origin in (dict, list):
        return isinstance(value, origin)
    return True


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def from_dict(cls: type[T], obj: dict[str, Any]) -> T:
    """Build ``cls`` from a decoded JSON object, validating fields by their type hints."""
    check_version(obj.get("v"))
    if obj.get("type") != cls.TYPE:  # type: ignore[attr-defined]
        raise ProtocolError(ErrorCode.MALFORMED, f"expected message type {cls.TYPE!r}, got {obj.get('type')!r}")  # type: ignore[attr-defined]
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in obj:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ProtocolError(ErrorCode.BAD_FIELD, f"{cls.TYPE}: missing field {f.name!r}")  # type: ignore[attr-defined]
            continue
        value = obj[f.name]
        if not _type_ok(value, hints[f.name]):
            raise ProtocolError(
                ErrorCode.BAD_FIELD,
                f"{cls.TYPE}: field {f.name!r} has wrong type {type(value).__name__}",  # type: ignore[attr-defined]
            )
        kwargs[f.name] = value
    msg = cls(**kwargs)
    _check_semantics(msg)
    return msg


def _check_semantics(msg: Any) -> None:
    if isinstance(msg, Command):
        validate_id(msg.id, "request id")
        if not msg.cmd:
            raise ProtocolError(ErrorCode.BAD_FIELD, "cmd: empty command name")
    elif isinstance(msg, Reply):
        if msg.kind not in REPLY_KINDS:
            raise ProtocolError(ErrorCode.BAD_FIELD, f"reply: unknown kind {msg.kind!r}")
        if msg.kind == "error" and not isinstance(msg.error, dict):
            raise ProtocolError(ErrorCode.BAD_FIELD, "reply: error reply without error object")
    elif isinstance(msg, BlobWant):
        validate_sha256(msg.sha256)
        if msg.chunks is not None and (
            len(msg.chunks) > MAX_WANTED_CHUNKS
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in msg.chunks)
        ):
            raise ProtocolError(
                ErrorCode.BAD_FIELD,
                f"blob_want: chunks must be at most {MAX_WANTED_CHUNKS} " f"non-negative chunk indices",
            )


def _arg_value(cmd: str, name: str, value: Any, hint: Any) -> Any:
    """``value`` checked against ``hint``; nested argument dataclasses (and lists of them) are built."""
    options = [h for h in typing.get_args(hint) if h is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(options) == 1 and value is not None:
        hint = options[0]  # X | None, given a value: check it as X
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if not isinstance(value, dict):
            raise ProtocolError(ErrorCode.BAD_ARGS, f"{cmd}: argument {name!r} must be an object")
        return _build_args(hint, value, cmd, f"{name}.")
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint) or (Any,)
        if not isinstance(value, list):
            raise ProtocolError(ErrorCode.BAD_ARGS, f"{cmd}: argument {name!r} must be a list")
        return [_arg_value(cmd, f"{name}[{i}]", v, item) for i, v in enumerate(value)]
    if typing.get_origin(hint) is dict and isinstance(value, dict):
        _, item = typing.get_args(hint) or (str, Any)
        if not all(isinstance(k, str) and _type_ok(v, item) for k, v in value.items()):
            raise ProtocolError(ErrorCode.BAD_ARGS, f"{cmd}: argument {name!r} must map names to {item.__name__}")
        return value
    if not _type_ok(value, hint):
        want = " or ".join(getattr(h, "__name__", str(h)) for h in (typing.get_args(hint) or (hint,)))
        raise ProtocolError(ErrorCode.BAD_ARGS, f"{cmd}: argument {name!r} must be {want.replace('NoneType', 'null')}")
    return value


def _build_args(cls: type[T], obj: dict[str, Any], cmd: str, prefix: str = "") -> T:
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in obj or (obj[f.name] is None and f.default is None):
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ProtocolError(ErrorCode.BAD_ARGS, f"{cmd}: missing argument {prefix + f.name!r}")
            continue
        kwargs[f.name] = _arg_value(cmd, prefix + f.name, obj[f.name], _hints(cls)[f.name])
    return cls(**kwargs)


def decode_args(cls: type[T], cmd: str, args: dict[str, Any]) -> T:
    """The arguments of command ``cmd`` as ``cls`` (see :mod:`.args`); BAD_ARGS if a type or value is wrong."""
    out = _build_args(cls, args, cmd)
    out.check(cmd)  # type: ignore[attr-defined]
    return out


def encode_args(args: Any) -> dict[str, Any]:
    """The JSON object of an argument dataclass; None fields are left out (the agent's default)."""
    return {k: v for k, v in dataclasses.asdict(args).items() if v is not None}


def decode(cls: type[T], payload: bytes, max_bytes: int = MAX_CONTROL_BYTES) -> T:
    """Decode and validate one control message of type ``cls``."""
    return from_dict(cls, _load_json(payload, max_bytes))


def peek_request_id(payload: bytes) -> str | None:
    """Best-effort request id of a command that failed validation, to address the error reply."""
    try:
        obj = json.loads(payload[:MAX_CONTROL_BYTES].decode("utf-8"))
        rid = obj.get("id") if isinstance(obj, dict) else None
        return validate_id(rid, "request id")
    except (ValueError, UnicodeDecodeError, ProtocolError, AttributeError):
        return None


def version_at_least(protocol_version: str | None, since: tuple[int, int]) -> bool:
    """Whether a peer reporting ``protocol_version`` (None, unparsable: the oldest) speaks ``since`` or later."""
    try:
        major, minor = (int(p) for p in str(protocol_version).split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= since


def frame_version_for(protocol_version: str | None) -> int:
    """The chunk frame version a peer of this protocol version reads (None, unknown: the oldest)."""
    return FRAME_VERSION if version_at_least(protocol_version, FRAMES_LITTLE_ENDIAN_SINCE) else 1


def encode_frame(frame: ChunkFrame, version: int = FRAME_VERSION) -> bytes:
    header = json.dumps(
        {
            "v": PROTOCOL_VERSION,
            "blob": frame.blob_sha256,
            "i": frame.index,
            "n": frame.count,
            "size": frame.total_bytes,
            "req": frame.request_id,
        },
        separators=(",", ":"),
    ).encode("utf-8")
    magic, head = _FRAME_HEADS[version]
    return head.pack(magic, len(header)) + header + frame.data


def decode_frame(payload: bytes, max_chunk_bytes: int = MAX_CHUNK_BYTES) -> ChunkFrame:
    """Decode and validate one chunk frame (structure only; blob hash is checked on assembly)."""
    head_struct = _FRAME_MAGICS.get(bytes(payload[:4]))
    if head_struct is None or len(payload) < head_struct.size:
        raise ProtocolError(ErrorCode.MALFORMED, "not an edgeprune chunk frame (bad magic)")
    _, header_len = head_struct.unpack_from(payload)
    if header_len > _MAX_FRAME_HEADER_BYTES or head_struct.size + header_len > len(payload):
        raise ProtocolError(ErrorCode.MALFORMED, f"chunk frame header length {header_len} is invalid")
    start = head_struct.size
    head = _load_json(payload[start : start + header_len], _MAX_FRAME_HEADER_BYTES)
    check_version(head.get("v"))
    data = payload[start + header_len :]
    try:
        sha = validate_sha256(head.get("blob"))
        index, count, size = head["i"], head["n"], head["size"]
        req = head.get("req")
    except KeyError as exc:
        raise ProtocolError(ErrorCode.BAD_FIELD, f"chunk frame: missing {exc}") from None
    for name, value in (("i", index), ("n", count), ("size", size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ProtocolError(ErrorCode.BAD_FIELD, f"chunk frame: {name} must be a non-negative integer")
    if count < 1 or index >= count:
        raise ProtocolError(ErrorCode.BAD_FIELD, f"chunk frame: index {index} outside 0..{count - 1}")
    if len(data) > max_chunk_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"chunk of {len(data)} bytes exceeds the limit of {max_chunk_bytes}")
    if req is not None:
        validate_id(req, "request id")
    return ChunkFrame(sha, index, count, size, bytes(data), req)
