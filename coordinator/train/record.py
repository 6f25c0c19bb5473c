"""What a run keeps and reports: its state, phase timers, round rows, the summary, process costs."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..masks import sparsity_report
from ..session import Session
from ..store import Store
from ..strategy import MaskedFedAvg
from .config import TrainConfig
from .observer import Observer


class Timer:
    """Accumulates wall time, and this thread's CPU time, per phase of a round (for the overhead
    breakdown: on a machine shared with clients, wall time includes waiting for the CPU)."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self.phases[phase] = self.phases.get(phase, 0.0) + time.perf_counter() - t0
            self.cpu[phase] = self.cpu.get(phase, 0.0) + time.thread_time() - c0


@dataclass
class Run:
    cfg: TrainConfig
    session: Session
    store: Store
    reporter: Observer
    run_id: str
    run_dir: Path
    gm: Any = None
    eval_set: Any = None
    begun: dict[str, dict[str, Any]] = field(default_factory=dict)
    counted: set[tuple[str, int]] = field(default_factory=set)
    rows: list[dict[str, Any]] = field(default_factory=list)
    board: list[Any] = field(default_factory=list)  # tblog.Record: TensorBoard records the worker has not written
    norm: float | None = None  # the global model's L2 norm this round (for the update-norm check)
    original_units: dict[str, int] = field(default_factory=dict)  # before any structured step
    initial_dense_bytes: int = 0  # the model as the run began (what upload ratios compare against)
    importance: dict[str, Any] = field(default_factory=dict)  # this round's sample-weighted sums, and the weight
    downlink: Any = None  # coordinator.downlink.Downlink: what the devices hold, the error feedback
    cast: Any = None  # coordinator.downlink.Cast: the next round's broadcast (prepared after aggregation)


@dataclass
class Sent:
    """What one round moved: bytes each client uploaded, the broadcast's size, and why clients failed."""

    bytes_up: dict[str, int] = field(default_factory=dict)
    bytes_down: dict[str, int] = field(default_factory=dict)  # per client: what it fetched (it says; else planned)
    failures: dict[str, str] = field(default_factory=dict)
    device_metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # what each aggregated client reported
    download_format: str = "exact"


def round_row(
    run: Run,
    rnd: int,
    target: float,
    clients: list[str],
    agg: MaskedFedAvg,
    sent: Sent,
    applied: bool,
    metrics: dict[str, Any],
    dense_bytes: int,
) -> dict[str, Any]:
    """The record of one round (stored, printed, charted)."""
    gm = run.gm
    sparsity = sparsity_report(gm.masks, gm.names, gm.shapes)
    ups, downs = list(sent.bytes_up.values()), list(sent.bytes_down.values())
    return {
        "round": rnd,
        "target_sparsity": round(target, 5),
        "sparsity": sparsity["prunable"],
        "sparsity_overall": sparsity["overall"],
        "sparsity_per_tensor": sparsity["per_tensor"],
        "clients_selected": len(clients),
        "clients_ok": agg.count,
        "failures": len(sent.failures),
        "failure_reasons": sent.failures,
        "applied": applied,
        "accuracy": metrics.get("accuracy"),
        "loss": metrics.get("loss"),
        "metrics": metrics,  # everything evaluated (a user model's own metrics too)
        "download_format": sent.download_format,
        "bytes_down_per_client": (sum(downs) / len(downs)) if downs else 0,
        "bytes_down_total": sum(downs),
        "down_ratio_vs_dense_fp32": (dense_bytes / (sum(downs) / len(downs))) if downs and sum(downs) else None,
        "bytes_up_per_client": (sum(ups) / len(ups)) if ups else None,
        "bytes_up_total": sum(ups),
        "up_ratio_vs_dense_fp32": (dense_bytes / (sum(ups) / len(ups))) if ups else None,
        "dense_fp32_bytes": dense_bytes,
        "aggregator_bytes": agg.nbytes,  # of the model this round trained
        # the architecture after this round (a structured step may have shrunk it at the end of the round)
        "params": gm.num_params,
        "flops": gm.flops,
        "architecture": gm.units,
        "units_removed": round(1.0 - sum(gm.units.values()) / max(1, sum(run.original_units.values())), 4),
    }


def persist(run: Run, rnd: int) -> None:
    """The resume point, written before the round is recorded."""
    run.gm.save(run.run_dir, f"round-{rnd:04d}")
    (run.run_dir / f"round-{rnd - 2:04d}.ept").unlink(missing_ok=True)


def to_board(run: Run, records: list[Any]) -> None:
    """Queue TensorBoard records: written at once when the model worker is up anyway (it evaluates every
    round), else they wait for the end of the run, when the worker starts to save model.keras."""
    run.board.extend(records)
    if run.gm.has_eval:
        flush_board(run, background=True)  # written while the next round runs


def flush_board(run: Run, background: bool = False) -> None:
    if run.board:
        run.gm.tensorboard(run.run_dir / "tensorboard", run.board, background)
        run.board = []


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def no_round_message(run: "Run") -> str:
    reasons = sorted({why for r in run.rows for why in (r.get("failure_reasons") or {}).values()})
    return (
        f"no round of {run.run_id} was applied (each needs --min-clients {run.cfg.min_clients} updates); "
        f"the model is untrained. Reasons: " + ("; ".join(reasons[:6]) or "none recorded")
    )


def peak_rss() -> dict[str, int]:
    """Peak resident memory of this process (VmHWM), and of the largest child it has reaped:
    the model worker, which holds TensorFlow apart from the round loop."""
    from edge_agent.common import procstats

    return {"coordinator": procstats.peak_rss_bytes(), "model_worker": procstats.children_peak_rss_bytes()}


def cpu_s() -> dict[str, float]:
    """CPU seconds (user + system) of this process and of its reaped children (the model worker)."""
    from edge_agent.common import procstats

    return {
        "coordinator": round(procstats.cpu_seconds(), 3),
        "model_worker": round(procstats.cpu_seconds(children=True), 3),
    }


def summary(run: Run, state: str, wall_s: float, baseline: dict[str, Any]) -> dict[str, Any]:
    rows = [r for r in run.rows if r.get("applied")]
    ups = [r["bytes_up_per_client"] for r in rows if r.get("bytes_up_per_client")]
    last = run.rows[-1] if run.rows else {}
    return {
        "run_id": run.run_id,
        "state": state,
        "run_dir": str(run.run_dir),
        "rounds_done": len(run.rows),
        "initial_accuracy": baseline.get("accuracy"),
        "initial_loss": baseline.get("loss"),
        "final_accuracy": last.get("accuracy"),
        "final_loss": last.get("loss"),
        "final_sparsity": last.get("sparsity"),
        "final_sparsity_overall": last.get("sparsity_overall"),
        "num_params": run.gm.num_params,
        "dense_fp32_bytes": run.initial_dense_bytes,
        "upload_bytes_per_client_round": (sum(ups) / len(ups)) if ups else None,
        "ratio_vs_dense_fp32": (run.initial_dense_bytes / (sum(ups) / len(ups))) if ups else None,
        "bytes_up_total": sum(r["bytes_up_total"] for r in run.rows),
        "bytes_down_total": sum(r["bytes_down_total"] for r in run.rows),
        "round_wall_s": (sum(r["wall_s"] for r in run.rows) / len(run.rows)) if run.rows else None,
        "total_wall_s": round(wall_s, 3),
        "clients": sorted(run.begun),
        "layers": run.gm.layer_report,
        "flops": run.gm.flops,
        "architecture": run.gm.units,
        "original_architecture": run.original_units,
    }
