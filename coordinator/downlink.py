"""What goes down to the devices each round, and what they then hold (``--download-format``).

Formats:

- ``exact``: the global model as fp32 values and bitmap masks (zstd), to every client.
- ``fp16``: the same with fp16 values.
- ``delta-int8`` / ``delta-int4``: the change since the model the clients already hold (their
  *base*): mask changes against the base's masks (``relative``/``xor`` bitmaps), kept values as
  ``new - base`` quantised to int8 / int4 per tensor with unbiased stochastic rounding, zstd.
  With no base (after a structured step) the quantised model itself.

In every format, a fresh run of a built-in model starts from a *seeded* model
(``codec.encode_seeded``: each tensor re-drawn from a seed with its initialiser's spread), which a
device draws itself from a header of about a kilobyte: round 1 sends no weights, and every format
starts from the same weights, so comparing formats compares only what they do to later rounds.

Every lossy format is defined by its *reconstruction*: the coordinator decodes its own broadcast
with the same codec the devices run and gets, bit for bit, the weights each device will hold. That
reconstruction becomes the global model (it is evaluated, saved and trained from), and its
:func:`~edge_agent.protocol.codec.digest` is announced, so a device whose reconstruction differs
throws it away and fetches the exact encoding of the same weights instead. The quantisation error
(what the broadcast left out) is kept here and added to the next round's model before it is
encoded, so it is re-sent instead of lost (error feedback) and does not accumulate over rounds.

Each delta is against the round before's reconstruction, so the deltas form a chain: a device that
holds an older model of it (it missed rounds: not selected, failed, late) catches up by applying the
links since, in order (protocol 1.5, ``delta_chain``), and rebuilds the same weights bit for bit; so does
a device that holds nothing, from the run's seeded first model (or the quantised model after a
structured step). It is sent the chain only when that is smaller than the exact encoding; otherwise (no
link reaches what it holds, a chain that long, a device older than 1.5) it gets the exact encoding. A
link is kept while the chain from it to the newest costs less than the exact encoding. Each blob goes
out (retained) only if a selected device will fetch it, and the exact encoding is otherwise only
offered, for devices that ask (``blob_want``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_agent.protocol import codec, serde
from edge_agent.protocol.constants import DELTA_CHAINS_SINCE, MAX_DELTA_CHAIN, SEEDED_MODELS_SINCE

DOWNLOAD_FORMATS = ("exact", "fp16", "delta-int8", "delta-int4")
KEEP_BASES = 2  # reconstructions kept to encode a delta against (the devices keep as many, settings)


@dataclass(frozen=True)
class Link:
    """One broadcast of the chain: applied to the model ``base`` (None: to nothing) it rebuilds ``digest``."""

    digest: str
    base: str | None
    data: bytes
    since: tuple[int, int] | None = None  # the protocol version that reads it (a seeded model: 1.4)


@dataclass
class Cast:
    """One round's downlink: the reconstruction's digest, its exact encoding, and the smaller broadcast."""

    digest: str
    exact: bytes  # the reconstruction as fp32 + bitmaps: what a device without the base fetches
    small: bytes | None  # the delta, the quantised / fp16 model or a seeded first model; else None (exact)
    base: str | None  # the digest ``small`` is a delta against; None if it needs no base
    format: str
    since: tuple[int, int] | None = None  # the protocol version that reads ``small`` (a seeded model: 1.4)
    chain: tuple[Link, ...] = ()  # the links that end in ``small`` (it last), oldest first: catching up

    def readable_by(self, protocol: str | None) -> bool:
        """Whether a device that speaks ``protocol`` can decode the small broadcast."""
        return self.small is not None and (self.since is None or serde.version_at_least(protocol, self.since))

    def route(self, held: str | None, protocol: str | None = None) -> list[Link] | None:
        """The broadcasts a device that holds ``held`` and speaks ``protocol`` applies, in order, to rebuild
        this round's model (the first to ``held``, or to nothing; none if it holds the model already);
        None: it fetches the exact encoding."""
        if held is not None and held == self.digest:
            return []  # it holds this very model (it trained from it in a round that was not applied)
        if not self.readable_by(protocol):
            return None
        assert self.small is not None
        head = Link(self.digest, self.base, self.small, self.since)
        if self.base is None or held == self.base:
            return [head]
        if not serde.version_at_least(protocol, DELTA_CHAINS_SINCE) or not self.chain:
            return None
        total = 0
        for i in range(len(self.chain) - 1, -1, -1):  # back from the head, while cheaper than the exact model
            link = self.chain[i]
            total += len(link.data)
            if (
                total >= len(self.exact)
                or len(self.chain) - i > MAX_DELTA_CHAIN
                or not (link.since is None or serde.version_at_least(protocol, link.since))
            ):
                return None
            if link.base is None or (held is not None and link.base == held):
                return list(self.chain[i:])
        return None

    def size_for(self, held: str | None, protocol: str | None = None) -> int:
        route = self.route(held, protocol)
        return len(self.exact) if route is None else sum(len(link.data) for link in route)


@dataclass
class Downlink:
    format: str = "exact"
    error: list[np.ndarray] | None = None  # error feedback: what the last broadcast left out
    bases: dict[str, tuple[list[str], list[np.ndarray], list[np.ndarray | None]]] = field(default_factory=dict)
    holds: dict[str, str] = field(default_factory=dict)  # device -> digest of the model it last trained from
    seed: int = 0
    seeded: bool = False  # the next broadcast is a fresh initial model: send a seed, not weights
    links: list[Link] = field(default_factory=list)  # the chain of delta broadcasts (delta formats), oldest first
    last: str | None = None  # the digest of the last reconstruction: the next delta's base

    def prepare(self, gm: Any, run_id: str) -> Cast:
        """Encode the global model for the next round and replace ``gm.weights`` by the reconstruction."""
        names, masks = list(gm.names), list(gm.masks)
        target = [np.asarray(w, dtype=np.float32) for w in gm.weights]
        if self.error is not None and [e.shape for e in self.error] == [t.shape for t in target]:
            target = [t + e for t, e in zip(target, self.error)]
        target = [t * m if m is not None else t for t, m in zip(target, masks)]
        meta = {"run_id": run_id}
        base_digest, base = self._base_for(names, target)
        self.seed += 1
        small: bytes | None = None
        seeded = self.seeded and all(m is None or m.all() for m in masks)
        if seeded:  # any format: a seed is lossless
            small = codec.encode_seeded(target, names=names, masks=masks, seed=self.seed, meta=meta)
            recon = target = codec.decode(small).tensors  # it *is* the initial model: no error to feed back
        elif self.format == "fp16":
            small = codec.encode(target, names=names, masks=masks, kind="model", values="fp16", meta=meta)
            recon = codec.decode(small).tensors
        elif self.format != "exact":
            values = self.format.removeprefix("delta-")
            if base is None:
                small = codec.encode(
                    target, names=names, masks=masks, kind="model", values=values, meta=meta, seed=self.seed
                )
                recon = codec.decode(small).tensors
            else:
                _, ref, ref_masks = base
                small = codec.encode(
                    target,
                    names=names,
                    masks=masks,
                    kind="delta",
                    reference=ref,
                    reference_masks=ref_masks,
                    values=values,
                    delta=True,
                    meta={**meta, "base": base_digest},
                    seed=self.seed,
                )
                recon = codec.decode(small, reference=ref, reference_masks=ref_masks).tensors
        else:
            recon = target
        self.seeded = False
        gm.weights = recon
        exact = gm.encode(meta)  # fp32 values (and bitmaps when pruning): what a device without a base gets
        if self.format == "exact" and small is None:
            recon = gm.weights = codec.decode(exact).tensors
        self.error = None if self.format == "exact" else [t - r for t, r in zip(target, recon)]
        digest = codec.digest(names, recon, masks)
        self.bases[digest] = (names, recon, masks)
        while len(self.bases) > KEEP_BASES:
            self.bases.pop(next(iter(self.bases)))
        self.last = digest
        base_of_small = base_digest if small is not None and base is not None and not seeded else None
        since = SEEDED_MODELS_SINCE if seeded else None
        self._extend_chain(digest, base_of_small, small, since, len(exact))
        return Cast(digest, exact, small, base_of_small, self.format, since, tuple(self.links))

    def _extend_chain(
        self, digest: str, base: str | None, small: bytes | None, since: tuple[int, int] | None, exact_bytes: int
    ) -> None:
        """Add this round's broadcast to the chain (a self-contained one starts it again); drop the oldest
        links while every route through them costs more than the exact encoding."""
        if small is None or not (self.format.startswith("delta-") or since is not None):
            self.links = []
            return
        if base is None or not self.links or self.links[-1].digest != base:
            self.links = []
        self.links.append(Link(digest, base, small, since))
        while self.links and sum(len(link.data) for link in self.links) >= exact_bytes:
            self.links.pop(0)

    def finish(self, gm: Any) -> None:
        """After the last round nothing goes down again: the global model is the exact one (the aggregate
        plus what earlier broadcasts left out), not a reconstruction."""
        if self.error is not None and [e.shape for e in self.error] == [np.shape(w) for w in gm.weights]:
            gm.weights = [
                (np.asarray(w, np.float32) + e) * (m if m is not None else 1)
                for w, e, m in zip(gm.weights, self.error, gm.masks)
            ]
        self.error = None

    def _base_for(self, names: list[str], target: list[np.ndarray]):
        """The last reconstruction, which the devices of the last round hold and every other device on the
        chain reaches, if it has this model's tensors (a structured step changes them)."""
        if not self.format.startswith("delta-") or not self.holds or self.last is None:
            return None, None
        base = self.bases.get(self.last)
        if base is not None and base[0] == names and [b.shape for b in base[1]] == [t.shape for t in target]:
            return self.last, base
        return None, None

    def resume_from(self, bundle: codec.Bundle, devices: list[str]) -> None:
        """A resumed run: ``devices`` hold ``bundle`` (they trained from it in the last recorded round), so the
        next broadcast is a delta against it. The error still owed when the run stopped is lost (at most one
        quantisation step); a device that no longer holds the model fetches the exact one."""
        digest = codec.digest(bundle.names, bundle.tensors, bundle.masks)
        self.bases[digest] = (list(bundle.names), list(bundle.tensors), list(bundle.masks))
        self.last = digest
        self.holds.update(dict.fromkeys(devices, digest))

    def trained(self, device: str, digest: str) -> None:
        """``device``'s update of a round counted: it holds that round's model now."""
        self.holds[device] = digest
