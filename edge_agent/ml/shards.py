"""How a data set is split into the shards devices hold.

A device holds one shard of a built-in training split (``data_shard`` INDEX/COUNT).
Every device computes the whole partition from ``data_seed`` and keeps its shard, so
a fleet with one seed holds disjoint shards that together cover the training split
(every sample in exactly one shard). The partitions (see :func:`partition`):

- ``iid``: a seeded permutation cut into COUNT near-equal parts.
- ``dirichlet`` (concentration ``data_alpha``) or ``dirichlet:ALPHA``: label skew as in
  Hsu et al. 2019; each class is split over the shards in Dirichlet(ALPHA) proportions,
  then a shard left under ``MIN_SHARD_SAMPLES`` is topped up deterministically.
- ``classes:C``: pathological label skew (McMahan et al. 2017; NIID-Bench's #C=k):
  every shard holds exactly C classes, each class split equally over its holders.

Pure numpy, so it is tested without TensorFlow.
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass

import numpy as np

MIN_SHARD_SAMPLES = 10
"""A Dirichlet shard smaller than this (or than COUNT-th of the data) is topped up; see :func:`partition`."""

PARTITION_KINDS = ("iid", "dirichlet", "classes")
PARTITION_FORMS = "iid, dirichlet (alpha from data_alpha), dirichlet:ALPHA or classes:C"


@dataclass(frozen=True)
class PartitionSpec:
    """A parsed ``data_partition``: ``iid``, ``dirichlet`` with its alpha, or ``classes`` with C."""

    kind: str
    alpha: float | None = None
    classes: int | None = None

    def __str__(self) -> str:
        if self.kind == "dirichlet":
            return f"dirichlet:{self.alpha:g}"
        if self.kind == "classes":
            return f"classes:{self.classes}"
        return self.kind


def parse_partition(spec: str, alpha: float = 0.5) -> PartitionSpec:
    """``iid``, ``dirichlet`` (concentration ``alpha``, i.e. the data_alpha setting),
    ``dirichlet:ALPHA`` (ALPHA given here wins) or ``classes:C``; ValueError naming the forms otherwise."""
    kind, sep, arg = str(spec).strip().lower().partition(":")
    arg = arg.strip()
    if kind == "iid" and not sep:
        return PartitionSpec("iid")
    if kind == "dirichlet":
        if sep:
            try:
                alpha = float(arg)
            except ValueError:
                raise ValueError(f"{spec!r}: ALPHA in dirichlet:ALPHA must be a number, e.g. dirichlet:0.1") from None
        if not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"{spec!r}: the Dirichlet concentration must be a positive number, got {alpha}")
        return PartitionSpec("dirichlet", alpha=float(alpha))
    if kind == "classes":
        if not sep or not arg.isdigit() or int(arg) < 1:
            raise ValueError(f"{spec!r}: use classes:C with C >= 1 classes per device, e.g. classes:2")
        return PartitionSpec("classes", classes=int(arg))
    raise ValueError(f"{spec!r} is not a partition: use {PARTITION_FORMS}")


def partition(
    labels: np.ndarray, num_shards: int, mode: str | PartitionSpec = "iid", alpha: float = 0.5, seed: int = 0
) -> list[np.ndarray]:
    """Split sample indices into ``num_shards`` disjoint, non-empty shards that cover all samples.

    ``mode`` is a partition as parsed by :func:`parse_partition` (``alpha`` is the
    concentration of a bare ``dirichlet``). Everything is drawn from one
    ``numpy.random.default_rng(seed)``, so every device computes the same shards.
    Shards are returned as sorted int64 index arrays.

    - ``iid``: a random permutation cut into ``num_shards`` near-equal parts (``np.array_split``).
    - ``dirichlet``: for every class in label order, its samples in a random order are cut
      in proportions drawn from Dirichlet(alpha) over the shards (smaller alpha = more skew).
      A shard then holding fewer than ``m = min(MIN_SHARD_SAMPLES, N // num_shards)`` samples
      is topped up, one sample at a time: the smallest shard (lowest index on ties) takes from
      the largest shard (lowest index on ties) its last sample, in draw order, of its most
      frequent class (lowest label on ties), until every shard holds at least ``m``. When the
      draw leaves no shard short (the usual case) the shards are exactly those of the earlier
      "redraw until every shard has m samples" partition, whose first draw this is.
    - ``classes:C``: shard after shard, each takes the C classes held by the fewest shards so
      far (seeded random order among ties), so every shard has exactly C distinct classes and
      every class is held by floor or ceil(num_shards * C / K) shards; each class's samples in
      a random order are then split equally (``np.array_split``) over its holders in shard
      order. Needs C <= K (classes in the data) and num_shards * C >= K (else some class
      would be in no shard); a shard is never topped up with other classes, so one that
      would be empty is an error.
    """
    spec = mode if isinstance(mode, PartitionSpec) else parse_partition(mode, alpha)
    labels = np.asarray(labels)
    n = len(labels)
    if num_shards < 1:
        raise ValueError("num_shards must be >= 1")
    if n < num_shards:
        raise ValueError(f"cannot split {n} samples into {num_shards} non-empty shards")
    rng = np.random.default_rng(seed)
    if spec.kind == "iid":
        shards = list(np.array_split(rng.permutation(n), num_shards))
    elif spec.kind == "dirichlet" and spec.alpha is not None:
        shards = _dirichlet_shards(labels, num_shards, spec.alpha, rng)
    elif spec.kind == "classes" and spec.classes is not None:
        shards = _class_shards(labels, num_shards, spec.classes, rng)
    else:  # pragma: no cover - parse_partition only makes the kinds above
        raise ValueError(f"unknown partition {spec}")
    return [np.sort(np.asarray(s, dtype=np.int64)) for s in shards]


def _dirichlet_shards(labels: np.ndarray, num_shards: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    parts: list[list[np.ndarray]] = [[] for _ in range(num_shards)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cuts = (np.cumsum(rng.dirichlet([alpha] * num_shards)) * len(idx)).astype(int)[:-1]
        for s, part in enumerate(np.split(idx, cuts)):
            parts[s].append(part)
    shards = [np.concatenate(p) if p else np.zeros(0, np.int64) for p in parts]
    minimum = min(MIN_SHARD_SAMPLES, len(labels) // num_shards)
    sizes = np.array([len(s) for s in shards])
    while sizes.min() < minimum:  # the top-up; the largest shard always has more than `minimum`
        taker, giver = int(np.argmin(sizes)), int(np.argmax(sizes))
        donor = shards[giver]
        majority = np.bincount(labels[donor]).argmax()
        pick = int(np.flatnonzero(labels[donor] == majority)[-1])
        shards[taker] = np.append(shards[taker], donor[pick])
        shards[giver] = np.delete(donor, pick)
        sizes[taker] += 1
        sizes[giver] -= 1
    return shards


def _class_shards(labels: np.ndarray, num_shards: int, per_shard: int, rng: np.random.Generator) -> list[np.ndarray]:
    classes = np.unique(labels)
    k = len(classes)
    if per_shard > k:
        raise ValueError(f"classes:{per_shard}: the data has only {k} classes")
    if num_shards * per_shard < k:
        raise ValueError(
            f"classes:{per_shard} with {num_shards} shards covers at most {num_shards * per_shard} of the "
            f"{k} classes, and every sample must be in a shard: use more shards or a larger C"
        )
    held = np.zeros(k, dtype=np.int64)
    holders: list[list[int]] = [[] for _ in range(k)]
    for s in range(num_shards):
        pick = np.lexsort((rng.random(k), held))[:per_shard]  # fewest holders first, random among ties
        held[pick] += 1
        for c in pick:
            holders[c].append(s)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_shards)]
    for c, label in enumerate(classes):
        idx = rng.permutation(np.flatnonzero(labels == label))
        for s, part in zip(sorted(holders[c]), np.array_split(idx, len(holders[c]))):
            parts[s].append(part)
    shards = [np.concatenate(p) for p in parts]
    for s, shard in enumerate(shards):
        if not len(shard):
            raise ValueError(
                f"classes:{per_shard}: shard {s} would be empty (its classes have fewer samples than "
                f"holders): use fewer shards"
            )
    return shards


def partition_digest(shards: list[np.ndarray]) -> str:
    """A short fingerprint of a whole partition: devices of one fleet must report the same one."""
    h = hashlib.sha256()
    for s in shards:
        h.update(struct.pack(">Q", len(s)))
        h.update(np.asarray(s, dtype=">i8").tobytes())
    return h.hexdigest()[:8]


def label_histogram(y: np.ndarray, num_classes: int) -> list[int]:
    return np.bincount(y, minlength=num_classes).astype(int).tolist()
