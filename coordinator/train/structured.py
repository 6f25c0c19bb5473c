"""Structured pruning across the fleet: fold the devices' unit statistics, cut units, rebuild the model."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import surgery
from .record import Run


def fold_importance(run: Run, dev: str, stats: Any, weight: float) -> None:
    """Add one device's per-unit statistics, weighted by its samples; statistics that do not match
    the model (a layer missing, a wrong length, not finite) are dropped with a warning naming the layer."""
    units = run.gm.units
    try:
        layers = stats["layers"]
        vectors = {}
        for layer in sorted(run.gm.structure["shrinkable"]):
            if layer not in layers:
                raise ValueError(f"layer {layer}: no statistics")
            v = np.asarray(layers[layer], np.float64)
            if v.shape != (units[layer],):
                raise ValueError(f"layer {layer} has {units[layer]} units, the statistics {v.size}")
            if not np.all(np.isfinite(v)):
                raise ValueError(f"layer {layer}: statistics contain NaN or Inf")
            vectors[layer] = v
    except (TypeError, KeyError, ValueError) as exc:
        run.reporter.warn(f"{dev}: importance statistics ignored: {exc}")
        return
    sums = run.importance.setdefault("sums", {})
    for layer, v in vectors.items():
        sums[layer] = sums.get(layer, 0.0) + weight * v
    run.importance["weight"] = run.importance.get("weight", 0.0) + weight


def shrink(run: Run, rnd: int, removed: float) -> None:
    """One structured step: rank units by the fleet's importance, cut, rebuild; on any error keep
    the last good architecture and say why."""
    gm = run.gm
    if not run.importance.get("weight"):
        run.reporter.warn(f"round {rnd}: no usable importance statistics; the architecture stays as it is")
        return
    mean = {k: v / run.importance["weight"] for k, v in run.importance["sums"].items()}
    before = gm.num_params
    try:
        keep = surgery.keep_top(mean, gm.units, run.original_units, removed)
        gm.shrink(keep)
    except (surgery.SurgeryError, ValueError, IndexError) as exc:  # the run goes on with what it has
        run.reporter.warn(f"round {rnd}: structured step skipped ({exc}); keeping the last good architecture")
        return
    run.begun.clear()  # every client gets the new architecture before its next round
    run.reporter.say(
        f"round {rnd}: {removed:.0%} of units removed: {before:,} -> {gm.num_params:,} parameters, "
        + ", ".join(f"{k} {v}" for k, v in gm.units.items())
    )
