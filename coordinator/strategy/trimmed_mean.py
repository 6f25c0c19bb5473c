"""trimmed-mean: per position, the mean after cutting the lowest and highest values (``--trim`` at each end)."""

from __future__ import annotations

import numpy as np

from . import register
from .robust import RobustFedAvg


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


@register("trimmed-mean")
class TrimmedMean(RobustFedAvg):
    def center(self, stack: np.ndarray) -> np.ndarray:
        return _trimmed_mean(stack, self.trim)
