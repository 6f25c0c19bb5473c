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
import os
import time
from dataclasses import asdict, replace
from typing import Any

from edge_agent.ml.models import BUILTIN
from edge_agent.protocol import codec, serde
from edge_agent.protocol.args import DeltaLink, TrainPrepare, TrainRound
from edge_agent.protocol.constants import SEEDED_MODELS_SINCE

from .. import tblog
from ..downlink import Downlink
from ..masks import round_targets
from ..model_worker import ModelWorkerError
from ..schedule import sparsity_at
from ..session import Session
from ..store import Store
from ..strategy import MaskedFedAvg, make_aggregator, model_norm
from .config import TrainConfig
from .intake import intake
from .observer import Observer
from .plan import begin_clients, client_seed, plan_fleet, select_clients
from .record import (
    Run,
    Sent,
    Timer,
    cpu_s,
    flush_board,
    new_run_id,
    no_round_message,
    peak_rss,
    persist,
    round_row,
    summary,
    to_board,
)
from .structured import shrink


def train(
    cfg: TrainConfig, session: Session, store: Store, reporter: Observer, resume: str | None = None
) -> dict[str, Any]:
    """Run a whole federated training job; return its summary (also stored).

    ``resume``: continue an interrupted run after its last *recorded* round. Each round's global model is
    written (atomically) before the round is recorded, so a crash repeats no completed round and loses none.
    """
    cfg.validate()
    run_id = resume or new_run_id()
    run = Run(cfg, session, store, reporter, run_id, store.home / "runs" / run_id)
    t0, phases = time.perf_counter(), Timer()
    first_round = 1
    usable = plan_fleet(run)  # before anything is started or recorded
    with phases("setup"):
        for dev in usable:  # workers import TensorFlow while our model worker does the same
            session.submit(dev, "train_prepare", TrainPrepare(run_id))
        try:
            run.gm = setup(run, resume, usable)
        except BaseException:  # the run never started: the workers just prepared must not linger
            for dev in usable:
                session.submit(dev, "train_end")
            raise
        first_round = run.rows[-1]["round"] + 1 if resume and run.rows else 1
    if resume:
        reporter.say(f"run {run.run_id}: resuming after round {first_round - 1} of {cfg.rounds}")
    reporter.say(
        f"run {run.run_id}: {cfg.model} ({run.gm.num_params:,} parameters), {cfg.rounds} rounds, "
        f"target sparsity {cfg.sparsity:.0%} ({cfg.schedule}, {cfg.granularity}), fleet {session.fleet}"
    )
    state, baseline = "failed", {}
    try:
        with phases("begin_clients"):
            begin_clients(run, usable)
        with phases("rounds"):
            baseline = run.gm.evaluate()
            reporter.round_header()
            for rnd in range(first_round, cfg.rounds + 1):
                row = run_round(run, rnd)
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
                flush_board(run)
            except ModelWorkerError as exc:  # final.ept is written before; only the Keras copies are missing
                reporter.warn(f"model.keras / TensorBoard not written: {exc}")
            finally:
                run.gm.close()
        out = summary(run, state, time.perf_counter() - t0, baseline)
        out["phases_s"] = {k: round(v, 3) for k, v in phases.phases.items()}
        out["peak_rss_bytes"] = peak_rss()
        out["cpu_s"] = cpu_s()
        if state == "failed":
            out["error"] = {"code": "no_round_applied", "message": no_round_message(run)}
        store.finish_run(run.run_id, state, out)
    return out


def setup(run: "Run", resume: str | None, devices: list[str]) -> Any:
    """The global model (fresh, or at the resume point) and the run record."""
    from ..global_model import GlobalModel, load_eval_data

    cfg, store, reporter, run_id, session = run.cfg, run.store, run.reporter, run.run_id, run.session
    run.eval_set = load_eval_data(cfg.eval_data)
    shape = cfg.input_shape or (tuple(run.eval_set.x.shape[1:]) if run.eval_set is not None else None)
    classes = cfg.num_classes or (run.eval_set.num_classes if run.eval_set is not None else None)
    run.rows = store.rounds(run_id) if resume else []
    last = run.run_dir / f"round-{run.rows[-1]['round']:04d}.ept" if run.rows else None
    # a resume point carries its architecture (a structured run may have shrunk the model since)
    arch = codec.decode(last.read_bytes()).meta.get("arch") if last is not None else None
    stored = (store.run(run_id) or {}).get("config", {}) if resume else {}
    gm = run.gm = GlobalModel.create(
        cfg.model, shape, classes, cfg.granularity, cfg.pruning_on, cfg.seed, run.eval_set, arch, stored.get("training")
    )
    run.original_units = stored.get("units") or run.gm.units
    run.initial_dense_bytes = stored.get("dense_fp32_bytes") or run.gm.dense_fp32_bytes
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
        run.board.extend(tblog.setup_records(run.run_id, asdict(cfg), run.gm.arch_json))
        store.create_run(
            run.run_id,
            session.fleet,
            "train",
            {
                **asdict(cfg),
                "broker": session.link.urls,  # what --resume reconnects to
                "num_params": run.gm.num_params,
                "dense_fp32_bytes": run.gm.dense_fp32_bytes,
                "training": run.gm.training,  # a user model's loss and metrics: what devices compile with
                "layers": run.gm.layer_report,
                "units": run.gm.units,
                "structure": run.gm.structure if cfg.structured else None,
                "tensors": [
                    {"name": n, "shape": list(s), "pruned": i.kind}
                    for n, s, i in zip(run.gm.names, run.gm.shapes, run.gm.infos)
                ],
            },
        )
    run.run_dir.mkdir(parents=True, exist_ok=True)
    # a fresh built-in model goes down as a seed when every device can draw it (a model file has its own weights)
    fresh = not resume and cfg.model in BUILTIN and not os.path.exists(cfg.model)
    seeded = fresh and all(serde.version_at_least(session.protocol_of(d), SEEDED_MODELS_SINCE) for d in devices)
    run.downlink = Downlink(cfg.download_format, seed=cfg.seed, seeded=seeded)
    if resume and run.rows:  # the last recorded round's clients hold the model they trained from
        rnd = run.rows[-1]["round"]
        before = run.run_dir / f"round-{rnd - 1:04d}.ept"  # that model (the resume point is the next one)
        if before.exists():
            held_by = [c["device_id"] for c in store.client_rounds(run_id) if c["round"] == rnd and c["ok"]]
            run.downlink.resume_from(codec.decode(before.read_bytes()), held_by)
    run.cast = run.downlink.prepare(gm, run.run_id)  # the devices' starting model is its reconstruction
    if resume and run.rows:  # which is the resume point from now on (a second resume deltas against it)
        run.gm.save(run.run_dir, f"round-{run.rows[-1]['round']:04d}")
    return gm


def run_round(run: Run, rnd: int) -> dict[str, Any]:
    """plan -> send and collect (intake of each update) -> aggregate -> shrink -> evaluate -> record."""
    cfg, gm, t = run.cfg, run.gm, Timer()
    wall0, started = time.perf_counter(), time.time()
    target = sparsity_at(rnd, cfg.rounds, cfg.sparsity, cfg.schedule, cfg.ramp_fraction)
    if cfg.granularity == "2:4" and cfg.pruning_on:
        target = 0.5
    with t("plan"):  # per-tensor targets, from where the model is now
        targets = round_targets(gm.weights, gm.masks, [i.kind for i in gm.infos], cfg.mask_policy, target)
        clients = select_clients(run, rnd)
    agg = make_aggregator(cfg.aggregation, gm.infos, gm.shapes, cfg.trim)
    run.norm = model_norm(gm.weights)
    sent = Sent()
    if len(clients) >= cfg.min_clients:
        send_and_collect(run, rnd, clients, targets, agg, t, sent)
    else:
        sent.failures["round"] = f"only {len(clients)} eligible clients, --min-clients is {cfg.min_clients}"
    applied = agg.count >= cfg.min_clients
    if not applied and "round" not in sent.failures:
        sent.failures["round"] = (
            f"{agg.count} of {len(clients)} updates arrived, --min-clients is "
            f"{cfg.min_clients}: the round was not applied"
        )
    dense_bytes = gm.dense_fp32_bytes  # of the model this round trained, before a structured step shrinks it
    if applied:
        with t("aggregate"):
            gm.weights, gm.masks = agg.result(cfg.mask_policy, target, None if cfg.regrow_fraction else gm.masks)
        step = cfg.structured_step(rnd)
        if step is not None:
            with t("shrink"):
                shrink(run, rnd, step)
            run.board.append(tblog.Record("", "graph", "graph", rnd, gm.arch_json))  # the smaller model
        with t("serialize"):  # what the devices will hold from here on: evaluated, saved, trained from
            if rnd < cfg.rounds:
                run.cast = run.downlink.prepare(gm, run.run_id)
            else:
                run.downlink.finish(gm)
    with t("evaluate"):
        metrics = gm.evaluate() if evaluated(cfg, rnd) else {}
    row = round_row(run, rnd, target, clients, agg, sent, applied, metrics, dense_bytes)
    with t("persist"):
        persist(run, rnd)
    row["wall_s"] = round(time.perf_counter() - wall0, 4)
    row["timing_s"] = {k: round(v, 4) for k, v in t.phases.items()}
    row["cpu_s"] = {k: round(v, 4) for k, v in t.cpu.items()}
    with t("tensorboard"):  # after the timings it shows; the stored row's include its own time
        to_board(run, tblog.round_records(rnd, row, gm, targets, sent.device_metrics, sent.failures, run.rows))
    row["wall_s"] = round(time.perf_counter() - wall0, 4)
    row["timing_s"]["tensorboard"] = round(t.phases["tensorboard"], 4)
    row["cpu_s"]["tensorboard"] = round(t.cpu["tensorboard"], 4)
    run.store.save_round(run.run_id, rnd, started, row)
    return row


def evaluated(cfg: TrainConfig, rnd: int) -> bool:
    """Rounds whose model is evaluated: every --eval-every-th, the first, and the last 10."""
    return cfg.eval_every == 1 or rnd == 1 or rnd % cfg.eval_every == 0 or rnd > cfg.rounds - 10


def send_and_collect(
    run: Run, rnd: int, clients: list[str], targets: list[float], agg: MaskedFedAvg, t: Timer, sent: Sent
) -> None:
    """Broadcast the model once, ask each client for a round, take each update as it comes (intake)."""
    cfg, s, gm, cast = run.cfg, run.session, run.gm, run.cast
    held = {d: run.downlink.holds.get(d) for d in clients}
    routes = {d: cast.route(held[d], s.protocol_of(d)) for d in clients}  # None: the exact model
    links = {(link.base, link.digest): link for route in routes.values() if route for link in route}
    with t("publish"):  # each broadcast goes out (retained) only if a client will fetch it; the exact model is
        ref = s.publish_blob(cast.exact) if None in routes.values() else s.offer_blob(cast.exact)  # always on offer
        refs = {key: s.publish_blob(link.data) for key, link in links.items()}
    importance = None
    run.importance = {}
    if cfg.structured_step(rnd) is not None:  # the statistics the shrinking step after this round ranks by
        rep = gm.structure
        importance = {"method": cfg.importance, "layers": sorted(rep["shrinkable"]), "at": rep["measure_at"]}
    args = TrainRound(
        run_id=run.run_id,
        round=rnd,
        model=ref,
        model_digest=cast.digest,
        epochs=cfg.local_epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        targets={n: round(x, 6) for n, x, i in zip(gm.names, targets, gm.infos) if i.kind},
        update_format=cfg.values_format,
        regrow=cfg.regrow_fraction,
        importance=importance,
    )

    def downlink_args(d: str) -> dict[str, Any]:
        """The broadcasts ``d`` applies; sent the exact model, it still hears of this round's delta if it can
        read it (a device that failed last round may hold the base all the same)."""
        route = routes[d]
        if route is None:
            head = refs.get((cast.base, cast.digest)) if cast.readable_by(s.protocol_of(d)) else None
            return {"delta": head, "delta_base": cast.base}
        if not route:  # it holds this round's model: it trains from that
            return {}
        chain = [DeltaLink(refs[link.base, link.digest], link.base) for link in route] if len(route) > 1 else []
        return {"delta": refs[route[-1].base, route[-1].digest], "delta_base": route[0].base, "delta_chain": chain}

    submitted = {
        d: s.submit(d, "train_round", replace(args, seed=client_seed(cfg.seed, rnd, d), **downlink_args(d)))
        for d in clients
    }
    pending = {fut: d for d, (_, fut) in submitted.items()}
    deadline = time.monotonic() + cfg.round_timeout_s
    while pending:
        with t("wait"):
            done, _ = cf.wait(pending, timeout=max(0.0, deadline - time.monotonic()), return_when=cf.FIRST_COMPLETED)
        if not done:
            break
        for fut in done:
            dev = pending.pop(fut)
            reply = fut.result()
            error = intake(run, rnd, dev, reply, targets, agg, t, sent)
            if error:
                sent.failures[dev] = error
            else:
                run.downlink.trained(dev, cast.digest)
            fetched = ((reply.result or {}).get("metrics") or {}).get("download_bytes")
            sent.bytes_down[dev] = fetched if isinstance(fetched, int) else cast.size_for(held[dev], s.protocol_of(dev))
        run.reporter.round_progress(rnd, len(clients) - len(pending), len(clients))
    for dev in pending.values():
        sent.failures[dev] = f"no update within --round-timeout {cfg.round_timeout_s:.0f} s"
        s.forget(submitted[dev][0])  # a result that still comes is late: logged and ignored
        sent.bytes_down[dev] = cast.size_for(held[dev], s.protocol_of(dev))  # planned: it did not say
    for blob in (ref, *refs.values()):
        s.clear_blob(blob.sha256)
    sent.download_format = cast.format
