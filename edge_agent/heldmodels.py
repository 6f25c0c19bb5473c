"""The global models a device keeps, by digest, so the next round can come down as a delta against one.

Each is stored uncompressed (``codec.encode(..., compression="none")``) under its tensor digest
(:func:`~edge_agent.protocol.codec.digest`) in ``<state>/models``; reading one back checks the
digest again, so a corrupted file is removed and reported as missing, never trained from. At most
``model_cache`` models and ``model_cache_bytes`` bytes are kept (the newest win).

:func:`obtain` turns a ``train_round``'s arguments into the model to train from: the one already
held, else the deltas applied in order to the base they name (one, or a chain after missed rounds),
else the exact encoding; a reconstruction whose
digest is not the announced one is discarded and the exact encoding fetched instead.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from .protocol import codec, topics
from .protocol.args import TrainRound
from .protocol.errors import ErrorCode, ProtocolError

log = logging.getLogger(__name__)


class HeldModels:
    def __init__(self, root: Path, keep: int, max_bytes: int):
        self.root, self.keep, self.max_bytes = Path(root), keep, max_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def path(self, digest: str) -> Path:
        return self.root / topics.validate_sha256(digest)

    def get(self, digest: str | None) -> tuple[codec.Bundle, bytes] | None:
        """The model with this digest and its stored (uncompressed) encoding, or None (not held, or its
        file no longer matches: removed)."""
        if digest is None or not self.path(digest).is_file():
            return None
        try:
            data = self.path(digest).read_bytes()
            bundle = codec.decode(data)
            if codec.digest(bundle.names, bundle.tensors, bundle.masks) == digest:
                os.utime(self.path(digest))  # the newest are kept
                return bundle, data
            why = "its digest does not match"
        except (OSError, ProtocolError) as exc:
            why = str(exc)
        log.warning("held model %s is corrupted (%s); removed", digest[:12], why)
        self.path(digest).unlink(missing_ok=True)
        return None

    def put(self, bundle: codec.Bundle, digest: str | None = None) -> tuple[str, bytes]:
        """Keep ``bundle`` (``digest``: its digest, if the caller has computed it); returns its digest and
        its uncompressed encoding (what the trainer reads)."""
        digest = digest or codec.digest(bundle.names, bundle.tensors, bundle.masks)
        data = encode_plain(bundle)
        with self._lock:
            if self.keep > 0 and len(data) <= self.max_bytes:
                fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, self.path(digest))
                self._evict()
        return digest, data

    def _evict(self) -> None:
        files = sorted(
            (p for p in self.root.iterdir() if p.is_file() and not p.name.startswith(".")),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
        total = 0
        for i, p in enumerate(files):
            total += p.stat().st_size
            if i >= self.keep or total > self.max_bytes:
                p.unlink(missing_ok=True)

    def digests(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_file() and not p.name.startswith("."))


def encode_plain(bundle: codec.Bundle) -> bytes:
    return codec.encode(
        bundle.tensors, names=bundle.names, masks=bundle.masks, kind="model", compression="none", meta=bundle.meta
    )


def _start(held: HeldModels, steps: list[tuple[str | None, Any]]) -> tuple[int | None, codec.Bundle | None]:
    """The latest step whose base this device holds (or that needs none), and that base."""
    for i in range(len(steps) - 1, -1, -1):
        base = steps[i][0]
        if base is None:
            return i, None
        stored = held.get(base)
        if stored is not None:
            return i, stored[0]
    return None, None


def obtain(
    held: HeldModels, a: TrainRound, fetch: Callable[[str, float, int | None, int | None], bytes]
) -> tuple[bytes, dict[str, Any]]:
    """The global model of this round as the trainer reads it (uncompressed), and how it came:
    ``{"download": cached|small|delta|chain|exact|recovered, "download_bytes": bytes fetched}`` (and for the
    small broadcasts ``delta_links``: how many were applied)."""
    if a.model_digest is not None:
        have = held.get(a.model_digest)
        if have is not None:
            return have[1], {"download": "cached", "download_bytes": 0}
    fetched = 0
    recovered = False
    steps = [(link.base, link.blob) for link in a.delta_chain] or ([(a.delta_base, a.delta)] if a.delta else [])
    start, bundle = _start(held, steps)
    if start is not None:
        deadline = time.monotonic() + a.fetch_timeout_s  # for all of them; the exact model has its own
        try:
            for _, ref in steps[start:]:  # a device that missed rounds applies each broadcast since
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ProtocolError(ErrorCode.TIMEOUT, f"the broadcasts took over {a.fetch_timeout_s:.0f} s")
                small = fetch(ref.sha256, left, ref.bytes, ref.chunks)
                fetched += len(small)
                if bundle is None:
                    bundle = codec.decode(small)
                else:
                    bundle = codec.decode(small, reference=bundle.tensors, reference_masks=bundle.masks)
            if bundle is None:  # steps[start:] is never empty; for the type checker
                raise ProtocolError(ErrorCode.BAD_ARGS, "no broadcast to rebuild the model from")
            digest = codec.digest(bundle.names, bundle.tensors, bundle.masks)
            if a.model_digest is None or digest == a.model_digest:
                _, data = held.put(bundle, digest)
                links = len(steps) - start
                how = "chain" if links > 1 else "delta" if steps[start][0] is not None else "small"
                return data, {"download": how, "download_bytes": fetched, "delta_links": links}
            why = "its digest is not the announced one"
        except ProtocolError as exc:
            why = str(exc)
        log.warning("the broadcast of round %s does not reconstruct here (%s): fetching the exact model", a.round, why)
        recovered = True
    exact = fetch(a.model.sha256, a.fetch_timeout_s, a.model.bytes, a.model.chunks)
    fetched += len(exact)
    bundle = codec.decode(exact)
    digest = codec.digest(bundle.names, bundle.tensors, bundle.masks)
    if a.model_digest is not None and digest != a.model_digest:
        raise ProtocolError(ErrorCode.INTEGRITY, f"round {a.round}: the exact model's digest is not the announced one")
    _, data = held.put(bundle, digest)
    return data, {"download": "recovered" if recovered else "exact", "download_bytes": fetched}
