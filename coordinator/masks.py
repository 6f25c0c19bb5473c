"""Pruning masks in numpy: magnitude per tensor or across tensors, 1x4 blocks, 2:4.

These mirror what TF-MOT does on the devices (``_update_mask``: keep
``max(round(n * (1 - s)), 1)`` by magnitude; block pooling by mean; 2:4 along
input channels, verified against TF-MOT in tests/test_pruning_tf.py), so the
coordinator can choose the global mask and check the clients' masks.

Policies for the global mask after aggregation:

Blocks are (16 x 1) on a [inputs, outputs] Dense kernel (see ``BLOCK``).

- ``global`` (default): one magnitude threshold across every pruned tensor at
  the round's sparsity. Small layers with large weights (the first conv, the
  classifier) keep more, the big dense layer gives up more; a per-tensor floor
  of ``MIN_DENSITY`` keeps any layer from being cut off entirely.
- ``layer``: the same sparsity in every tensor (TF-MOT's default).
- ``union`` / ``intersection`` of the clients' masks.
"""

from __future__ import annotations

import math

import numpy as np

MASK_POLICIES = ("global", "layer", "union", "intersection")
SPARSITY_TOLERANCE = 0.005
MIN_DENSITY = 0.01
BLOCK = (16, 1)  # as edge_agent.ml.pruning.BLOCK_SHAPE: 16 consecutive inputs of one output


def _topk_mask(score: np.ndarray, keep: int) -> np.ndarray:
    flat = score.reshape(-1)
    mask = np.zeros(flat.size, dtype=bool)
    if keep > 0:
        mask[np.argpartition(-flat, keep - 1)[:keep]] = True
    return mask.reshape(score.shape)


def keep_count(size: int, sparsity: float) -> int:
    """How many to keep, as TF-MOT computes it: max(round(size * (1 - s)), 1)."""
    return max(int(round(size * (1.0 - sparsity))), 1)


def _mbyn_view(x: np.ndarray) -> np.ndarray:
    """TF-MOT's m-by-n layout: input channels last, rows of [out, (h, w,) in]."""
    if x.ndim == 2:
        return x.T
    if x.ndim == 4:
        return x.transpose(3, 0, 1, 2).reshape(-1, x.shape[2])
    raise ValueError(f"2:4 sparsity needs a 2-D or 4-D kernel, got shape {x.shape}")


def _mbyn_unview(v: np.ndarray, shape: tuple) -> np.ndarray:
    if len(shape) == 2:
        return v.T
    return v.reshape(shape[3], shape[0], shape[1], shape[2]).transpose(1, 2, 3, 0)


def mbyn_mask(score: np.ndarray, m: int = 2, n: int = 4) -> np.ndarray:
    """Keep the n-m largest scores of every n consecutive input channels (padded at the end).

    Scores are importance values (``|w|``, or -1 for never-keep), not raw weights."""
    view = _mbyn_view(score)
    rows, cols = view.shape
    pad = (-cols) % n
    padded = np.pad(view, ((0, 0), (0, pad)), constant_values=-1.0)
    groups = padded.reshape(rows, -1, n)
    order = np.argsort(-groups, axis=-1, kind="stable")
    keep = np.zeros_like(groups, dtype=bool)
    np.put_along_axis(keep, order[..., : n - m], True, axis=-1)
    keep = keep.reshape(rows, -1)[:, :cols]
    return _mbyn_unview(keep, score.shape)


def _block_pool(a: np.ndarray, block: tuple[int, int], how: str) -> np.ndarray:
    """Mean, max or element count of a 2-D array over (bh x bw) blocks; edge blocks are partial."""
    bh, bw = block
    pr, pc = (-a.shape[0]) % bh, (-a.shape[1]) % bw
    padded = np.pad(a.astype(np.float64), ((0, pr), (0, pc)), constant_values=np.nan)
    blocks = padded.reshape(padded.shape[0] // bh, bh, padded.shape[1] // bw, bw)
    if how == "count":
        return np.sum(~np.isnan(blocks), axis=(1, 3))
    return np.nanmean(blocks, axis=(1, 3)) if how == "mean" else np.nanmax(blocks, axis=(1, 3))


def block_mask(score: np.ndarray, sparsity: float, block: tuple[int, int] = BLOCK) -> np.ndarray:
    """Keep the blocks of a 2-D kernel with the largest mean score (TF-MOT's AVG pooling)."""
    if score.ndim != 2:
        raise ValueError("block sparsity needs a 2-D kernel")
    pooled = _block_pool(score, block, "mean")
    keep_blocks = _topk_mask(pooled, keep_count(pooled.size, sparsity))
    full = np.repeat(np.repeat(keep_blocks, block[0], axis=0), block[1], axis=1)
    return full[: score.shape[0], : score.shape[1]]


def magnitude_mask(score: np.ndarray, sparsity: float, kind: str, within: np.ndarray | None = None) -> np.ndarray:
    """The mask of one tensor at ``sparsity`` for its granularity ``kind``."""
    s = np.abs(score).astype(np.float64)
    if within is not None:
        s = np.where(within, s, -1.0)  # never regrow what is already pruned
    if kind == "2:4":
        mask = mbyn_mask(s)
    elif kind.startswith("block"):
        mask = block_mask(s, sparsity)
    else:
        mask = _topk_mask(s, keep_count(s.size, sparsity))
    return mask if within is None else mask & within


def check_mask(mask: np.ndarray, kind: str, sparsity: float) -> str | None:
    """Why ``mask`` violates the round's target, or None if it is fine."""
    if kind == "2:4":
        view = _mbyn_view(mask.astype(np.int8))
        pad = (-view.shape[1]) % 4
        per_group = np.pad(view, ((0, 0), (0, pad))).reshape(view.shape[0], -1, 4).sum(-1)
        return None if per_group.max(initial=0) <= 2 else "more than 2 of 4 consecutive weights kept"
    if kind.startswith("block"):  # count blocks, as TF-MOT does (edge blocks are partial)
        mask = _block_pool(mask, BLOCK, "max") > 0
    achieved = 1.0 - mask.sum() / mask.size
    needed = 1.0 - keep_count(mask.size, sparsity) / mask.size
    if achieved + SPARSITY_TOLERANCE < needed:
        return f"sparsity {achieved:.4f} is below the round's target {needed:.4f}"
    return None


def _units(score: np.ndarray, kind: str):
    """Selection units of a tensor: (scores, sizes, expand) for elements or blocks."""
    if kind.startswith("block"):
        pooled = _block_pool(score, BLOCK, "mean")
        counts = _block_pool(score, BLOCK, "count").astype(np.int64)

        def expand(keep):
            full = np.repeat(np.repeat(keep.reshape(pooled.shape), BLOCK[0], axis=0), BLOCK[1], axis=1)
            return full[: score.shape[0], : score.shape[1]]

        return pooled.reshape(-1), counts.reshape(-1), expand
    return score.reshape(-1), np.ones(score.size, dtype=np.int64), lambda keep: keep.reshape(score.shape)


def global_magnitude_masks(
    scores: list[np.ndarray | None],
    kinds: list[str | None],
    sparsity: float,
    within: list[np.ndarray | None] | None = None,
) -> list[np.ndarray | None]:
    """One threshold across all pruned tensors so that ``sparsity`` of their weights is pruned.

    2:4 tensors keep their own pattern and stay out of the budget. Each tensor keeps at
    least ``MIN_DENSITY`` of its weights (when ``within`` allows)."""
    within = within or [None] * len(scores)
    out: list[np.ndarray | None] = [None] * len(scores)
    parts = []
    for i, (sc, kind) in enumerate(zip(scores, kinds)):
        if kind is None:
            continue
        s = np.where(within[i], sc, -1.0) if within[i] is not None else np.asarray(sc, dtype=np.float64)
        if kind == "2:4":
            out[i] = mbyn_mask(s) & (within[i] if within[i] is not None else True)
            continue
        unit_scores, unit_sizes, expand = _units(s, kind)
        parts.append((i, unit_scores, unit_sizes, expand, sc.size))
    if not parts:
        return out
    total = sum(p[4] for p in parts)
    budget = int(round(total * (1.0 - sparsity)))
    all_scores = np.concatenate([p[1] for p in parts])
    all_sizes = np.concatenate([p[2] for p in parts])
    order = np.argsort(-all_scores, kind="stable")
    order = order[all_scores[order] >= 0]  # never keep what ``within`` excludes
    cum = np.cumsum(all_sizes[order])
    chosen = order[: int(np.searchsorted(cum, budget, side="left")) + 1] if budget > 0 else order[:0]
    keep = np.zeros(all_scores.size, dtype=bool)
    keep[chosen] = True
    offset = 0
    for i, unit_scores, _unit_sizes, expand, _size in parts:
        k = keep[offset : offset + unit_scores.size]
        floor_units = max(1, math.ceil(MIN_DENSITY * unit_scores.size))
        if k.sum() < floor_units:
            valid = np.flatnonzero(unit_scores >= 0)
            top = valid[np.argsort(-unit_scores[valid], kind="stable")[:floor_units]]
            k = k.copy()
            k[top] = True
        out[i] = expand(k)
        offset += unit_scores.size
    return out


def round_targets(
    weights: list[np.ndarray], masks: list[np.ndarray | None], kinds: list[str | None], policy: str, sparsity: float
) -> list[float]:
    """The sparsity each client prunes each tensor to this round.

    ``global``: the per-tensor split of a global-magnitude mask previewed on the
    current global weights (inside the current mask, so nothing regrows); else
    the same sparsity everywhere. 2:4 tensors are 50% by construction."""
    if policy == "global":
        preview = global_magnitude_masks(
            [np.abs(w) if k else None for w, k in zip(weights, kinds)], kinds, sparsity, masks
        )
        return [0.0 if k is None else 0.5 if k == "2:4" else 1.0 - float(m.mean()) for m, k in zip(preview, kinds)]
    return [0.0 if k is None else 0.5 if k == "2:4" else sparsity for k in kinds]


def sparsity_report(masks: list[np.ndarray | None], names: list[str], shapes: list[tuple]) -> dict:
    """Achieved sparsity per pruned tensor, over pruned tensors, and over all parameters."""
    per, zeros, pruned_total = {}, 0, 0
    for name, m in zip(names, masks):
        if m is None:
            continue
        per[name] = round(1.0 - float(m.sum()) / m.size, 5)
        zeros += m.size - int(m.sum())
        pruned_total += m.size
    params = sum(int(np.prod(s)) for s in shapes)
    return {
        "per_tensor": per,
        "prunable": round(zeros / pruned_total, 5) if pruned_total else 0.0,
        "overall": round(zeros / params, 5) if params else 0.0,
    }
