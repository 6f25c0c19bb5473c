"""Aggregation strategies: one file each, registered by name; ``--aggregation`` reads its choices here.

Adding a strategy is adding one file in this package whose class is decorated with
``@register("name")``: every module here is imported when the package is.
"""

from __future__ import annotations

import importlib
import pkgutil

STRATEGIES: dict[str, type] = {}


def register(name: str):
    def deco(cls: type) -> type:
        STRATEGIES[name] = cls
        return cls

    return deco


for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")

from .base import TensorInfo, UpdateRejected  # noqa: E402
from .defences import check_norm, clip_update, model_norm, update_norm  # noqa: E402
from .fedavg import MaskedFedAvg  # noqa: E402
from .robust import RobustFedAvg  # noqa: E402

AGGREGATIONS = tuple(STRATEGIES)


def make_aggregator(method: str, infos: list[TensorInfo], shapes: list[tuple], trim: float = 0.1) -> MaskedFedAvg:
    if method not in STRATEGIES:
        raise ValueError(f"unknown aggregation {method!r}; choose from {', '.join(STRATEGIES)}")
    return STRATEGIES[method](infos, shapes, trim)


__all__ = [
    "AGGREGATIONS",
    "STRATEGIES",
    "MaskedFedAvg",
    "RobustFedAvg",
    "TensorInfo",
    "UpdateRejected",
    "check_norm",
    "clip_update",
    "make_aggregator",
    "model_norm",
    "register",
    "update_norm",
]
