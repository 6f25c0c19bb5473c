"""Blobs: content-addressed byte strings (models, artifacts, updates) moved in chunks.

Both directions use the same pieces: :func:`split` cuts a blob into chunk
frames that fit broker message limits, :mod:`edge_agent.common.transfer` moves them
and puts them back together (duplicates and any order, as QoS 1 allows; sha256
checked before the bytes are handed out), and :class:`BlobStore` keeps blobs on
disk by hash so a model or artifact crosses the network once.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..protocol.constants import DEFAULT_CHUNK_BYTES
from ..protocol.errors import ErrorCode, ProtocolError
from ..protocol.messages import ChunkFrame
from ..protocol.topics import validate_sha256


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def chunk_count(total_bytes: int, chunk_bytes: int) -> int:
    return max(1, -(-total_bytes // chunk_bytes))


def split(
    data: bytes, chunk_bytes: int = DEFAULT_CHUNK_BYTES, request_id: str | None = None, sha256: str | None = None
) -> Iterator[ChunkFrame]:
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    sha = sha256 or sha256_hex(data)
    count = chunk_count(len(data), chunk_bytes)
    view = memoryview(data)
    for i in range(count):
        yield ChunkFrame(sha, i, count, len(data), bytes(view[i * chunk_bytes : (i + 1) * chunk_bytes]), request_id)


class BlobStore:
    """A directory of blobs named by their sha256. Writes are atomic (temp file + rename)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.root / validate_sha256(sha256)

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def put(self, data: bytes, sha256: str | None = None) -> str:
        sha = sha256 or sha256_hex(data)
        target = self.path(sha)
        if not target.exists():
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        return sha

    def get(self, sha256: str, verify: bool = True) -> bytes:
        path = self.path(sha256)
        if not path.is_file():
            raise ProtocolError(ErrorCode.NOT_FOUND, f"blob {sha256[:12]} is not in the store")
        data = path.read_bytes()
        if verify and sha256_hex(data) != sha256:
            path.unlink(missing_ok=True)
            raise ProtocolError(ErrorCode.INTEGRITY, f"blob {sha256[:12]} on disk is corrupted; removed")
        return data

    def remove(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.iterdir() if p.is_file() and not p.name.startswith("."))

    def evict_to(self, max_bytes: int, keep: set[str] = frozenset()) -> int:
        """Delete least recently used blobs until the store is under ``max_bytes``."""
        files = sorted(
            (p for p in self.root.iterdir() if p.is_file() and not p.name.startswith(".") and p.name not in keep),
            key=lambda p: p.stat().st_atime,
        )
        total = self.total_bytes()
        removed = 0
        for p in files:
            if total <= max_bytes:
                break
            total -= p.stat().st_size
            p.unlink(missing_ok=True)
            removed += 1
        return removed
