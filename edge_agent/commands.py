"""Registers the long-running commands (training; later benchmarks) with the daemon.

Kept apart from :mod:`.daemon` so the presence/command core reads on its own;
nothing here imports TensorFlow or LiteRT at import time: training happens in
the worker process (:mod:`.trainer`, :mod:`.worker`).
"""

from __future__ import annotations

import time
from typing import Any

from . import heldmodels
from .daemon import Agent, command
from .protocol.args import Bench, NoArgs, TrainBegin, TrainPrepare, TrainRound
from .protocol.errors import ErrorCode, ProtocolError
from .protocol.messages import Command


def _trainer(agent: Agent):
    if agent.trainer is not None:  # the TensorFlow worker's owner, or a simulated device's stand-in
        return agent.trainer
    from .ml import tfenv
    from .trainer import Trainer

    if not tfenv.available():
        raise ProtocolError(
            ErrorCode.UNSUPPORTED,
            "this device cannot train: TensorFlow, tf-keras and "
            "tensorflow-model-optimization are not installed (edgeprune[train])",
        )
    if not agent.settings.get("data"):
        raise ProtocolError(ErrorCode.UNSUPPORTED, "this device has no training data configured (--data)")
    agent.trainer = Trainer(agent.settings)
    return agent.trainer


TRAIN_MEMORY_FACTOR = 20
"""Bytes of RAM per model byte while training: weights, TF-MOT masks and thresholds, gradients, two Adam
moments, the traced step's buffers and the update's copies. An estimate, from the slope measured by
benchmarks/model_size.py (TF worker peak 774 / 999 / 1,292 MB for 1.1 / 6.7 / 26 MB models: 15-19 MB per
model MB); checked so that a model too large is refused with the numbers, not killed by the OOM killer."""
TF_RUNTIME_BYTES = 700 * 2**20
"""TensorFlow + tf-keras + TF-MOT in the worker before any model (measured 580-750 MB on x86_64)."""


def check_training_fits(agent: Agent, model_bytes: int) -> None:
    """Refuse, with the numbers, a model this device cannot hold on disk or train in its free memory."""
    import shutil

    import psutil

    free_disk = shutil.disk_usage(agent.state_dir).free
    if model_bytes * 2 > free_disk:  # the model and its update, in the blob cache
        raise ProtocolError(
            ErrorCode.RESOURCES,
            f"model of {model_bytes:,} bytes: this device has {free_disk:,} bytes "
            f"of disk free for it and its update",
        )
    need = model_bytes * TRAIN_MEMORY_FACTOR + (
        0 if agent.trainer is not None and agent.trainer.alive else TF_RUNTIME_BYTES
    )
    free_ram = psutil.virtual_memory().available
    if need > free_ram:
        raise ProtocolError(
            ErrorCode.RESOURCES,
            f"training a model of {model_bytes / 1e6:.1f} MB needs about "
            f"{need / 1e6:,.0f} MB of RAM (estimate), {free_ram / 1e6:,.0f} MB "
            f"available: use a smaller model or prune it structurally first",
        )


@command(
    "train_prepare",
    mode="io",
    args=TrainPrepare,
    help="Start the training worker early (TensorFlow import, data) for a run.",
)
def _train_prepare(agent: Agent, cmd: Command, a: TrainPrepare) -> dict[str, Any]:
    started = _trainer(agent).prepare(a.run_id)
    return {"run_id": a.run_id, "worker_started": started}


@command(
    "train_begin",
    mode="job",
    args=TrainBegin,
    help="Start (or restart) the training worker for a run and load the model.",
)
def _train_begin(agent: Agent, cmd: Command, a: TrainBegin) -> dict[str, Any]:
    trainer = _trainer(agent)
    agent.progress(cmd.id, phase="fetching model architecture")
    arch_json = agent.fetch_blob(a.arch.sha256, 120.0, a.arch.bytes, a.arch.chunks).decode("utf-8")
    agent.progress(cmd.id, phase="starting training worker")
    msg = {"pruning": a.pruning, "granularity": a.granularity, "lr": a.lr, "optimizer": a.optimizer}
    return trainer.begin(a.run_id, {**msg, "training": a.training, "arch": arch_json})


@command(
    "train_round",
    mode="job",
    durable=True,
    args=TrainRound,
    help="Train one round on local data; keep the sparse update for the coordinator.",
)
def _train_round(agent: Agent, cmd: Command, a: TrainRound) -> dict[str, Any]:
    if a.model.bytes is not None:
        check_training_fits(agent, a.model.bytes)  # before fetching it or starting TensorFlow
    trainer = _trainer(agent)
    t0 = time.perf_counter()
    blob, download = heldmodels.obtain(agent.held, a, agent.fetch_blob)
    fetch_s = time.perf_counter() - t0
    agent.progress(cmd.id, phase="training", round=a.round)
    work = {
        k: getattr(a, k)
        for k in ("run_id", "round", "epochs", "batch_size", "lr", "targets", "seed", "update_format", "regrow")
    }
    reply = trainer.round(a.run_id, {**work, "importance": a.importance, "model": blob})
    update = reply["update"]
    sha = agent.blobs.put(update)  # kept until the coordinator pulls it (blob_get)
    metrics = {**reply["metrics"], **download, "fetch_s": round(fetch_s, 4), "model_bytes": a.model.bytes}
    return {"run_id": a.run_id, "round": a.round, "update": {"sha256": sha, "bytes": len(update)}, "metrics": metrics}


@command("train_end", mode="io", help="End a training run: stop the worker so the memory returns.")
def _train_end(agent: Agent, cmd: Command, _: NoArgs) -> dict[str, Any]:
    trainer = agent.trainer
    stopped = trainer is not None and trainer.alive
    if trainer is not None:
        trainer.close()
    return {"worker_stopped": stopped}


@command("train_status", help="Whether a training worker is running, and for which run.")
def _train_status(agent: Agent, cmd: Command, _: NoArgs) -> dict[str, Any]:
    t = agent.trainer
    return {"run_id": t.run_id if t else None, "worker_alive": bool(t and t.alive), "worker_pid": t.pid if t else None}


@command(
    "bench",
    mode="job",
    durable=True,
    args=Bench,
    help="Benchmark TFLite artifacts on this device (fetched by hash, cached).",
)
def _bench(agent: Agent, cmd: Command, a: Bench) -> dict[str, Any]:
    from . import bench, sensors

    bench.check_resources(sum(art.bytes for art in a.artifacts), str(agent.state_dir))
    runs = 200 if a.runs is None and a.duration_s is None else a.runs
    ready, failed = [], {}
    for art in a.artifacts:
        agent.progress(cmd.id, phase="fetching", artifact=art.name)
        cached = agent.blobs.has(art.sha256)
        try:  # the hash is checked on arrival: a corrupted artifact never reaches the runtime
            agent.fetch_blob(art.sha256, a.fetch_timeout_s, art.bytes)
        except ProtocolError as exc:
            failed[art.name] = {
                "artifact": art.name,
                "sha256": art.sha256,
                "bytes": art.bytes,
                "status": "error",
                "error": f"refused before loading: {exc}",
            }
            continue
        path = str(agent.blobs.path(art.sha256))
        ready.append({"name": art.name, "sha256": art.sha256, "bytes": art.bytes, "path": path, "cached": cached})
    root = agent.settings.get("sysfs_root", "/sys")
    board = agent.settings.get("board") or sensors.board_model()
    result = bench.run(
        ready,
        threads=a.threads,
        runs=runs,
        duration_s=a.duration_s,
        warmup=a.warmup,
        budget_s=float(a.budget_s if a.budget_s is not None else agent.settings["bench_budget_s"]),
        runtime=a.runtime,
        board=board,
        sysfs_root=root,
        progress=lambda **kw: agent.progress(cmd.id, **kw),
    )
    by_name = {r["artifact"]: r for r in result["artifacts"]}
    result["artifacts"] = [by_name.get(art.name) or failed[art.name] for art in a.artifacts]
    result["device_id"] = agent.device_id
    result["threads_requested"] = a.threads or "runtime default"
    return result
