"""Federated pruning-aware training: the run and its round loop.

One round: pick clients -> broadcast the global model (once, as retained chunks)
-> each client trains with TF-MOT at the round's scheduled sparsity and keeps a
sparse update -> pull updates as they finish, validate and fold them into a
streaming masked FedAvg -> new global weights and mask -> evaluate -> persist.
A client that fails, times out or vanishes costs the round its update, not the
round; ``min_clients`` decides whether what arrived is enough.
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import os
import random
import secrets
import time
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.protocol import codec
from edge_agent.protocol.constants import IMPORTANCE_METHODS
from edge_agent.protocol.errors import ProtocolError

from . import surgery
from .aggregate import (AGGREGATIONS, MaskedFedAvg, UpdateRejected, check_norm, clip_update, make_aggregator,
                        model_norm)
from .masks import MASK_POLICIES, round_targets, sparsity_report
from .model_worker import ModelWorkerError
from .progress import Reporter
from .schedule import sparsity_at
from .session import LIVE_STATES, Session, training_blocker
from .store import Store

BEGIN_TIMEOUT_S = 600.0
UPDATE_FORMATS = ("auto", "fp32", "fp16", "int8", "int6", "int4")


@dataclass
class TrainConfig:
    model: str = "digits_cnn"
    rounds: int = 10
    sparsity: float = 0.8
    schedule: str = "polynomial"
    ramp_fraction: float = 0.8
    clients_per_round: int | None = None
    fraction: float | None = None
    min_clients: int = 1
    local_epochs: int = 2
    batch_size: int = 32
    lr: float = 2e-3
    optimizer: str = "adam"
    granularity: str = "unstructured"
    mask_policy: str = "global"
    update_format: str = "auto"
    regrow: float = 0.5
    round_timeout_s: float = 600.0
    seed: int = 0
    eval_data: str | None = "digits"
    input_shape: tuple | None = None
    num_classes: int | None = None
    devices: list[str] | None = None
    wait_for_devices: int = 0
    wait_timeout_s: float = 60.0
    aggregation: str = "fedavg"
    trim: float = 0.1
    clip_norm: float = 0.0
    max_norm_ratio: float = 10.0
    structured: float = 0.0
    structured_every: int = 2
    importance: str = "activation"

    def validate(self) -> None:
        if self.rounds < 1:
            raise ValueError("--rounds must be >= 1")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError("--sparsity must be in [0, 1)")
        if self.granularity == "2:4" and self.sparsity not in (0.0, 0.5):
            raise ValueError("--granularity 2:4 means exactly 50% sparsity: use --sparsity 0.5")
        if self.mask_policy not in MASK_POLICIES:
            raise ValueError(f"--mask-policy must be one of {', '.join(MASK_POLICIES)}")
        if self.granularity == "2:4" and self.mask_policy in ("union", "intersection"):
            raise ValueError("--granularity 2:4 keeps its pattern only with --mask-policy global or layer")
        if self.update_format not in UPDATE_FORMATS:
            raise ValueError(f"--update-format must be one of {', '.join(UPDATE_FORMATS)}")
        if not 0.0 <= self.regrow < 1.0:
            raise ValueError("--regrow must be in [0, 1): the fraction of local steps before the prune")
        if self.min_clients < 1 or self.local_epochs < 1 or self.batch_size < 1 or self.round_timeout_s <= 0:
            raise ValueError("--min-clients, --local-epochs, --batch-size and --round-timeout must be positive")
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
            raise ValueError("--fraction must be in (0, 1]")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"--aggregation must be one of {', '.join(AGGREGATIONS)}")
        if not 0.0 <= self.trim < 0.5:
            raise ValueError("--trim must be in [0, 0.5)")
        if self.clip_norm < 0 or self.max_norm_ratio < 0:
            raise ValueError("--clip-norm and --max-norm-ratio must be >= 0 (0 = off)")
        if not 0.0 <= self.structured <= 1.0 or self.structured_every < 1:
            raise ValueError("--structured is a fraction of each layer's units in [0, 1]; --structured-every >= 1")
        if self.structured and self.rounds <= self.structured_every:
            raise ValueError(f"--structured needs more --rounds than --structured-every ({self.structured_every}): "
                             "at least one shrinking step and a round of recovery training after it")
        if self.structured and self.granularity in ("2:4", "block"):
            raise ValueError(f"--structured cannot be combined with --granularity {self.granularity} (its groups "
                             "span input channels, which the cuts would split)")
        if self.importance not in IMPORTANCE_METHODS:
            raise ValueError(f"--importance must be one of {', '.join(IMPORTANCE_METHODS)}")
        check_model_ref(self.model)

    @property
    def pruning_on(self) -> bool:
        return self.sparsity > 0.0

    @property
    def values_format(self) -> str:
        """auto: int4 deltas when pruning (unbiased stochastic rounding; measured no accuracy loss
        on digits against fp32, see benchmarks/fl_pruning.py), plain fp32 for dense FedAvg."""
        if self.update_format != "auto":
            return self.update_format
        return "int4" if self.pruning_on else "fp32"

    def structured_step(self, rnd: int) -> float | None:
        """The fraction of each layer's original units gone after this round, if the round shrinks the
        model: steps every ``structured_every`` rounds, reaching the target with at least one round of
        recovery training after the last step."""
        if not self.structured or rnd % self.structured_every:
            return None
        steps = max(1, (self.rounds - 1) // self.structured_every)
        i = rnd // self.structured_every
        return self.structured * i / steps if 1 <= i <= steps else None

    @property
    def regrow_fraction(self) -> float:
        """2:4 keeps one fixed pattern (TF-MOT sets it once), so it never regrows."""
        return self.regrow if self.pruning_on and self.granularity != "2:4" else 0.0


class Timer:
    """Accumulates wall time, and this thread's CPU time, per phase of a round (for the overhead
    breakdown: on a machine shared with clients, wall time includes waiting for the CPU)."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
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
    reporter: Reporter
    run_id: str
    run_dir: Path
    gm: Any = None
    eval_set: Any = None
    begun: dict[str, dict] = field(default_factory=dict)
    counted: set = field(default_factory=set)
    rows: list[dict] = field(default_factory=list)
    tb_rows: list = field(default_factory=list)  # TensorBoard scalars not yet written by the model worker
    norm: float | None = None  # the global model's L2 norm this round (for the update-norm check)
    original_units: dict[str, int] = field(default_factory=dict)  # before any structured step
    initial_dense_bytes: int = 0  # the model as the run began (what upload ratios compare against)
    importance: dict[str, Any] = field(default_factory=dict)  # this round's sample-weighted sums, and the weight


class NoDevices(RuntimeError):
    """No device of the fleet can train (or too few for --min-clients): nothing was started."""


def check_model_ref(ref: str) -> None:
    """A built-in model name or an existing model file; checked before any device starts a worker."""
    from edge_agent.models import BUILTIN

    if ref in BUILTIN or os.path.exists(ref):
        return
    if os.sep in ref or ref.endswith((".keras", ".h5")):
        raise ValueError(f"--model {ref!r}: no such file")
    raise ValueError(f"--model {ref!r}: unknown built-in model; choose from {', '.join(BUILTIN)} or give a "
                     f"tf-keras model file (.keras, .h5 or a SavedModel directory)")


def plan_fleet(run: "Run") -> list[str]:
    """Who trains: waits once for --wait-for (saying who is online meanwhile), then names the devices it
    will use and why each other one cannot. Raises :class:`NoDevices` (listing the fleets this broker
    has) when fewer than --min-clients can train."""
    s, cfg, say = run.session, run.cfg, run.reporter
    if cfg.wait_for_devices:
        last = [-1]

        def enough(rows) -> bool:
            ready = [r["device_id"] for r in rows if training_blocker(r) is None]
            if len(ready) != last[0]:
                last[0] = len(ready)
                say.say(f"waiting for {cfg.wait_for_devices} devices: {len(ready)} ready"
                        + (f" ({', '.join(ready)})" if ready else ""))
            return len(ready) >= cfg.wait_for_devices

        if not s.wait_for(enough, cfg.wait_timeout_s):
            ready = len([r for r in s.device_table() if training_blocker(r) is None])
            if ready < cfg.min_clients:
                raise NoDevices(f"only {ready} of the {cfg.wait_for_devices} devices asked for (--wait-for) were "
                                f"ready after {cfg.wait_timeout_s:.0f} s, fewer than --min-clients {cfg.min_clients}")
            say.warn(f"only {ready} of {cfg.wait_for_devices} devices ready after {cfg.wait_timeout_s:.0f} s; going "
                     f"on with them (--min-clients {cfg.min_clients} allows it)")
    rows = s.fleet_rows()
    blocked = {r["device_id"]: training_blocker(r) for r in rows}
    if cfg.devices:
        for dev in cfg.devices:
            if dev not in blocked:
                blocked[dev] = "not in this fleet (no such device seen on the broker or in the registry)"
        blocked = {d: why for d, why in blocked.items() if d in cfg.devices}
    usable = sorted(d for d, why in blocked.items() if why is None)
    for dev, why in sorted(blocked.items()):
        if why is not None:
            say.warn(f"{dev} will not train: {why}")
    if len(usable) < cfg.min_clients:
        fleets = s.fleets_seen()
        others = ", ".join(f"{f} ({n} devices)" for f, n in fleets.items()) or "none"
        reasons = "; ".join(f"{d}: {why}" for d, why in sorted(blocked.items()) if why)
        raise NoDevices(f"{len(usable)} devices of fleet {s.fleet!r} can train, --min-clients is {cfg.min_clients}"
                        + (f" ({reasons})" if reasons else "") + f"; fleets on this broker: {others}")
    say.say(f"training on {len(usable)} devices: {', '.join(usable)}")
    return usable


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def resume_config(store: Store, run_id: str) -> tuple[TrainConfig, dict]:
    """The stored config of an unfinished run, and the run record (ValueError if it cannot resume)."""
    rec = store.resolve_run(run_id, kind="train")  # RunNotFound names the candidates
    if rec["state"] == "done":
        raise ValueError(f"run {rec['run_id']} is already complete")
    known = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in rec["config"].items() if k in known})
    if cfg.input_shape is not None:
        cfg.input_shape = tuple(cfg.input_shape)
    return cfg, rec


def train(cfg: TrainConfig, session: Session, store: Store, reporter: Reporter,
          resume: str | None = None) -> dict[str, Any]:
    """Run a whole federated training job; return its summary (also stored).

    ``resume``: continue an interrupted run after its last *recorded* round. Each round's global model is
    written (atomically) before the round is recorded, so a crash repeats no completed round and loses none.
    """
    cfg.validate()
    from .global_model import GlobalModel, load_eval_data

    run_id = resume or new_run_id()
    run = Run(cfg, session, store, reporter, run_id, store.home / "runs" / run_id)
    t0, phases = time.perf_counter(), Timer()
    first_round = 1
    usable = plan_fleet(run)  # before anything is started or recorded
    with phases("setup"):
        for dev in usable:  # workers import TensorFlow while our model worker does the same
            session.submit(dev, "train_prepare", {"run_id": run_id})
        try:
            run.gm = _setup(run, resume)
        except BaseException:  # the run never started: the workers just prepared must not linger
            for dev in usable:
                session.submit(dev, "train_end")
            raise
        first_round = run.rows[-1]["round"] + 1 if resume and run.rows else 1
    if resume:
        reporter.say(f"run {run.run_id}: resuming after round {first_round - 1} of {cfg.rounds}")
    reporter.say(f"run {run.run_id}: {cfg.model} ({run.gm.num_params:,} parameters), {cfg.rounds} rounds, "
                 f"target sparsity {cfg.sparsity:.0%} ({cfg.schedule}, {cfg.granularity}), fleet {session.fleet}")
    state, baseline = "failed", {}
    try:
        with phases("begin_clients"):
            _begin_clients(run, usable)
        with phases("rounds"):
            baseline = run.gm.evaluate()
            reporter.round_header()
            for rnd in range(first_round, cfg.rounds + 1):
                row = _round(run, rnd)
                run.rows.append(row)
                reporter.round_done(row)
        state = "done" if any(r.get("applied") for r in run.rows) else "failed"
    except KeyboardInterrupt:
        state = "interrupted"
        raise
    finally:
        with phases("finish"):
            for dev in list(run.begun):
                session.submit(dev, "train_end")
            try:
                run.gm.save(run.run_dir, "final")
                run.gm.scalars(run.run_dir / "tensorboard", run.tb_rows)
            except ModelWorkerError as exc:  # final.ept is written before; only the Keras copies are missing
                reporter.warn(f"model.keras / TensorBoard not written: {exc}")
            finally:
                run.gm.close()
        summary = _summary(run, state, time.perf_counter() - t0, baseline)
        summary["phases_s"] = {k: round(v, 3) for k, v in phases.phases.items()}
        summary["peak_rss_bytes"] = _peak_rss()
        summary["cpu_s"] = _cpu_s()
        if state == "failed":
            summary["error"] = {"code": "no_round_applied", "message": _no_round_message(run)}
        store.finish_run(run.run_id, state, summary)
    return summary


def _no_round_message(run: "Run") -> str:
    reasons = sorted({why for r in run.rows for why in (r.get("failure_reasons") or {}).values()})
    return (f"no round of {run.run_id} was applied (each needs --min-clients {run.cfg.min_clients} updates); "
            f"the model is untrained. Reasons: " + ("; ".join(reasons[:6]) or "none recorded"))


def _setup(run: "Run", resume: str | None):
    """The global model (fresh, or at the resume point) and the run record."""
    from .global_model import GlobalModel, load_eval_data

    cfg, store, reporter, run_id, session = run.cfg, run.store, run.reporter, run.run_id, run.session
    run.eval_set = load_eval_data(cfg.eval_data)
    shape = cfg.input_shape or (tuple(run.eval_set.x.shape[1:]) if run.eval_set is not None else None)
    classes = cfg.num_classes or (run.eval_set.num_classes if run.eval_set is not None else None)
    run.rows = store.rounds(run_id) if resume else []
    last = run.run_dir / f"round-{run.rows[-1]['round']:04d}.ept" if run.rows else None
    # a resume point carries its architecture (a structured run may have shrunk the model since)
    arch = codec.decode(last.read_bytes()).meta.get("arch") if last is not None else None
    gm = run.gm = GlobalModel.create(cfg.model, shape, classes, cfg.granularity, cfg.pruning_on, cfg.seed,
                                     run.eval_set, arch)
    run.original_units = (store.run(run_id) or {}).get("config", {}).get("units") if resume else None
    run.original_units = run.original_units or run.gm.units
    run.initial_dense_bytes = ((store.run(run_id) or {}).get("config", {}).get("dense_fp32_bytes") if resume
                               else None) or run.gm.dense_fp32_bytes
    for layer, why in run.gm.layer_report["dense"].items():
        reporter.warn(f"layer {layer} stays dense: {why}")
    if cfg.structured:
        for layer, why in run.gm.structure["whole"].items():
            reporter.warn(f"layer {layer} keeps all its units: {why}")
    if resume:
        if last is not None:
            run.gm.load(last)
        store.set_run_state(run_id, "running")
    else:
        store.create_run(run.run_id, session.fleet, "train", {
            **asdict(cfg), "broker": session.link.urls,  # what --resume reconnects to
            "num_params": run.gm.num_params, "dense_fp32_bytes": run.gm.dense_fp32_bytes,
            "layers": run.gm.layer_report, "units": run.gm.units,
            "structure": run.gm.structure if cfg.structured else None,
            "tensors": [{"name": n, "shape": list(s), "pruned": i.kind}
                        for n, s, i in zip(run.gm.names, run.gm.shapes, run.gm.infos)]})
    run.run_dir.mkdir(parents=True, exist_ok=True)
    return gm


def _peak_rss() -> dict[str, int]:
    """Peak resident memory of this process (VmHWM), and of the largest child it has reaped:
    the model worker, which holds TensorFlow apart from the round loop."""
    import resource

    from edge_agent.worker import peak_rss_bytes

    return {"coordinator": peak_rss_bytes(),
            "model_worker": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}


def _cpu_s() -> dict[str, float]:
    """CPU seconds (user + system) of this process and of its reaped children (the model worker)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"coordinator": round(own.ru_utime + own.ru_stime, 3), "model_worker": round(kids.ru_utime + kids.ru_stime, 3)}


def _eligible(run: Run) -> list[str]:
    """Devices that may train this round (busy ones included: busy with this run's last round)."""
    s, cfg = run.session, run.cfg
    rows = [r for r in s.device_table() if r["state"] in LIVE_STATES and r["can_train"] and r.get("has_data") is not False]
    if cfg.devices:
        rows = [r for r in rows if r["device_id"] in cfg.devices]
    return sorted(r["device_id"] for r in rows)


def _begin_clients(run: Run, devices: list[str]) -> None:
    """Start a warm training worker on each device (in parallel); drop those that cannot."""
    new = [d for d in devices if d not in run.begun]
    if not new:
        return
    arch = run.session.publish_blob(run.gm.arch_json.encode("utf-8"))
    args = {"run_id": run.run_id, "arch": arch.as_args(), "pruning": run.cfg.pruning_on,
            "granularity": run.cfg.granularity, "lr": run.cfg.lr, "optimizer": run.cfg.optimizer}
    futures = {d: run.session.submit(d, "train_begin", args)[1] for d in new}
    for dev, fut in futures.items():
        try:
            reply = fut.result(BEGIN_TIMEOUT_S)
        except cf.TimeoutError:
            run.reporter.warn(f"{dev}: no answer to train_begin within {BEGIN_TIMEOUT_S:.0f} s")
            continue
        if reply.ok:
            run.begun[dev] = reply.result
        else:
            run.reporter.warn(f"{dev} cannot train: {reply.error_code}: {reply.error_message}")
    run.reporter.say(f"{len(run.begun)} devices training: " + ", ".join(
        f"{d} ({r['num_samples']} samples)" for d, r in sorted(run.begun.items())))


def _select(run: Run, rnd: int) -> list[str]:
    cfg = run.cfg
    online = _eligible(run)
    _begin_clients(run, online)  # devices that joined since the run began
    pool = [d for d in online if d in run.begun]
    k = len(pool)
    if cfg.clients_per_round:
        k = min(k, cfg.clients_per_round)
    elif cfg.fraction:
        k = min(k, max(1, math.ceil(cfg.fraction * len(pool))))
    return sorted(random.Random(cfg.seed * 7919 + rnd).sample(pool, k))


def _round(run: Run, rnd: int) -> dict[str, Any]:
    cfg, s, gm, t = run.cfg, run.session, run.gm, Timer()
    wall0, started = time.perf_counter(), time.time()
    target = sparsity_at(rnd, cfg.rounds, cfg.sparsity, cfg.schedule, cfg.ramp_fraction)
    if cfg.granularity == "2:4" and cfg.pruning_on:
        target = 0.5
    kinds = [i.kind for i in gm.infos]
    with t("plan"):
        targets = round_targets(gm.weights, gm.masks, kinds, cfg.mask_policy, target)  # per tensor, from where we are
        clients = _select(run, rnd)
    failures: dict[str, str] = {}
    agg = make_aggregator(cfg.aggregation, gm.infos, gm.shapes, cfg.trim)
    run.norm = model_norm(gm.weights)
    bytes_up: dict[str, int] = {}
    if len(clients) >= cfg.min_clients:
        with t("serialize"):
            blob = gm.encode({"run_id": run.run_id, "round": rnd})
        with t("publish"):
            ref = s.publish_blob(blob)
        args = {"run_id": run.run_id, "round": rnd, "model": ref.as_args(), "epochs": cfg.local_epochs,
                "batch_size": cfg.batch_size, "lr": cfg.lr, "sparsity_to": target,
                "targets": {n: round(t, 6) for n, t, k in zip(gm.names, targets, kinds) if k},
                "update_format": cfg.values_format, "regrow": cfg.regrow_fraction}
        run.importance = {}
        if cfg.structured_step(rnd) is not None:  # the statistics the shrinking step after this round ranks by
            rep = gm.structure
            args["importance"] = {"method": cfg.importance, "layers": sorted(rep["shrinkable"]), "at": rep["measure_at"]}
        submitted = {d: s.submit(d, "train_round", {**args, "seed": cfg.seed * 1_000_003 + rnd * 1009
                                                     + zlib.crc32(d.encode())}) for d in clients}
        pending = {fut: d for d, (_, fut) in submitted.items()}
        deadline = time.monotonic() + cfg.round_timeout_s
        while pending:
            with t("wait"):
                done, _ = cf.wait(pending, timeout=max(0.0, deadline - time.monotonic()),
                                  return_when=cf.FIRST_COMPLETED)
            if not done:
                break
            for fut in done:
                dev = pending.pop(fut)
                error = _collect(run, rnd, dev, fut.result(), targets, agg, t, bytes_up)
                if error:
                    failures[dev] = error
            run.reporter.round_progress(rnd, len(clients) - len(pending), len(clients))
        for dev in pending.values():
            failures[dev] = f"no update within --round-timeout {cfg.round_timeout_s:.0f} s"
            s.forget(submitted[dev][0])  # a result that still comes is late: logged and ignored
        s.clear_blob(ref.sha256)
        bytes_down = len(blob)
    else:
        bytes_down = 0
        failures["round"] = f"only {len(clients)} eligible clients, --min-clients is {cfg.min_clients}"
    applied = agg.count >= cfg.min_clients
    if not applied and "round" not in failures:
        failures["round"] = (f"{agg.count} of {len(clients)} updates arrived, --min-clients is {cfg.min_clients}: "
                             f"the round was not applied")
    sent_dense = gm.dense_fp32_bytes
    if applied:
        with t("aggregate"):
            gm.weights, gm.masks = agg.result(cfg.mask_policy, target, None if cfg.regrow_fraction else gm.masks)
        step = cfg.structured_step(rnd)
        if step is not None:
            with t("shrink"):
                _shrink(run, rnd, step)
    with t("evaluate"):
        metrics = gm.evaluate()
    sparsity = sparsity_report(gm.masks, gm.names, gm.shapes)
    ups = list(bytes_up.values())
    row = {
        "round": rnd, "target_sparsity": round(target, 5), "sparsity": sparsity["prunable"],
        "sparsity_overall": sparsity["overall"], "sparsity_per_tensor": sparsity["per_tensor"],
        "clients_selected": len(clients), "clients_ok": agg.count, "failures": len(failures),
        "failure_reasons": failures, "applied": applied,
        "accuracy": metrics.get("accuracy"), "loss": metrics.get("loss"),
        "bytes_down_per_client": bytes_down, "bytes_down_total": bytes_down * len(clients),
        "bytes_up_per_client": (sum(ups) / len(ups)) if ups else None, "bytes_up_total": sum(ups),
        "up_ratio_vs_dense_fp32": (sent_dense / (sum(ups) / len(ups))) if ups else None,
        "dense_fp32_bytes": sent_dense, "aggregator_bytes": agg.nbytes,  # of the model this round trained
        # the architecture after this round (a structured step may have shrunk it at the end of the round)
        "params": gm.num_params, "flops": gm.flops, "architecture": gm.units,
        "units_removed": round(1.0 - sum(gm.units.values()) / max(1, sum(run.original_units.values())), 4),
    }
    with t("persist"):
        gm.save(run.run_dir, f"round-{rnd:04d}")  # the resume point, written before the round is recorded
        (run.run_dir / f"round-{rnd - 2:04d}.ept").unlink(missing_ok=True)
        run.tb_rows.append((rnd, {k: row[k] for k in ("accuracy", "loss", "sparsity", "bytes_up_per_client",
                                                     "bytes_down_per_client") if row.get(k) is not None}))
        if gm.has_eval:  # its worker is up anyway; otherwise the scalars wait for the end of the run
            gm.scalars(run.run_dir / "tensorboard", run.tb_rows)
            run.tb_rows.clear()
    row["wall_s"] = round(time.perf_counter() - wall0, 4)
    row["timing_s"] = {k: round(v, 4) for k, v in t.phases.items()}
    row["cpu_s"] = {k: round(v, 4) for k, v in t.cpu.items()}
    run.store.save_round(run.run_id, rnd, started, row)
    return row


def _collect(run: Run, rnd: int, dev: str, reply, targets: list[float], agg: MaskedFedAvg, t: Timer,
             bytes_up: dict[str, int]) -> str | None:
    """Pull, check and aggregate one client's update. Returns an error text, or None."""
    s, gm = run.session, run.gm
    if not reply.ok:
        run.store.save_client_round(run.run_id, rnd, dev, False, None, None, None,
                                    f"{reply.error_code}: {reply.error_message}")
        return f"{reply.error_code}: {reply.error_message}"
    if (dev, rnd) in run.counted:
        s.submit(dev, "ack", {"ids": [reply.id]})
        return None  # counted once per (device, round)
    result = reply.result or {}
    try:
        with t("transfer"):
            data = s.fetch_blob(dev, result["update"]["sha256"], timeout_s=run.cfg.round_timeout_s,
                                expected_bytes=result["update"]["bytes"])
        with t("decode"):
            upd = codec.decode(data, reference=gm.weights, reference_masks=gm.masks)
            if upd.meta.get("round") != rnd or upd.meta.get("run_id") != run.run_id:
                raise UpdateRejected(f"update is for run {upd.meta.get('run_id')} round {upd.meta.get('round')}")
            agg.validate(upd.tensors, upd.masks, targets)
            check_norm(upd.tensors, gm.weights, run.cfg.max_norm_ratio, run.norm)
        with t("aggregate"):
            tensors = clip_update(upd.tensors, gm.weights, run.cfg.clip_norm) if run.cfg.clip_norm else upd.tensors
            agg.add(tensors, upd.masks, float(result["metrics"]["num_samples"]))
    except (ProtocolError, UpdateRejected, KeyError, TypeError) as exc:
        if isinstance(exc, UpdateRejected):
            s.submit(dev, "ack", {"ids": [reply.id]})  # a definitive no: sending it again will not help
        msg = f"update rejected: {exc}"
        run.store.save_client_round(run.run_id, rnd, dev, False, None, None, result.get("metrics"), msg)
        return msg
    run.counted.add((dev, rnd))
    if "importance" in result["metrics"]:
        _fold_importance(run, dev, result["metrics"]["importance"], float(result["metrics"]["num_samples"]))
    s.submit(dev, "ack", {"ids": [reply.id]})  # the device may drop it from its outbox now
    bytes_up[dev] = len(data)
    run.store.save_client_round(run.run_id, rnd, dev, True, result["metrics"].get("model_bytes"), len(data),
                                result["metrics"], None)
    return None


def _fold_importance(run: Run, dev: str, stats: Any, weight: float) -> None:
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


def _shrink(run: Run, rnd: int, removed: float) -> None:
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
    run.reporter.say(f"round {rnd}: {removed:.0%} of units removed: {before:,} -> {gm.num_params:,} parameters, "
                     + ", ".join(f"{k} {v}" for k, v in gm.units.items()))


def _summary(run: Run, state: str, wall_s: float, baseline: dict) -> dict[str, Any]:
    rows = [r for r in run.rows if r.get("applied")]
    ups = [r["bytes_up_per_client"] for r in rows if r.get("bytes_up_per_client")]
    last = run.rows[-1] if run.rows else {}
    return {
        "run_id": run.run_id, "state": state, "run_dir": str(run.run_dir), "rounds_done": len(run.rows),
        "initial_accuracy": baseline.get("accuracy"),
        "final_accuracy": last.get("accuracy"), "final_loss": last.get("loss"),
        "final_sparsity": last.get("sparsity"), "final_sparsity_overall": last.get("sparsity_overall"),
        "num_params": run.gm.num_params, "dense_fp32_bytes": run.initial_dense_bytes,
        "upload_bytes_per_client_round": (sum(ups) / len(ups)) if ups else None,
        "ratio_vs_dense_fp32": (run.initial_dense_bytes / (sum(ups) / len(ups))) if ups else None,
        "bytes_up_total": sum(r["bytes_up_total"] for r in run.rows),
        "bytes_down_total": sum(r["bytes_down_total"] for r in run.rows),
        "round_wall_s": (sum(r["wall_s"] for r in run.rows) / len(run.rows)) if run.rows else None,
        "total_wall_s": round(wall_s, 3), "clients": sorted(run.begun),
        "layers": run.gm.layer_report, "flops": run.gm.flops, "architecture": run.gm.units,
        "original_architecture": run.original_units,
    }
