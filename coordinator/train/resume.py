"""Continuing an interrupted run: its stored config (the CLI refuses flags that contradict it)."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from ..store import Store
from .config import TrainConfig


def resume_config(store: Store, run_id: str) -> tuple[TrainConfig, dict[str, Any]]:
    """The stored config of an unfinished run, and the run record (ValueError if it cannot resume)."""
    rec = store.resolve_run(run_id, kind="train")  # RunNotFound names the candidates
    if rec["state"] == "done":
        raise ValueError(f"run {rec['run_id']} is already complete")
    known = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in rec["config"].items() if k in known})
    if cfg.input_shape is not None:
        cfg.input_shape = tuple(cfg.input_shape)
    return cfg, rec
