"""`edgeprune` commands: training across the fleet, and watching a run from another terminal. Each command's flags sit beside its handler."""

from __future__ import annotations

import argparse
import json
import time

from edge_agent.protocol.constants import DEFAULT_CHUNK_BYTES

from .. import output
from .common import UsageError, _common, _session, _store

RESUME_MAY_CHANGE = ("round_timeout", "wait_for", "wait_timeout")  # --resume takes new values of these only


def config_flags() -> dict[str, str]:
    """flag dest -> TrainConfig field, read from the config's field table."""
    from ..train import TrainConfig

    return {TrainConfig.flag_of(f): f.name for f in TrainConfig.table()}


def _convert(hint: str, value):
    if value is None:
        return None
    if hint.startswith("tuple"):
        return tuple(value)
    if hint.startswith("list[str]"):
        return value.split(",")
    return value


def _train_config(args: argparse.Namespace):
    from ..train import TrainConfig

    return TrainConfig(
        **{f.name: _convert(str(f.type), getattr(args, TrainConfig.flag_of(f))) for f in TrainConfig.table()}
    )


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field: name, type, default, help and choices all from its table."""
    from ..train import TrainConfig

    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for f in TrainConfig.table():
        meta, hint = f.metadata, str(f.type)
        kw: dict = {"default": f.default, "help": meta["help"]}
        if f.default is not None and meta["show_default"]:
            kw["help"] += " (default: %(default)s)"
        if meta["choices"]:
            kw["choices"] = meta["choices"]
        if meta["metavar"]:
            kw["metavar"] = meta["metavar"]
        if hint.startswith("tuple"):
            kw |= {"type": int, "nargs": "+"}
        elif hint.startswith(("int", "float")):
            kw["type"] = int if hint.startswith("int") else float
        target = p
        if meta["group"]:
            if meta["group"] not in groups:
                groups[meta["group"]] = p.add_mutually_exclusive_group()
            target = groups[meta["group"]]
        target.add_argument("--" + TrainConfig.flag_of(f).replace("_", "-"), **kw)


def _resume_setup(args: argparse.Namespace):
    """The stored run's config, fleet and broker; a flag typed now that contradicts them is refused."""
    from ..train import resume_config

    cfg, rec = resume_config(_store(args), args.resume)
    typed = _train_config(args)
    for dest, field_name in config_flags().items():
        if dest in RESUME_MAY_CHANGE:
            if dest in args.explicit:
                setattr(cfg, field_name, getattr(typed, field_name))
        elif dest in args.explicit and getattr(typed, field_name) != getattr(cfg, field_name):
            raise UsageError(
                f"--{dest.replace('_', '-')} {getattr(typed, field_name)!r} contradicts run "
                f"{rec['run_id']}, which has {getattr(cfg, field_name)!r}; a resumed run keeps its "
                f"settings (drop the flag)"
            )
    stored = {"fleet": rec["fleet"], "broker": rec["config"].get("broker")}
    for key, value in stored.items():
        if value is None:
            continue
        if key in args.explicit and getattr(args, key) != value:
            raise UsageError(
                f"--{key} {getattr(args, key)} contradicts run {rec['run_id']}, which ran on {key} "
                f"{value}; drop --{key} to resume it there"
            )
        setattr(args, key, value)
    return cfg, rec


def cmd_train(args: argparse.Namespace) -> int:
    from ..progress import Reporter
    from ..store import RunNotFound
    from ..train import NoDevices, train

    resume = None
    try:
        if args.resume:  # the run's own config, fleet and broker
            cfg, rec = _resume_setup(args)
            resume = rec["run_id"]
        else:
            cfg = _train_config(args)
        cfg.validate()
    except (ValueError, RunNotFound) as exc:
        return output.fail(
            str(exc),
            code="usage" if isinstance(exc, (UsageError, RunNotFound)) else "bad_args",
            as_json=args.json,
            status=2,
        )
    try:
        session = _session(args, long_running=True)
    except ConnectionError as exc:
        return output.fail(str(exc), code="connect", as_json=args.json)
    reporter = Reporter(quiet=args.json)
    try:
        session.discover(1.0)
        summary = train(cfg, session, session.store, reporter, resume=resume)
    except NoDevices as exc:
        return output.fail(str(exc), code="no_devices", as_json=args.json)
    except ValueError as exc:
        return output.fail(str(exc), code="bad_args", as_json=args.json, status=2)
    except KeyboardInterrupt:
        runs = session.store.runs("train")
        rid = resume or (runs[0]["run_id"] if runs and runs[0]["state"] == "interrupted" else None)
        hint = f"; continue with: edgeprune train --resume {rid}" if rid else ""
        return output.fail(
            f"interrupted; the rounds so far are saved{hint}", code="interrupted", as_json=args.json, status=130
        )
    finally:
        session.close()
    if summary["state"] != "done":
        err = summary.get("error") or {
            "code": summary["state"],
            "message": f"run {summary['run_id']} {summary['state']}",
        }
        if args.json:
            output.print_json(
                {
                    **output.error_obj(err["code"], err["message"]),
                    "run": summary,
                    "rounds": session.store.rounds(summary["run_id"]),
                }
            )
        else:
            reporter.say(f"run {summary['run_id']} FAILED: {err['message']}")
        return 1
    if args.json:
        rounds = session.store.rounds(summary["run_id"])
        output.print_json({**summary, "rounds": rounds})
    else:
        acc = summary["final_accuracy"]
        reporter.say(
            f"run {summary['run_id']} {summary['state']}: accuracy "
            f"{(acc * 100 if acc is not None else float('nan')):.2f}%, sparsity {summary['final_sparsity'] or 0:.1%}, "
            f"upload {output.human_bytes(summary['upload_bytes_per_client_round'])}/client-round "
            f"({(summary['ratio_vs_dense_fp32'] or 0):.1f}x below dense fp32), {summary['total_wall_s']:.1f} s"
        )
        reporter.say(f"model and TensorBoard logs: {summary['run_dir']}")
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    """A running job from another terminal: its rounds as they are recorded, and the fleet's states
    (from the coordinator home's store, which the training process writes)."""
    from ..progress import Reporter
    from ..store import RunNotFound

    store = _store(args)
    reporter = Reporter(quiet=args.json)
    deadline = time.monotonic() + args.wait
    while True:
        try:
            run = store.resolve_run(args.run, kind="train")
            break
        except RunNotFound as exc:
            if args.run != "latest" or time.monotonic() > deadline:
                return output.fail(str(exc), code="not_found", as_json=args.json)
            time.sleep(1.0)
    reporter.say(
        f"watching run {run['run_id']} ({run['state']}) on fleet {run['fleet']}; Ctrl-C stops watching "
        f"(not the run)"
    )
    seen, fleet_state = 0, None
    reporter.round_header()
    try:
        while True:
            rows = store.rounds(run["run_id"])
            for row in rows[seen:]:
                if args.json:
                    print(json.dumps(row, default=str), flush=True)
                else:
                    reporter.round_done(row)
            seen = len(rows)
            states = {d["device_id"]: d["state"] for d in store.devices(run["fleet"])}
            if states != fleet_state and not args.json:
                counts: dict[str, int] = {}
                for st in states.values():
                    counts[st] = counts.get(st, 0) + 1
                reporter.say("fleet: " + ", ".join(f"{n} {st}" for st, n in sorted(counts.items())))
                fleet_state = states
            run = store.resolve_run(run["run_id"])
            if run["state"] != "running":
                reporter.say(f"run {run['run_id']} {run['state']}")
                return 0 if run["state"] == "done" else 1
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "train",
        help="federated pruning-aware training over the live fleet",
        description="Train one model across the fleet's devices. Each device trains on its own data "
        "with TF-MOT pruning at the round's scheduled sparsity and uploads a sparse update; "
        "the coordinator aggregates them (masked FedAvg) into a pruned global model, "
        "evaluates it on held-out data and stores every round.",
    )
    _common(p)
    add_config_flags(p)
    p.add_argument(
        "--resume",
        metavar="RUN",
        help="continue an interrupted run (coordinator killed, machine rebooted) after its last recorded "
        "round, on the run's own fleet, broker and settings: no completed round is repeated or lost",
    )
    p.add_argument(
        "--chunk-bytes",
        type=int,
        default=DEFAULT_CHUNK_BYTES,
        help=f"bytes per MQTT message when sending models (default {DEFAULT_CHUNK_BYTES}; keep under "
        "the broker's limit: EMQX 1 MB, AWS IoT 128 KB)",
    )
    p.add_argument("--connect-timeout", type=float, default=10.0, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser(
        "watch",
        help="follow a running training job from another terminal",
        description="Print a training run's rounds as they are recorded and the fleet's device "
        "states, from the coordinator home; ends when the run ends.",
    )
    p.add_argument("run", nargs="?", default="latest", help="run id, prefix, suffix or `latest` (default: %(default)s)")
    _common(p, broker=False)
    p.add_argument("--interval", type=float, default=2.0, help="seconds between looks (default: %(default)s)")
    p.add_argument(
        "--wait",
        type=float,
        default=60.0,
        help="with `latest`: seconds to wait for a run to appear (default: %(default)s)",
    )
    p.set_defaults(func=cmd_watch)
