"""The global models a device keeps, by digest, so the next round can come down as a delta against one.

Each is stored uncompressed (``codec.encode(..., compression="none")``) under its tensor digest
(:func:`~edge_agent.protocol.codec.digest`) in ``<state>/models``; reading one back checks the
digest again, so a corrupted file is removed and reported as missing, never trained from. At most
``model_cache`` models and ``model_cache_bytes`` bytes are kept (the newest win).

:func:`obtain` turns a ``train_round``'s arguments into the model to train from: the one already
held, else the delta applied to the base it names, else the exact encoding; a reconstruction whose
digest is not the announced one is discarded and the exact encoding fetched instead.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
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


def obtain(
    held: HeldModels, a: TrainRound, fetch: Callable[[str, float, int | None, int | None], bytes]
) -> tuple[bytes, dict[str, Any]]:
    """The global model of this round as the trainer reads it (uncompressed), and how it came:
    ``{"download": cached|delta|exact|recovered, "download_bytes": bytes fetched}``."""
    if a.model_digest is not None:
        have = held.get(a.model_digest)
        if have is not None:
            return have[1], {"download": "cached", "download_bytes": 0}
    fetched = 0
    recovered = False
    if a.delta is not None:
        stored = held.get(a.delta_base) if a.delta_base is not None else None
        base = stored[0] if stored is not None else None
        if a.delta_base is None or base is not None:
            small = fetch(a.delta.sha256, a.fetch_timeout_s, a.delta.bytes, a.delta.chunks)
            fetched += len(small)
            try:
                if base is None:
                    bundle = codec.decode(small)
                else:
                    bundle = codec.decode(small, reference=base.tensors, reference_masks=base.masks)
                digest = codec.digest(bundle.names, bundle.tensors, bundle.masks)
                if a.model_digest is None or digest == a.model_digest:
                    _, data = held.put(bundle, digest)
                    return data, {"download": "delta" if base is not None else "small", "download_bytes": fetched}
                why = "its digest is not the announced one"
            except ProtocolError as exc:
                why = str(exc)
            log.warning(
                "the broadcast of round %s does not reconstruct here (%s): fetching the exact model", a.round, why
            )
            recovered = True
    exact = fetch(a.model.sha256, a.fetch_timeout_s, a.model.bytes, a.model.chunks)
    fetched += len(exact)
    bundle = codec.decode(exact)
    digest = codec.digest(bundle.names, bundle.tensors, bundle.masks)
    if a.model_digest is not None and digest != a.model_digest:
        raise ProtocolError(ErrorCode.INTEGRITY, f"round {a.round}: the exact model's digest is not the announced one")
    _, data = held.put(bundle, digest)
    return data, {"download": "recovered" if recovered else "exact", "download_bytes": fetched}
