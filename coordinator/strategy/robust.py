"""The shared half of the robust strategies: keep every update of the round, take a statistic per position."""

from __future__ import annotations

import numpy as np

from .base import TensorInfo
from .fedavg import MaskedFedAvg


class RobustFedAvg(MaskedFedAvg):
    """Coordinate-wise median or trimmed mean among the clients that kept each position.

    The mask policy still works from the streaming (FedAvg) sums, so which weights survive is
    decided by the sample-weighted consensus; only the surviving values are robust statistics.
    Unlike FedAvg this keeps every update of the round: memory O(clients x model).
    Client weights (sample counts) do not enter the robust statistics.
    """

    def __init__(self, infos: list[TensorInfo], shapes: list[tuple], trim: float = 0.1):
        super().__init__(infos, shapes)
        if not 0.0 <= trim < 0.5:
            raise ValueError("trim must be in [0, 0.5)")
        self.trim = trim
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
            center = np.nan_to_num(self.center(np.stack(self.values[i])))
            weights[i] = (center * m if m is not None else center).astype(np.float32)
        return weights, masks

    def center(self, stack: np.ndarray) -> np.ndarray:
        """Per position, the robust value of the clients' values (NaN = that client did not keep it)."""
        raise NotImplementedError
