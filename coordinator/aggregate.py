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

Mask policies (see :mod:`.masks`): ``global`` magnitude across all pruned
tensors (default), ``layer`` magnitude per tensor, ``union`` (kept by any
client), ``intersection`` (kept by every client).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .masks import MASK_POLICIES, check_mask, global_magnitude_masks, magnitude_mask


class UpdateRejected(ValueError):
    """An update that must not be aggregated (NaN/Inf, wrong shape, mask breaks the round's target)."""


# -- streaming aggregation -----------------------------------------------------

@dataclass
class TensorInfo:
    name: str
    kind: str | None  # None: not pruned (dense); else "unstructured", "block16x1" or "2:4"


class MaskedFedAvg:
    def __init__(self, infos: list[TensorInfo], shapes: list[tuple]):
        self.infos = infos
        self.sum = [np.zeros(s, np.float64) for s in shapes]
        self.kept = [np.zeros(s, np.float64) if i.kind else 0.0 for i, s in zip(infos, shapes)]
        self.votes = [np.zeros(s, np.int32) if i.kind else None for i, s in zip(infos, shapes)]
        self.total = 0.0
        self.count = 0

    def validate(self, tensors: list[np.ndarray], masks: list[np.ndarray | None], targets: list[float]) -> None:
        """Refuse NaN/Inf, wrong shapes, and masks that do not reach each tensor's target sparsity."""
        if len(tensors) != len(self.infos):
            raise UpdateRejected(f"update has {len(tensors)} tensors, the model has {len(self.infos)}")
        for info, t, acc in zip(self.infos, tensors, self.sum):
            if t.shape != acc.shape:
                raise UpdateRejected(f"{info.name}: shape {t.shape} != {acc.shape}")
            if not np.all(np.isfinite(t)):
                raise UpdateRejected(f"{info.name}: contains NaN or Inf")
        for info, m, target in zip(self.infos, masks, targets):
            if info.kind is None:
                if m is not None:
                    raise UpdateRejected(f"{info.name}: a mask on a tensor that is not pruned")
                continue
            if m is None:
                raise UpdateRejected(f"{info.name}: pruned tensor sent without a mask")
            why = check_mask(m, info.kind, target)
            if why:
                raise UpdateRejected(f"{info.name}: {why}")

    @property
    def nbytes(self) -> int:
        """Memory held by the running sums: O(model), whatever the number of clients."""
        arrays = [*self.sum, *self.kept, *self.votes]
        return int(sum(a.nbytes for a in arrays if isinstance(a, np.ndarray)))

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
               within: list[np.ndarray | None] | None) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
        """The new global weights and masks. Importance is |sum| / total: consensus across clients.

        ``within``: the previous global masks when nothing may regrow, else None."""
        within = within or [None] * len(self.infos)
        if self.count == 0:
            raise ValueError("no updates to aggregate")
        values = [np.divide(sm, kp, out=np.zeros_like(sm), where=np.asarray(kp) > 0) if i.kind else sm / kp
                  for i, sm, kp in zip(self.infos, self.sum, self.kept)]
        kinds = [i.kind for i in self.infos]
        if policy == "global":
            masks = global_magnitude_masks([np.abs(sm) / self.total if k else None for sm, k in zip(self.sum, kinds)],
                                           kinds, sparsity, within)
        else:
            masks = []
            for i, kind in enumerate(kinds):
                if kind is None:
                    masks.append(None)
                elif policy == "layer" or kind == "2:4":
                    masks.append(magnitude_mask(np.abs(self.sum[i]) / self.total, sparsity, kind, within[i]))
                elif policy == "union":
                    masks.append(self.votes[i] > 0)
                elif policy == "intersection":
                    masks.append(self.votes[i] == self.count)
                else:
                    raise ValueError(f"unknown mask policy {policy!r}")
        weights = []
        for i, (v, m) in enumerate(zip(values, masks)):
            if m is not None:
                m &= self.kept[i] > 0  # nobody kept it: it stays pruned
                v = v * m
            weights.append(v.astype(np.float32))
        return weights, masks


# -- robust aggregation ----------------------------------------------------------

AGGREGATIONS = ("fedavg", "median", "trimmed-mean")


def _sq(x: np.ndarray) -> float:
    v = x.ravel().astype(np.float64)
    return float(v @ v)


def model_norm(tensors: list[np.ndarray]) -> float:
    return float(np.sqrt(sum(_sq(t) for t in tensors)))


def update_norm(tensors: list[np.ndarray], reference: list[np.ndarray]) -> float:
    """L2 norm of the update (client weights minus the global weights it started from), all tensors."""
    return float(np.sqrt(sum(_sq(np.subtract(t, r, dtype=np.float64)) for t, r in zip(tensors, reference))))


def check_norm(tensors: list[np.ndarray], reference: list[np.ndarray], max_ratio: float,
               reference_norm: float | None = None) -> float:
    """Refuse an update that moves the model more than ``max_ratio`` times the model's own norm:
    no honest local training does that; a broken or hostile client does. (``reference_norm``:
    the model's norm, computed once per round by the caller.)"""
    norm = update_norm(tensors, reference)
    scale = model_norm(reference) if reference_norm is None else reference_norm
    if max_ratio > 0 and norm > max_ratio * max(scale, 1e-12):
        raise UpdateRejected(f"update norm {norm:.4g} is {norm / max(scale, 1e-12):.1f}x the model's norm "
                             f"{scale:.4g} (limit {max_ratio:g}x)")
    return norm


def clip_update(tensors: list[np.ndarray], reference: list[np.ndarray], clip_norm: float) -> list[np.ndarray]:
    """Scale the update down to L2 norm ``clip_norm`` if it is longer (masks are applied later, in add)."""
    norm = update_norm(tensors, reference)
    if clip_norm <= 0 or norm <= clip_norm:
        return tensors
    scale = clip_norm / norm
    return [(r + (t.astype(np.float64) - r) * scale).astype(t.dtype) for t, r in zip(tensors, reference)]


def _trimmed_mean(stack: np.ndarray, trim: float) -> np.ndarray:
    """Per position: drop floor(trim * k) lowest and highest of the k values present (NaN = absent),
    at least one at each end once k >= 3 (else a small fleet would trim nothing)."""
    srt = np.sort(stack, axis=0)  # NaNs sort last
    k = np.sum(~np.isnan(stack), axis=0)
    cut = np.floor(trim * k)
    if trim > 0:
        cut = np.where(k >= 3, np.maximum(cut, 1), cut)
    idx = np.arange(stack.shape[0]).reshape((-1,) + (1,) * (stack.ndim - 1))
    keep = (idx >= cut) & (idx < k - cut)
    total = np.sum(np.where(keep, srt, 0.0), axis=0)
    n = np.sum(keep, axis=0)
    return np.divide(total, n, out=np.zeros_like(total), where=n > 0)


class RobustFedAvg(MaskedFedAvg):
    """Coordinate-wise median or trimmed mean among the clients that kept each position.

    The mask policy still works from the streaming (FedAvg) sums, so which weights survive is
    decided by the sample-weighted consensus; only the surviving values are robust statistics.
    Unlike FedAvg this keeps every update of the round: memory O(clients x model).
    Client weights (sample counts) do not enter the robust statistics.
    """

    def __init__(self, infos: list[TensorInfo], shapes: list[tuple], method: str, trim: float = 0.1):
        super().__init__(infos, shapes)
        if method not in ("median", "trimmed-mean"):
            raise ValueError(f"unknown robust aggregation {method!r}")
        if not 0.0 <= trim < 0.5:
            raise ValueError("trim must be in [0, 0.5)")
        self.method, self.trim = method, trim
        self.values: list[list[np.ndarray]] = [[] for _ in infos]

    def add(self, tensors: list[np.ndarray], masks: list[np.ndarray | None], weight: float) -> None:
        super().add(tensors, masks, weight)
        for i, (t, m) in enumerate(zip(tensors, masks)):
            v = t.astype(np.float64)
            self.values[i].append(np.where(m, v, np.nan) if m is not None else v)

    @property
    def nbytes(self) -> int:
        return super().nbytes + int(sum(v.nbytes for vs in self.values for v in vs))

    def result(self, policy: str, sparsity: float, within=None):
        weights, masks = super().result(policy, sparsity, within)
        for i, m in enumerate(masks):
            stack = np.stack(self.values[i])
            if self.method == "median":
                present = ~np.all(np.isnan(stack), axis=0)
                center = np.nanmedian(np.where(present, stack, 0.0), axis=0)
            else:
                center = _trimmed_mean(stack, self.trim)
            center = np.nan_to_num(center)
            weights[i] = (center * m if m is not None else center).astype(np.float32)
        return weights, masks


def make_aggregator(method: str, infos: list[TensorInfo], shapes: list[tuple], trim: float = 0.1) -> MaskedFedAvg:
    if method == "fedavg":
        return MaskedFedAvg(infos, shapes)
    return RobustFedAvg(infos, shapes, method, trim)
