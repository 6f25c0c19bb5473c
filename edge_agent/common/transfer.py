"""Moving blobs over MQTT, for both sides: paced sending, checked receiving, asking for what is missing.

A blob (model, artifact, update) travels as chunk frames (:func:`edge_agent.common.blobs.split`).
The receiving side opens a :class:`Pull` for exactly the blob it expects; a
:class:`Receiver` routes every incoming frame to its pull and drops the rest, so

- a frame is checked against the pull's sha256, chunk count, total size (the size
  announced in the reply or broadcast reference bounds the pull: a peer cannot make us
  assemble 1 GiB) and, for pulls from a device, its request ids;
- frames for a pull that was closed or has expired are dropped: late chunks cannot
  recreate a half-assembled blob, and two pulls of the same blob (different request
  ids) never mix;
- :func:`wait` asks again for only the missing chunks when they stop coming.

:func:`send_frames` publishes with at most ``window`` chunks unacknowledged by the
broker, and a chunk the broker never acknowledges is an error, not a success.

Threads: frames are fed on the MQTT network thread (:meth:`Receiver.feed` never
blocks); pulls are opened, waited on and closed on callers' threads. Pull state is
guarded by its own lock, the routing tables by the receiver's.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

from ..protocol import serde
from ..protocol.constants import CHUNK_IDLE_S, MAX_BLOB_BYTES, MAX_CHUNK_BYTES, PUBLISH_TIMEOUT_S, UPLOAD_WINDOW_CHUNKS
from ..protocol.errors import ErrorCode, ProtocolError
from ..protocol.messages import ChunkFrame
from .blobs import sha256_hex
from .link import Link, PublishTimeout, wait_published

SENT_GRACE_S = 2.0
"""After the sender says it has sent everything, missing chunks are asked for again this soon."""


class Pull:
    """One expected blob from one source, assembled from frames that match it."""

    def __init__(
        self,
        sha256: str,
        source: str,
        *,
        expected_bytes: int | None = None,
        expected_chunks: int | None = None,
        deadline_s: float = 300.0,
        max_bytes: int = MAX_BLOB_BYTES,
    ):
        if expected_bytes is not None and expected_bytes > max_bytes:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"blob of {expected_bytes} bytes exceeds the limit of {max_bytes}")
        self.sha256, self.source = sha256, source
        self.total_bytes, self.count = expected_bytes, expected_chunks
        self.max_bytes = max_bytes
        self.request_ids: set[str] = set()
        self.started = self.last_progress = time.monotonic()
        self.deadline = self.started + deadline_s
        self.users = 1
        self.asks = 0  # repeated requests it took (reported in metrics and tests)
        self.data: bytes | None = None
        self.error: ProtocolError | None = None
        self.done = threading.Event()
        self._chunks: dict[int, bytes] = {}
        self._received = 0
        self._lock = threading.Lock()

    def add(self, frame: ChunkFrame) -> None:
        with self._lock:
            if self.done.is_set():
                return
            try:
                self._add(frame)
            except ProtocolError as exc:
                self._finish(error=exc)

    def _add(self, frame: ChunkFrame) -> None:
        short = self.sha256[:12]
        if frame.blob_sha256 != self.sha256:
            raise ProtocolError(ErrorCode.BAD_FIELD, f"blob {short}: a chunk of blob {frame.blob_sha256[:12]} arrived")
        if self.total_bytes is None:
            if frame.total_bytes > self.max_bytes:
                raise ProtocolError(
                    ErrorCode.TOO_LARGE, f"blob of {frame.total_bytes} bytes exceeds the limit " f"of {self.max_bytes}"
                )
            self.total_bytes = frame.total_bytes
        elif frame.total_bytes != self.total_bytes:
            raise ProtocolError(
                ErrorCode.INTEGRITY,
                f"blob {short}: chunk announces {frame.total_bytes} bytes, " f"expected {self.total_bytes}",
            )
        if self.count is None:
            self.count = frame.count
        elif frame.count != self.count:
            raise ProtocolError(
                ErrorCode.INTEGRITY, f"blob {short}: chunk announces {frame.count} chunks, " f"expected {self.count}"
            )
        if self.count > max(1, self.total_bytes) or self.count * MAX_CHUNK_BYTES < self.total_bytes:
            raise ProtocolError(
                ErrorCode.BAD_FIELD, f"blob {short}: {self.count} chunks cannot hold " f"{self.total_bytes} bytes"
            )
        if frame.index in self._chunks:
            return  # a QoS-1 duplicate or an answer to a repeated request
        self._chunks[frame.index] = frame.data
        self._received += len(frame.data)
        self.last_progress = time.monotonic()
        if self._received > self.total_bytes:
            raise ProtocolError(ErrorCode.INTEGRITY, f"blob {short}: more bytes than announced")
        if len(self._chunks) < self.count:
            return
        data = b"".join(self._chunks[i] for i in range(self.count))
        actual = sha256_hex(data)
        if len(data) != self.total_bytes or actual != self.sha256:
            raise ProtocolError(
                ErrorCode.INTEGRITY, f"blob {short}: sha256 mismatch (got {actual[:12]}, " f"{len(data)} bytes)"
            )
        self._finish(data=data)

    def _finish(self, data: bytes | None = None, error: ProtocolError | None = None) -> None:
        self.data, self.error = data, error
        self._chunks.clear()  # free the pieces at once, whatever happens to the pull object
        self.done.set()

    def expire(self, message: str, code: ErrorCode = ErrorCode.TIMEOUT) -> None:
        """End the pull with an error (no-op when it is already over); its chunks are freed."""
        with self._lock:
            if not self.done.is_set():
                self._finish(error=ProtocolError(code, message))

    def missing(self) -> list[int] | None:
        """Chunk indices not yet received (None while the count is unknown: nothing arrived yet)."""
        with self._lock:
            if self.count is None:
                return None
            return [i for i in range(self.count) if i not in self._chunks]

    def progress(self) -> tuple[int, int]:
        with self._lock:
            return len(self._chunks), self.count or 0

    @property
    def pending_bytes(self) -> int:
        return self._received if not self.done.is_set() else 0

    def result(self) -> bytes:
        if self.error is not None:
            raise self.error
        assert self.data is not None
        return self.data


class Receiver:
    """Routes chunk frames to open pulls: by request id for pulls from a device, by (source, sha256)
    for broadcasts (whose retained chunks carry no request id)."""

    def __init__(self, max_bytes: int = MAX_BLOB_BYTES):
        self.max_bytes = max_bytes
        self._by_request: dict[str, Pull] = {}
        self._broadcast: dict[tuple[str, str], Pull] = {}
        self._lock = threading.Lock()

    def open(
        self,
        sha256: str,
        source: str,
        *,
        expected_bytes: int | None = None,
        expected_chunks: int | None = None,
        deadline_s: float = 300.0,
        broadcast: bool = False,
    ) -> Pull:
        """A new pull; for a broadcast, the pull already open for that blob is shared (one download)."""
        with self._lock:
            if broadcast:
                pull = self._broadcast.get((source, sha256))
                if pull is not None and not pull.done.is_set():
                    pull.users += 1
                    pull.deadline = max(pull.deadline, time.monotonic() + deadline_s)
                    return pull
            pull = Pull(
                sha256,
                source,
                expected_bytes=expected_bytes,
                expected_chunks=expected_chunks,
                deadline_s=deadline_s,
                max_bytes=self.max_bytes,
            )
            if broadcast:
                self._broadcast[(source, sha256)] = pull
            return pull

    def expect(self, pull: Pull, request_id: str) -> None:
        """Frames sent in answer to ``request_id`` belong to ``pull``."""
        with self._lock:
            pull.request_ids.add(request_id)
            self._by_request[request_id] = pull

    def close(self, pull: Pull) -> None:
        with self._lock:
            pull.users -= 1
            if pull.users > 0:
                return
            for rid in pull.request_ids:
                if self._by_request.get(rid) is pull:
                    del self._by_request[rid]
            if self._broadcast.get((pull.source, pull.sha256)) is pull:
                del self._broadcast[(pull.source, pull.sha256)]
        pull.expire(f"blob {pull.sha256[:12]}: transfer closed")

    def feed(self, frame: ChunkFrame, source: str) -> bool:
        """Give a frame to the pull it belongs to; False when nobody is waiting for it (dropped)."""
        with self._lock:
            if frame.request_id is not None and frame.request_id in self._by_request:
                pull = self._by_request[frame.request_id]
            else:
                pull = self._broadcast.get((source, frame.blob_sha256))
        if pull is None or pull.source != source or pull.done.is_set():
            return False
        if time.monotonic() > pull.deadline:
            got, total = pull.progress()
            pull.expire(f"blob {pull.sha256[:12]} from {source}: deadline passed with {got}/{total} chunks")
            return False
        pull.add(frame)
        return True

    @property
    def pending_bytes(self) -> int:
        with self._lock:
            pulls = set(self._by_request.values()) | set(self._broadcast.values())
        return sum(p.pending_bytes for p in pulls)


def wait(
    pull: Pull,
    timeout_s: float,
    ask: Callable[[list[int] | None], None],
    *,
    first_ask_s: float = CHUNK_IDLE_S,
    idle_s: float = CHUNK_IDLE_S,
    sent_all: Callable[[], bool] | None = None,
    max_idle_s: float = 60.0,
    progress_ask_s: float = 0.0,
) -> bytes:
    """Wait for ``pull``; when no chunk came for a while, ``ask`` for the missing ones (None: all).

    The first ask comes after ``first_ask_s`` without progress, later ones after ``idle_s``,
    doubling up to ``max_idle_s`` (a slow link is not flooded with repeats), and
    ``SENT_GRACE_S`` after ``sent_all()`` turns true (the sender says every chunk was
    acknowledged by the broker: the missing ones were lost on the way). Once some chunks have come,
    at least ``progress_ask_s`` passes without progress before each ask.
    """
    deadline = time.monotonic() + timeout_s
    asked_at, wait_s, asks = time.monotonic(), first_ask_s, 0
    while not pull.done.wait(0.05):
        now = time.monotonic()
        if now >= deadline:
            got, total = pull.progress()
            pull.expire(
                f"blob {pull.sha256[:12]} from {pull.source}: {got}/{total} chunks after {timeout_s:.0f} s"
                f" ({asks} repeated requests)"
            )
            break
        quiet = now - max(pull.last_progress, asked_at)
        limit = min(wait_s, SENT_GRACE_S) if sent_all is not None and sent_all() else wait_s
        if progress_ask_s and pull.progress()[0] > 0:  # chunks are coming, only slowly: do not add to the load
            limit = max(limit, progress_ask_s)
        if quiet >= limit:
            ask(pull.missing())
            wait_s = idle_s if asks == 0 else min(max_idle_s, wait_s * 2)
            asked_at, asks = now, asks + 1
    pull.asks = asks
    return pull.result()


def send_frames(
    link: Link,
    frames: Iterable[ChunkFrame],
    topic: str | Callable[[ChunkFrame], str],
    *,
    retain: bool = False,
    window: int = UPLOAD_WINDOW_CHUNKS,
    timeout_s: float = PUBLISH_TIMEOUT_S,
    frame_version: int = serde.FRAME_VERSION,
) -> int:
    """Publish chunk frames with at most ``window`` unacknowledged; return the bytes sent.
    ``frame_version``: what the receivers read (:func:`~edge_agent.protocol.serde.frame_version_for`).

    Raises TIMEOUT when the broker does not acknowledge a chunk in time (the
    connection is gone or the link is stalled): the caller must not report success.
    """
    inflight: deque = deque()
    sent = 0

    def settle(index: int, info) -> None:
        try:
            wait_published(info, timeout_s, f"chunk {index}")
        except PublishTimeout as exc:
            raise ProtocolError(ErrorCode.TIMEOUT, str(exc)) from None

    for frame in frames:
        payload = serde.encode_frame(frame, frame_version)
        info = link.publish(topic(frame) if callable(topic) else topic, payload, retain=retain)
        inflight.append((frame.index, info))
        sent += len(frame.data)
        if len(inflight) >= window:
            settle(*inflight.popleft())
    while inflight:
        settle(*inflight.popleft())
    return sent
