"""fedavg: masked, streaming FedAvg and the global-mask policies (the default strategy).

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

import numpy as np

from ..masks import check_mask, global_magnitude_masks, magnitude_mask
from . import register
from .base import TensorInfo, UpdateRejected


@register("fedavg")
class MaskedFedAvg:
    """Sample-weighted FedAvg among the clients that kept each position; O(model) memory."""

    def __init__(self, infos: list[TensorInfo], shapes: list[tuple], trim: float = 0.1):
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

    def result(
        self, policy: str, sparsity: float, within: list[np.ndarray | None] | None
    ) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
        """The new global weights and masks. Importance is |sum| / total: consensus across clients.

        ``within``: the previous global masks when nothing may regrow, else None."""
        within = within or [None] * len(self.infos)
        if self.count == 0:
            raise ValueError("no updates to aggregate")
        values = [
            np.divide(sm, kp, out=np.zeros_like(sm), where=np.asarray(kp) > 0) if i.kind else sm / kp
            for i, sm, kp in zip(self.infos, self.sum, self.kept)
        ]
        kinds = [i.kind for i in self.infos]
        if policy == "global":
            masks = global_magnitude_masks(
                [np.abs(sm) / self.total if k else None for sm, k in zip(self.sum, kinds)], kinds, sparsity, within
            )
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
