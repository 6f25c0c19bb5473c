"""The tensor bundle codec: how models go down and (sparse) updates come up.

Format (all integers little-endian)::

    b"EPT1" | u32 header length | header (UTF-8 JSON) | body (zstd or raw)

Header::

    {"v": 1, "kind": "model"|"update", "compression": "zstd"|"none",
     "body_bytes": <uncompressed body length>, "meta": {...},
     "tensors": [{"name", "shape", "mask", "values", "scale", "nnz", "delta"}, ...]}

Body, uncompressed: first every tensor's *mask section*, then every tensor's
*values section*, each in tensor order (masks compress better next to masks).

Mask encodings (``mask``):

- ``dense``: no mask; all N positions carry a value.
- ``bitmap``: ceil(N/8) bytes, ``numpy.packbits`` (big bit order) of the 0/1
  mask over all N positions in C order.
- ``relative``: ceil(K/8) bytes: a bitmap over only the K positions that are 1
  in a *reference mask* both sides already hold (the round's global mask).
  A client that keeps the global mask sends K bits of ones, which zstd turns
  into almost nothing; the mask costs bits only where it changed.
- ``xor``: ceil(N/8) bytes: the bitmap of ``mask XOR reference mask``, for a
  mask that also keeps positions the reference had pruned (regrowth). Mostly
  zeros, so it compresses to about the entropy of the change.

Value encodings (``values``), for the nnz kept positions in C order:
``fp32`` (4 B), ``fp16`` (2 B), ``int8`` / ``int6`` / ``int4`` (1 B each
before compression: symmetric integers in -L..L with L = 127 / 31 / 7,
per-tensor ``scale`` = max|x|/L, stochastic rounding so the quantisation
error is unbiased and averages out across clients; zstd then codes them in
about their entropy). ``delta`` = true means values are ``x - reference`` at the
kept positions (updates relative to the global model they started from:
smaller range, so int8 loses far less).

Seeded values (no body bytes; a model a device can draw itself): ``uniform``
(``scale`` = half-width L: the receiver draws ``(2u - 1) * L`` in float32 from
``numpy.random.PCG64(seed)``, the entry's ``seed``) and ``const`` (every kept
value is ``scale``). :func:`encode_seeded` writes a freshly initialised model
this way, so round 1 of a run costs a header instead of the model.

Decoding validates the structure (sizes, counts, shapes, that a relative mask
fits its reference) and raises :class:`ProtocolError`; whether values are finite
is the receiver's policy (the aggregator rejects NaN/Inf updates).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .errors import ErrorCode, ProtocolError

MAGIC = b"EPT1"
_HEAD = struct.Struct("<4sI")
MAX_HEADER_BYTES = 16 << 20
MAX_BODY_BYTES = 1 << 30
MAX_SEEDED_VALUES = 64 << 20
"""Most values a bundle may have drawn rather than sent (256 MiB as float32): a header of a few hundred
bytes must not make a device allocate more than a real model would."""
VALUE_DTYPES: dict[str, np.dtype[Any]] = {
    "fp32": np.dtype("<f4"),
    "fp16": np.dtype("<f2"),
    "int8": np.dtype("i1"),
    "int6": np.dtype("i1"),
    "int4": np.dtype("i1"),
}
SEEDED_VALUES = ("uniform", "const")
"""Value encodings with no body bytes: the receiver draws or fills the values (see the module docstring)."""
INT_LEVELS = {"int8": 127, "int6": 31, "int4": 7}
"""Symmetric integer formats: values in -L..L, one byte each; zstd's entropy coder then
spends about the entropy of the quantised values, not 8 bits."""
ZSTD_LEVEL = 10


@dataclass
class Bundle:
    """A decoded bundle: dense arrays (zeros where masked) plus their masks (None = dense)."""

    kind: str
    tensors: list[np.ndarray]
    masks: list[np.ndarray | None]
    names: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


def _zstd() -> Any:
    import zstandard

    return zstandard


def _quantize(x: np.ndarray, levels: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    if peak == 0.0 or not math.isfinite(peak):
        # NaN/Inf must not be hidden by quantisation: send them as the receiver's problem
        return np.zeros(x.shape, dtype=np.int8), (peak if not math.isfinite(peak) else 0.0)
    scale = peak / levels
    q = np.floor(x.astype(np.float64) / scale + rng.random(x.shape))
    return np.clip(q, -levels, levels).astype(np.int8), scale


def encode(
    tensors: Sequence[np.ndarray],
    *,
    names: Sequence[str],
    kind: str,
    masks: Sequence[np.ndarray | None] | None = None,
    reference: Sequence[np.ndarray] | None = None,
    reference_masks: Sequence[np.ndarray | None] | None = None,
    values: str = "fp32",
    delta: bool = False,
    compression: str = "zstd",
    meta: dict[str, Any] | None = None,
    seed: int = 0,
) -> bytes:
    """Encode tensors (with optional masks) into one bundle.

    A tensor's mask is sent ``relative`` to ``reference_masks[i]`` when that is
    given (the mask must then be a subset of it), else as a ``bitmap``; a
    ``None`` mask means ``dense``. ``delta`` subtracts ``reference[i]``.
    """
    if values not in VALUE_DTYPES:
        raise ValueError(f"unknown value format {values!r}")
    if compression not in ("zstd", "none"):
        raise ValueError(f"unknown compression {compression!r}")
    masks = list(masks) if masks is not None else [None] * len(tensors)
    if delta and reference is None:
        raise ValueError("delta encoding needs reference tensors")
    refs: Sequence[np.ndarray] = reference if reference is not None else []
    rng = np.random.default_rng(seed)
    entries, mask_parts, value_parts = [], [], []
    for i, (name, t) in enumerate(zip(names, tensors)):
        t = np.asarray(t, dtype=np.float32)
        m = masks[i]
        ref_m = reference_masks[i] if reference_masks is not None else None
        if m is None:
            kept = t.reshape(-1)
            mode = "dense"
            if delta:
                kept = kept - np.asarray(refs[i], dtype=np.float32).reshape(-1)
        else:
            m = np.asarray(m, dtype=bool)
            if m.shape != t.shape:
                raise ValueError(f"{name}: mask shape {m.shape} != tensor shape {t.shape}")
            if ref_m is not None:
                ref_m = np.asarray(ref_m, dtype=bool)
                if np.any(m & ~ref_m):  # regrown positions: send what changed
                    mask_parts.append(np.packbits((m ^ ref_m).reshape(-1)).tobytes())
                    mode = "xor"
                else:
                    mask_parts.append(np.packbits(m[ref_m]).tobytes())
                    mode = "relative"
            else:
                mask_parts.append(np.packbits(m.reshape(-1)).tobytes())
                mode = "bitmap"
            kept = t[m]
            if delta:
                kept = kept - np.asarray(refs[i], dtype=np.float32)[m]
        scale = None
        if values in INT_LEVELS:
            q, scale = _quantize(kept, INT_LEVELS[values], rng)
            value_parts.append(q.tobytes())
        else:
            value_parts.append(kept.astype(VALUE_DTYPES[values]).tobytes())
        entries.append(
            {
                "name": name,
                "shape": list(t.shape),
                "mask": mode,
                "values": values,
                "scale": scale,
                "nnz": int(kept.size),
                "delta": bool(delta),
            }
        )
    return _pack(kind, entries, b"".join(mask_parts) + b"".join(value_parts), compression, meta)


def _pack(
    kind: str, entries: list[dict[str, Any]], body: bytes, compression: str, meta: dict[str, Any] | None
) -> bytes:
    """Magic, header and (compressed) body: one bundle."""
    raw_len = len(body)
    if compression == "zstd":
        body = _zstd().ZstdCompressor(level=ZSTD_LEVEL).compress(body)
    header = json.dumps(
        {
            "v": 1,
            "kind": kind,
            "compression": compression,
            "body_bytes": raw_len,
            "meta": meta or {},
            "tensors": entries,
        },
        separators=(",", ":"),
        allow_nan=True,
    ).encode()
    return _HEAD.pack(MAGIC, len(header)) + header + body


def digest(names: Sequence[str], tensors: Sequence[np.ndarray], masks: Sequence[np.ndarray | None]) -> str:
    """sha256 of what a model *is*: each tensor's name, shape, mask and float32 values (zeros where
    masked, -0.0 as 0.0). Two encodings of the same weights have one digest; a delta's reconstruction
    is checked against the one its sender announced."""
    h = hashlib.sha256()
    for name, t, m in zip(names, tensors, masks):
        a = np.asarray(t, dtype="<f4") + np.float32(0.0)
        if m is not None:
            m = np.asarray(m, dtype=bool)
            a = np.where(m, a, np.float32(0.0)).astype("<f4")
        h.update(json.dumps([name, list(a.shape), m is not None]).encode())
        if m is not None:
            h.update(np.packbits(m.reshape(-1)).tobytes())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def encode_seeded(
    tensors: Sequence[np.ndarray],
    *,
    names: Sequence[str],
    masks: Sequence[np.ndarray | None],
    seed: int,
    meta: dict[str, Any] | None = None,
) -> bytes:
    """A stand-in for a freshly initialised model that costs only its header: the same names, shapes and
    masks, each constant tensor kept (zero biases, batch-norm ones), every other one re-drawn as uniform
    with the same root mean square (so Glorot-uniform kernels keep their distribution exactly, and
    He-normal ones, as in mobilenet_tiny, their variance).
    Decode it to get the values; they are the model, on the sender and on every receiver."""
    entries, mask_parts = [], []
    for i, (name, t) in enumerate(zip(names, tensors)):
        t = np.asarray(t, dtype=np.float32)
        m = None if masks[i] is None else np.asarray(masks[i], dtype=bool)
        kept = t.reshape(-1) if m is None else t[m]
        if m is not None:
            mask_parts.append(np.packbits(m.reshape(-1)).tobytes())
        if kept.size and np.all(kept == kept[0]):
            entry = {"values": "const", "scale": float(kept[0])}
        else:
            rms = float(np.sqrt(np.mean(np.square(kept, dtype=np.float64)))) if kept.size else 0.0
            entry = {"values": "uniform", "scale": math.sqrt(3.0) * rms, "seed": (seed * 1_000_003 + i) % 2**63}
        entries.append(
            {
                "name": name,
                "shape": list(t.shape),
                "mask": "dense" if m is None else "bitmap",
                "nnz": int(kept.size),
                "delta": False,
                **entry,
            }
        )
    return _pack("model", entries, b"".join(mask_parts), "zstd", meta)


def _seeded_values(e: dict[str, Any], nnz: int) -> np.ndarray:
    if e["values"] == "const":
        return np.full(nnz, e["scale"], dtype=np.float32)
    u = np.random.Generator(np.random.PCG64(e["seed"])).random(nnz, dtype=np.float32)
    u *= np.float32(2.0)  # in place: one array of the tensor's size, however large
    u -= np.float32(1.0)
    u *= np.float32(e["scale"])
    return u


def _read_values(body: bytes, pos: int, e: dict[str, Any], nnz: int) -> tuple[np.ndarray, int]:
    dtype = VALUE_DTYPES[e["values"]]
    raw = np.frombuffer(body, dtype, nnz, pos)
    if e["values"] not in INT_LEVELS:
        return raw.astype(np.float32), pos + nnz * dtype.itemsize
    if raw.size and int(np.abs(raw.astype(np.int16)).max()) > INT_LEVELS[e["values"]]:
        raise ProtocolError(ErrorCode.BAD_FIELD, f"{e['name']}: {e['values']} value out of range")
    return raw.astype(np.float32) * np.float32(e["scale"]), pos + nnz * dtype.itemsize


def encode_update(
    weights: Sequence[np.ndarray],
    *,
    names: Sequence[str],
    masks: Sequence[np.ndarray | None],
    reference: Sequence[np.ndarray],
    reference_masks: Sequence[np.ndarray | None],
    values: str,
    pruned: bool,
    meta: dict[str, Any],
    seed: int = 0,
) -> bytes:
    """A device's update as it goes on the wire: the sparse delta from the global model (masks relative to
    the global masks, ``values`` quantisation, zstd) when the run prunes or quantises; plain fp32 weights,
    uncompressed, for the dense FedAvg baseline. The real worker and the simulator both send this."""
    if pruned or values != "fp32":
        return encode(
            weights,
            names=names,
            masks=masks,
            kind="update",
            reference=reference,
            reference_masks=reference_masks,
            values=values,
            delta=True,
            compression="zstd",
            meta=meta,
            seed=seed,
        )
    return encode(weights, names=names, kind="update", values="fp32", compression="none", meta=meta)


def read_header(data: bytes) -> tuple[dict[str, Any], int]:
    if len(data) < _HEAD.size or data[:4] != MAGIC:
        raise ProtocolError(ErrorCode.MALFORMED, "not an edgeprune tensor bundle (bad magic)")
    _, hlen = _HEAD.unpack_from(data)
    if hlen > MAX_HEADER_BYTES or _HEAD.size + hlen > len(data):
        raise ProtocolError(ErrorCode.MALFORMED, f"tensor bundle header length {hlen} is invalid")
    try:
        header = json.loads(data[_HEAD.size : _HEAD.size + hlen].decode("utf-8"))
        assert isinstance(header, dict) and isinstance(header["tensors"], list)
    except (ValueError, UnicodeDecodeError, AssertionError, KeyError, TypeError):
        raise ProtocolError(ErrorCode.MALFORMED, "tensor bundle header is not valid JSON") from None
    if header.get("v") != 1:
        raise ProtocolError(ErrorCode.BAD_VERSION, f"tensor bundle version {header.get('v')!r} is not supported")
    _check_header(header)
    return header, _HEAD.size + hlen


_MASKS = ("dense", "bitmap", "xor", "relative")


def _finite(x: float) -> bool:
    try:
        return math.isfinite(float(x))
    except OverflowError:  # an integer too large for a float
        return False


def _check_header(header: dict[str, Any]) -> None:
    """Every field's type and range, before any byte of the body is interpreted (found by fuzzing)."""

    def bad(why: str) -> ProtocolError:
        return ProtocolError(ErrorCode.MALFORMED, f"tensor bundle header: {why}")

    if not isinstance(header.get("kind"), str) or not isinstance(header.get("meta", {}), (dict, type(None))):
        raise bad("kind must be a string and meta an object")
    for i, e in enumerate(header["tensors"]):
        if not isinstance(e, dict):
            raise bad(f"tensor {i} is not an object")
        if not isinstance(e.get("name"), str):
            raise bad(f"tensor {i} has no name")
        shape = e.get("shape")
        if (
            not isinstance(shape, list)
            or len(shape) > 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape)
        ):
            raise bad(f"{e['name']}: shape {shape!r} is not a list of at most 8 non-negative integers")
        if e.get("mask") not in _MASKS or (
            e.get("values") not in VALUE_DTYPES and e.get("values") not in SEEDED_VALUES
        ):
            raise bad(f"{e['name']}: unknown mask {e.get('mask')!r} or values {e.get('values')!r}")
        if not isinstance(e.get("nnz"), int) or isinstance(e.get("nnz"), bool) or e["nnz"] < 0:
            raise bad(f"{e['name']}: nnz must be a non-negative integer")
        if not isinstance(e.get("delta"), bool):
            raise bad(f"{e['name']}: delta must be true or false")
        if (e["values"] in INT_LEVELS or e["values"] in SEEDED_VALUES) and (
            not isinstance(e.get("scale"), (int, float)) or isinstance(e["scale"], bool) or not _finite(e["scale"])
        ):
            raise bad(f"{e['name']}: {e['values']} values need a finite scale")
        if e["values"] in SEEDED_VALUES and (e["delta"] or header["kind"] != "model"):
            raise bad(f"{e['name']}: {e['values']} values belong in a model, never a delta or an update")
        if e["values"] == "uniform" and (
            not isinstance(e.get("seed"), int) or isinstance(e["seed"], bool) or not 0 <= e["seed"] < 2**63
        ):
            raise bad(f"{e['name']}: uniform values need a seed in 0..2**63-1")


def decode(
    data: bytes,
    reference: Sequence[np.ndarray] | None = None,
    reference_masks: Sequence[np.ndarray | None] | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> Bundle:
    """Decode a bundle; ``reference``/``reference_masks`` are needed for delta/relative tensors."""
    header, offset = read_header(data)
    body_len = header.get("body_bytes")
    if not isinstance(body_len, int) or not 0 <= body_len <= max_body_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"tensor bundle body of {body_len} bytes is over the limit")
    body = data[offset:]
    if header.get("compression") == "zstd":
        try:
            # stream with a cap: memory follows the bytes really there, never what a header claims
            # (decompress(max_output_size=...) allocates the claimed size up front: fuzzing hit MemoryError)
            with _zstd().ZstdDecompressor().stream_reader(io.BytesIO(body)) as reader:
                body = reader.read(body_len + 1)
        except _zstd().ZstdError as exc:
            raise ProtocolError(ErrorCode.MALFORMED, f"tensor bundle body does not decompress: {exc}") from None
    elif header.get("compression") != "none":
        raise ProtocolError(ErrorCode.MALFORMED, f"unknown compression {header.get('compression')!r}")
    if len(body) != body_len:
        raise ProtocolError(ErrorCode.MALFORMED, f"tensor bundle body is {len(body)} bytes, header says {body_len}")
    entries = header["tensors"]
    seeded = 0
    for e in entries:  # a tiny header must not make us allocate a huge tensor: every kept value costs body bytes
        n = int(np.prod(e["shape"], dtype=np.int64))
        if e["values"] in SEEDED_VALUES:  # drawn, not sent: bounded by what an fp32 body could be
            seeded += n
            if seeded > min(MAX_SEEDED_VALUES, max_body_bytes // 4):
                raise ProtocolError(ErrorCode.TOO_LARGE, f"{e['name']}: more seeded values than a model may have")
        elif n > 8 * max(body_len, 1) + 64 and (reference is None or e["mask"] != "relative"):
            raise ProtocolError(ErrorCode.MALFORMED, f"{e['name']}: shape {e['shape']} cannot fit in {body_len} bytes")
    if reference is not None and len(reference) != len(entries):
        raise ProtocolError(ErrorCode.BAD_FIELD, f"bundle has {len(entries)} tensors, the model has {len(reference)}")

    masks: list[np.ndarray | None] = []
    pos = 0
    try:
        for i, e in enumerate(entries):
            shape = tuple(int(d) for d in e["shape"])
            if any(d < 0 for d in shape):
                raise ValueError("negative dimension")
            if reference is not None and tuple(np.shape(reference[i])) != shape:
                raise ProtocolError(
                    ErrorCode.BAD_FIELD,
                    f"{e['name']}: shape {shape} does not match the model's " f"{tuple(np.shape(reference[i]))}",
                )
            n = int(np.prod(shape))
            if e["mask"] == "dense":
                masks.append(None)
                continue
            if e["mask"] == "bitmap":
                nbytes = -(-n // 8)
                bits = np.unpackbits(np.frombuffer(body, np.uint8, nbytes, pos), count=n).astype(bool)
                masks.append(bits.reshape(shape))
            elif e["mask"] == "xor":
                ref_m = None if reference_masks is None else reference_masks[i]
                if ref_m is None:
                    raise ProtocolError(ErrorCode.BAD_FIELD, f"{e['name']}: xor mask without a reference mask")
                if np.shape(ref_m) != shape:
                    raise ProtocolError(
                        ErrorCode.BAD_FIELD, f"{e['name']}: reference mask shape {np.shape(ref_m)} != {shape}"
                    )
                nbytes = -(-n // 8)
                bits = np.unpackbits(np.frombuffer(body, np.uint8, nbytes, pos), count=n).astype(bool)
                masks.append(bits.reshape(shape) ^ np.asarray(ref_m, dtype=bool))
            elif e["mask"] == "relative":
                ref_m = None if reference_masks is None else reference_masks[i]
                if ref_m is None:
                    raise ProtocolError(ErrorCode.BAD_FIELD, f"{e['name']}: relative mask without a reference mask")
                ref_m = np.asarray(ref_m, dtype=bool)
                if ref_m.shape != shape:
                    raise ProtocolError(
                        ErrorCode.BAD_FIELD, f"{e['name']}: reference mask shape {ref_m.shape} != {shape}"
                    )
                k = int(ref_m.sum())
                nbytes = -(-k // 8)
                bits = np.unpackbits(np.frombuffer(body, np.uint8, nbytes, pos), count=k).astype(bool)
                full = np.zeros(shape, dtype=bool)
                full[ref_m] = bits
                masks.append(full)
            else:
                raise ValueError(f"unknown mask encoding {e['mask']!r}")
            pos += nbytes
        tensors = []
        for i, e in enumerate(entries):
            shape = tuple(int(d) for d in e["shape"])
            m = masks[i]
            nnz = int(np.prod(shape)) if m is None else int(m.sum())
            if int(e["nnz"]) != nnz:
                raise ProtocolError(ErrorCode.BAD_FIELD, f"{e['name']}: header says {e['nnz']} values, mask has {nnz}")
            if e["values"] in SEEDED_VALUES:
                vals = _seeded_values(e, nnz)
            else:
                vals, pos = _read_values(body, pos, e, nnz)
            if e["delta"]:
                if reference is None:
                    raise ProtocolError(ErrorCode.BAD_FIELD, f"{e['name']}: delta values without a reference")
                ref = np.asarray(reference[i], dtype=np.float32)
                vals = vals + (ref.reshape(-1) if m is None else ref[m])
            out = np.zeros(shape, dtype=np.float32)
            if m is None:
                out[...] = vals.reshape(shape)
            else:
                out[m] = vals
            tensors.append(out)
    except ProtocolError:
        raise
    except (ValueError, KeyError, TypeError, IndexError, OverflowError) as exc:
        raise ProtocolError(ErrorCode.MALFORMED, f"tensor bundle body is inconsistent: {exc}") from None
    if pos != len(body):
        raise ProtocolError(ErrorCode.MALFORMED, f"tensor bundle body has {len(body) - pos} trailing bytes")
    return Bundle(header["kind"], tensors, masks, [e["name"] for e in entries], header.get("meta") or {})
