"""Defences that apply whatever the strategy: the update-norm check and norm clipping."""

from __future__ import annotations

import numpy as np

from .base import UpdateRejected


def _sq(x: np.ndarray) -> float:
    v = x.ravel().astype(np.float64)
    return float(v @ v)


def model_norm(tensors: list[np.ndarray]) -> float:
    return float(np.sqrt(sum(_sq(t) for t in tensors)))


def update_norm(tensors: list[np.ndarray], reference: list[np.ndarray]) -> float:
    """L2 norm of the update (client weights minus the global weights it started from), all tensors."""
    return float(np.sqrt(sum(_sq(np.subtract(t, r, dtype=np.float64)) for t, r in zip(tensors, reference))))


def check_norm(
    tensors: list[np.ndarray], reference: list[np.ndarray], max_ratio: float, reference_norm: float | None = None
) -> float:
    """Refuse an update that moves the model more than ``max_ratio`` times the model's own norm:
    no honest local training does that; a broken or hostile client does. (``reference_norm``:
    the model's norm, computed once per round by the caller.)"""
    norm = update_norm(tensors, reference)
    scale = model_norm(reference) if reference_norm is None else reference_norm
    if max_ratio > 0 and norm > max_ratio * max(scale, 1e-12):
        raise UpdateRejected(
            f"update norm {norm:.4g} is {norm / max(scale, 1e-12):.1f}x the model's norm "
            f"{scale:.4g} (limit {max_ratio:g}x)"
        )
    return norm


def clip_update(tensors: list[np.ndarray], reference: list[np.ndarray], clip_norm: float) -> list[np.ndarray]:
    """Scale the update down to L2 norm ``clip_norm`` if it is longer (masks are applied later, in add)."""
    norm = update_norm(tensors, reference)
    if clip_norm <= 0 or norm <= clip_norm:
        return tensors
    scale = clip_norm / norm
    return [(r + (t.astype(np.float64) - r) * scale).astype(t.dtype) for t, r in zip(tensors, reference)]
