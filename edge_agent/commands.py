"""Registers the long-running commands (training; later benchmarks) with the daemon.

Kept apart from :mod:`.daemon` so the presence/command core reads on its own;
nothing here imports TensorFlow or LiteRT at import time: training happens in
the worker process (:mod:`.trainer`, :mod:`.worker`).
"""

from __future__ import annotations

import time
from typing import Any

from .daemon import Agent, blob_expectation, command
from .protocol import topics
from .protocol.errors import ErrorCode, ProtocolError
from .protocol.messages import Command


def _arg(cmd: Command, name: str, kind, default=None, required: bool = False):
    value = cmd.args.get(name, default)
    if value is None and required:
        raise ProtocolError(ErrorCode.BAD_ARGS, f"{cmd.cmd}: missing argument {name!r}")
    if value is not None and (not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool))):
        raise ProtocolError(
            ErrorCode.BAD_ARGS, f"{cmd.cmd}: argument {name!r} must be {getattr(kind, '__name__', kind)}"
        )
    return value


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


@command("train_prepare", mode="io", help="Start the training worker early (TensorFlow import, data) for a run.")
def _train_prepare(agent: Agent, cmd: Command) -> dict[str, Any]:
    run_id = topics.validate_id(_arg(cmd, "run_id", str, required=True), "run id")
    started = _trainer(agent).prepare(run_id)
    return {"run_id": run_id, "worker_started": started}


@command("train_begin", mode="job", help="Start (or restart) the training worker for a run and load the model.")
def _train_begin(agent: Agent, cmd: Command) -> dict[str, Any]:
    run_id = topics.validate_id(_arg(cmd, "run_id", str, required=True), "run id")
    arch = _arg(cmd, "arch", dict, required=True)
    trainer = _trainer(agent)
    agent.progress(cmd.id, phase="fetching model architecture")
    arch_json = agent.fetch_blob(topics.validate_sha256(arch.get("sha256")), 120.0, *blob_expectation(arch)).decode(
        "utf-8"
    )
    agent.progress(cmd.id, phase="starting training worker")
    msg = {k: cmd.args[k] for k in ("pruning", "granularity", "lr", "optimizer", "training") if k in cmd.args}
    return trainer.begin(run_id, {**msg, "arch": arch_json})


@command(
    "train_round",
    mode="job",
    durable=True,
    help="Train one round on local data; keep the sparse update for the coordinator.",
)
def _train_round(agent: Agent, cmd: Command) -> dict[str, Any]:
    run_id = topics.validate_id(_arg(cmd, "run_id", str, required=True), "run id")
    rnd = _arg(cmd, "round", int, required=True)
    model = _arg(cmd, "model", dict, required=True)
    size, _ = blob_expectation(model)
    if size is not None:
        check_training_fits(agent, size)  # before fetching it or starting TensorFlow
    trainer = _trainer(agent)
    t0 = time.perf_counter()
    blob = agent.fetch_blob(
        topics.validate_sha256(model.get("sha256")),
        float(cmd.args.get("fetch_timeout_s", 300.0)),
        *blob_expectation(model),
    )
    fetch_s = time.perf_counter() - t0
    agent.progress(cmd.id, phase="training", round=rnd)
    keys = ("epochs", "batch_size", "lr", "targets", "seed", "update_format", "regrow", "importance")
    reply = trainer.round(
        run_id, {**{k: cmd.args[k] for k in keys if k in cmd.args}, "run_id": run_id, "round": rnd, "model": blob}
    )
    update = reply["update"]
    sha = agent.blobs.put(update)  # kept until the coordinator pulls it (blob_get)
    metrics = {**reply["metrics"], "fetch_s": round(fetch_s, 4), "model_bytes": len(blob)}
    return {"run_id": run_id, "round": rnd, "update": {"sha256": sha, "bytes": len(update)}, "metrics": metrics}


@command("train_end", mode="io", help="End a training run: stop the worker so the memory returns.")
def _train_end(agent: Agent, cmd: Command) -> dict[str, Any]:
    trainer = agent.trainer
    stopped = trainer is not None and trainer.alive
    if trainer is not None:
        trainer.close()
    return {"worker_stopped": stopped}


@command("train_status", help="Whether a training worker is running, and for which run.")
def _train_status(agent: Agent, cmd: Command) -> dict[str, Any]:
    t = agent.trainer
    return {"run_id": t.run_id if t else None, "worker_alive": bool(t and t.alive), "worker_pid": t.pid if t else None}


@command("bench", mode="job", durable=True, help="Benchmark TFLite artifacts on this device (fetched by hash, cached).")
def _bench(agent: Agent, cmd: Command) -> dict[str, Any]:
    from . import bench, sensors

    artifacts = _arg(cmd, "artifacts", list, required=True)
    if not artifacts or not all(isinstance(a, dict) for a in artifacts):
        raise ProtocolError(ErrorCode.BAD_ARGS, "bench: artifacts must be a non-empty list of {name, sha256, bytes}")
    for a in artifacts:
        topics.validate_sha256(a.get("sha256"))
        if not isinstance(a.get("name"), str) or not isinstance(a.get("bytes"), int) or a["bytes"] < 0:
            raise ProtocolError(ErrorCode.BAD_ARGS, "bench: each artifact needs a name and a byte size")
    bench.check_resources(sum(a["bytes"] for a in artifacts), str(agent.state_dir))
    runs = _arg(cmd, "runs", int)
    duration = _arg(cmd, "duration_s", (int, float))
    if runs is None and duration is None:
        runs = 200
    if (runs is not None and runs < 1) or (duration is not None and duration <= 0):
        raise ProtocolError(ErrorCode.BAD_ARGS, "bench: runs and duration_s must be positive")
    ready, failed = [], {}
    for a in artifacts:
        agent.progress(cmd.id, phase="fetching", artifact=a["name"])
        cached = agent.blobs.has(a["sha256"])
        try:  # the hash is checked on arrival: a corrupted artifact never reaches the runtime
            agent.fetch_blob(a["sha256"], float(cmd.args.get("fetch_timeout_s", 300.0)), a["bytes"])
        except ProtocolError as exc:
            failed[a["name"]] = {
                "artifact": a["name"],
                "sha256": a["sha256"],
                "bytes": a["bytes"],
                "status": "error",
                "error": f"refused before loading: {exc}",
            }
            continue
        ready.append({**a, "path": str(agent.blobs.path(a["sha256"])), "cached": cached})
    root = agent.settings.get("sysfs_root", "/sys")
    board = agent.settings.get("board") or sensors.board_model()
    threads = _arg(cmd, "threads", int, 0)
    result = bench.run(
        ready,
        threads=threads,
        runs=runs,
        duration_s=duration,
        warmup=_arg(cmd, "warmup", int, 10),
        budget_s=float(_arg(cmd, "budget_s", (int, float), agent.settings["bench_budget_s"])),
        runtime=_arg(cmd, "runtime", str, "auto"),
        board=board,
        sysfs_root=root,
        progress=lambda **kw: agent.progress(cmd.id, **kw),
    )
    by_name = {r["artifact"]: r for r in result["artifacts"]}
    result["artifacts"] = [by_name.get(a["name"]) or failed[a["name"]] for a in artifacts]
    result["device_id"] = agent.device_id
    result["threads_requested"] = threads or "runtime default"
    return result
