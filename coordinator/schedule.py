"""Sparsity schedules over federated rounds.

``polynomial`` follows TF-MOT's PolynomialDecay (cubic) across rounds: it prunes
fast while the model is redundant and slowly near the target, reaches the target
after ``ramp_fraction`` of the rounds and then holds it, so the last rounds
recover accuracy under a fixed mask. ``constant`` prunes to the target in round 1.
"""

from __future__ import annotations

import math

SCHEDULES = ("polynomial", "constant")
DEFAULT_RAMP_FRACTION = 0.8


def sparsity_at(
    rnd: int, rounds: int, target: float, kind: str = "polynomial", ramp_fraction: float = DEFAULT_RAMP_FRACTION
) -> float:
    """Target sparsity after round ``rnd`` (1-based; round 0 is the dense start)."""
    if not 0.0 <= target < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {target}")
    if rnd <= 0 or target == 0.0:
        return 0.0
    if kind == "constant":
        return target
    if kind != "polynomial":
        raise ValueError(f"unknown schedule {kind!r}; choose from {', '.join(SCHEDULES)}")
    ramp = max(1, math.ceil(rounds * ramp_fraction))
    p = min(1.0, rnd / ramp)
    return target * (1.0 - (1.0 - p) ** 3)
