"""Masked, streaming FedAvg and the global-mask policies.

Updates are folded into running sums as they arrive, so memory is O(model)
whatever the number of clients. For every position the aggregate keeps

- ``sum``   = sum_k n_k * w_k * m_k      (weights of clients that kept it)
- ``kept``  = sum_k n_k * m_k            (their total sample weight)
- ``votes`` = number of clients that kept it

and at the end a position's value is ``sum / kept`` (FedAvg among the clients
that kept it) while its importance for the magnitude policy is
``|sum| / total`` (positions few clients kept rank lower). Pruned positions are
exactly zero in the global model.

Mask policies: ``magnitude`` (default: the largest aggregated weights at the
round's scheduled sparsity, per tensor, as TF-MOT does per layer),
``union`` (kept by any client), ``intersection`` (kept by every client).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MASK_POLICIES = ("magnitude", "union", "intersection")
SPARSITY_TOLERANCE = 0.005


class UpdateRejected(ValueError):
    """An update that must not be aggregated (NaN/Inf, wrong shape, mask breaks the round's target)."""


# -- mask construction ---------------------------------------------------------

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


BLOCK = (1, 4)


def _block_pool(a: np.ndarray, block: tuple[int, int], how: str) -> np.ndarray:
    """Mean or max of a 2-D array over (bh x bw) blocks; edge blocks are partial (padding ignored)."""
    bh, bw = block
    pr, pc = (-a.shape[0]) % bh, (-a.shape[1]) % bw
    padded = np.pad(a.astype(np.float64), ((0, pr), (0, pc)), constant_values=np.nan)
    blocks = padded.reshape(padded.shape[0] // bh, bh, padded.shape[1] // bw, bw)
    return np.nanmean(blocks, axis=(1, 3)) if how == "mean" else np.nanmax(blocks, axis=(1, 3))


def block_mask(score: np.ndarray, sparsity: float, block: tuple[int, int] = BLOCK) -> np.ndarray:
    """Keep the (1 x 4) blocks of a 2-D kernel with the largest mean score (TF-MOT's AVG pooling)."""
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


# -- streaming aggregation -----------------------------------------------------

@dataclass
class TensorInfo:
    name: str
    kind: str | None  # None: not pruned (dense); else "unstructured", "block1x4" or "2:4"


class MaskedFedAvg:
    def __init__(self, infos: list[TensorInfo], shapes: list[tuple]):
        self.infos = infos
        self.sum = [np.zeros(s, np.float64) for s in shapes]
        self.kept = [np.zeros(s, np.float64) if i.kind else 0.0 for i, s in zip(infos, shapes)]
        self.votes = [np.zeros(s, np.int32) if i.kind else None for i, s in zip(infos, shapes)]
        self.total = 0.0
        self.count = 0

    def validate(self, tensors: list[np.ndarray], masks: list[np.ndarray | None], sparsity: float) -> None:
        if len(tensors) != len(self.infos):
            raise UpdateRejected(f"update has {len(tensors)} tensors, the model has {len(self.infos)}")
        for info, t, acc in zip(self.infos, tensors, self.sum):
            if t.shape != acc.shape:
                raise UpdateRejected(f"{info.name}: shape {t.shape} != {acc.shape}")
            if not np.all(np.isfinite(t)):
                raise UpdateRejected(f"{info.name}: contains NaN or Inf")
        for info, m in zip(self.infos, masks):
            if info.kind is None:
                if m is not None:
                    raise UpdateRejected(f"{info.name}: a mask on a tensor that is not pruned")
                continue
            if m is None:
                raise UpdateRejected(f"{info.name}: pruned tensor sent without a mask")
            why = check_mask(m, info.kind, sparsity)
            if why:
                raise UpdateRejected(f"{info.name}: {why}")

    def add(self, tensors: list[np.ndarray], masks: list[np.ndarray | None], weight: float) -> None:
        for i, (t, m) in enumerate(zip(tensors, masks)):
            if self.infos[i].kind is None:
                self.sum[i] += weight * t
                self.kept[i] += weight
            else:
                self.sum[i] += weight * (t * m)
                self.kept[i] += weight * m
                self.votes[i] += m
        self.total += weight
        self.count += 1

    def result(self, policy: str, sparsity: float,
               previous_masks: list[np.ndarray | None]) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
        if self.count == 0:
            raise ValueError("no updates to aggregate")
        weights, masks = [], []
        for i, info in enumerate(self.infos):
            kept = self.kept[i]
            if info.kind is None:
                weights.append((self.sum[i] / kept).astype(np.float32))
                masks.append(None)
                continue
            value = np.divide(self.sum[i], kept, out=np.zeros_like(self.sum[i]), where=kept > 0)
            if policy == "magnitude" or info.kind == "2:4":
                mask = magnitude_mask(self.sum[i] / self.total, sparsity, info.kind, within=previous_masks[i])
            elif policy == "union":
                mask = self.votes[i] > 0
            elif policy == "intersection":
                mask = self.votes[i] == self.count
            else:
                raise ValueError(f"unknown mask policy {policy!r}")
            mask &= kept > 0
            weights.append((value * mask).astype(np.float32))
            masks.append(mask)
        return weights, masks


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
    return {"per_tensor": per, "prunable": round(zeros / pruned_total, 5) if pruned_total else 0.0,
            "overall": round(zeros / params, 5) if params else 0.0}
