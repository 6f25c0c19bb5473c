"""`edgeprune` commands: training across the fleet, and watching a run from another terminal. Each command's flags sit beside its handler."""

from __future__ import annotations

import argparse
import json
import time

from edge_agent.protocol.constants import DEFAULT_CHUNK_BYTES, IMPORTANCE_METHODS

from .. import output
from .common import UsageError, _common, _session, _store

# Every TrainConfig field is one `train` flag of the same name, except these (flag dest -> field).
_RENAMED = {"round_timeout": "round_timeout_s", "wait_for": "wait_for_devices", "wait_timeout": "wait_timeout_s"}
_CONVERT = {"input_shape": lambda v: tuple(v) if v else None, "devices": lambda v: v.split(",") if v else None}
RESUME_MAY_CHANGE = ("round_timeout", "wait_for", "wait_timeout")  # --resume takes new values of these only


def config_flags() -> dict[str, str]:
    """flag dest -> TrainConfig field, read from the dataclass (nothing to keep in step by hand)."""
    import dataclasses

    from ..train import TrainConfig

    dest = {field: flag for flag, field in _RENAMED.items()}
    return {dest.get(f.name, f.name): f.name for f in dataclasses.fields(TrainConfig)}


def _train_config(args: argparse.Namespace):
    from ..train import TrainConfig

    return TrainConfig(
        **{field: _CONVERT.get(flag, lambda v: v)(getattr(args, flag)) for flag, field in config_flags().items()}
    )


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
    from edge_agent.ml.models import BUILTIN
    from edge_agent.ml.pruning import BLOCK_SHAPE, GRANULARITIES

    from ..masks import MASK_POLICIES
    from ..schedule import SCHEDULES
    from ..strategy import AGGREGATIONS
    from ..train import UPDATE_FORMATS, TrainConfig

    d = TrainConfig()  # the defaults live there; --help reads them
    block = f"{BLOCK_SHAPE[1]}x{BLOCK_SHAPE[0]}"
    p.add_argument(
        "--model",
        default=d.model,
        help=f"built-in model ({', '.join(BUILTIN)}) or a tf-keras model file "
        f"(.keras, .h5, SavedModel dir) (default: %(default)s)",
    )
    p.add_argument("--rounds", type=int, default=d.rounds, help="federated rounds (default: %(default)s)")
    p.add_argument(
        "--sparsity",
        type=float,
        default=d.sparsity,
        help="target fraction of pruned weights; 0 = dense FedAvg (default: %(default)s)",
    )
    p.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default=d.schedule,
        help="sparsity over rounds: polynomial ramp to the target, then hold; or constant from round 1 "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--ramp-fraction",
        type=float,
        default=d.ramp_fraction,
        help="polynomial: fraction of rounds to reach the target (default: %(default)s)",
    )
    p.add_argument(
        "--regrow",
        type=float,
        default=d.regrow,
        help="each round, clients train every weight (pruned ones from zero) for this fraction of their "
        "local steps, then prune by magnitude, so weights that matter can grow back; 0 = fixed masks "
        "that only shrink (2:4 never regrows) (default: %(default)s)",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--clients-per-round", type=int, help="devices sampled per round (default: all eligible)")
    g.add_argument("--fraction", type=float, help="fraction of eligible devices sampled per round (default: all)")
    p.add_argument(
        "--min-clients",
        type=int,
        default=d.min_clients,
        help="updates needed to apply a round; a run where no round applied fails (default: %(default)s)",
    )
    p.add_argument(
        "--local-epochs", type=int, default=d.local_epochs, help="local epochs per round (default: %(default)s)"
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="local batch size (default: %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="local learning rate (default: %(default)s)")
    p.add_argument(
        "--optimizer", choices=["adam", "sgd"], default=d.optimizer, help="local optimizer (default: %(default)s)"
    )
    p.add_argument(
        "--granularity",
        choices=GRANULARITIES,
        default=d.granularity,
        help=f"pruning granularity: single weights, {block} blocks (Dense kernels; what TFLite's sparse "
        f"int8 stores compactly), or 2:4 (50%%) (default: %(default)s)",
    )
    p.add_argument(
        "--mask-policy",
        choices=MASK_POLICIES,
        default=d.mask_policy,
        help="global mask each round: one magnitude threshold across all layers at the scheduled sparsity "
        "(global), the same sparsity in every layer, or the union/intersection of client masks "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--update-format",
        choices=UPDATE_FORMATS,
        default=d.update_format,
        help="upload value encoding; auto = int4 deltas with stochastic rounding when pruning, "
        "plain fp32 for dense FedAvg (default: %(default)s)",
    )
    p.add_argument(
        "--aggregation",
        choices=AGGREGATIONS,
        default=d.aggregation,
        help="how updates combine: sample-weighted FedAvg (streaming), or coordinate-wise "
        "median / trimmed mean among the clients that kept each weight (robust to a few bad "
        "clients; keeps all updates of a round in memory) (default: %(default)s)",
    )
    p.add_argument(
        "--trim", type=float, default=d.trim, help="trimmed-mean: fraction cut at each end (default: %(default)s)"
    )
    p.add_argument(
        "--clip-norm",
        type=float,
        default=d.clip_norm,
        help="clip each update (client minus global) to this L2 norm; 0 = off (default: %(default)s)",
    )
    p.add_argument(
        "--max-norm-ratio",
        type=float,
        default=d.max_norm_ratio,
        help="reject an update whose norm exceeds this multiple of the model's norm; 0 = off " "(default: %(default)s)",
    )
    p.add_argument(
        "--structured",
        type=float,
        default=d.structured,
        metavar="FRACTION",
        help="structured pruning: remove this fraction of the units/filters of every Dense and Conv2D "
        "layer that can shrink safely (ranked by the fleet's importance statistics), gradually, "
        "with recovery training between steps; weight pruning then sparsifies what remains; 0 = off "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--structured-every",
        type=int,
        default=d.structured_every,
        metavar="K",
        help="one structured step every K rounds, the last at least one round before the end " "(default: %(default)s)",
    )
    p.add_argument(
        "--importance",
        choices=IMPORTANCE_METHODS,
        default=d.importance,
        help="how devices rank units: mean |activation| on local data, weight L1/L2 norm, or "
        "a first-order Taylor score (default: %(default)s)",
    )
    p.add_argument(
        "--round-timeout",
        type=float,
        default=d.round_timeout_s,
        help="seconds to wait for updates in a round (default: %(default)s)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        help="seed for model init, client sampling and local shuffling (default: %(default)s)",
    )
    p.add_argument(
        "--eval-data",
        default=d.eval_data,
        help="held-out data on the coordinator: 'digits', 'fashion-mnist', .npz, .csv, "
        "image folder, or 'none' (default: %(default)s)",
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=d.eval_every,
        help="evaluate the global model every K rounds, the first and each of the last 10 "
        "(default: %(default)s = every round)",
    )
    p.add_argument("--input-shape", type=int, nargs="+", help="input shape for a built-in model without --eval-data")
    p.add_argument("--num-classes", type=int, help="classes for a built-in model without --eval-data")
    p.add_argument("--devices", help="comma-separated device ids to use (default: every device that can train)")
    p.add_argument(
        "--wait-for",
        type=int,
        default=d.wait_for_devices,
        help="before round 1, wait (once) until this many devices can train; on timeout go on only if "
        "--min-clients allows (default: %(default)s = do not wait)",
    )
    p.add_argument(
        "--wait-timeout", type=float, default=d.wait_timeout_s, help="seconds --wait-for waits (default: %(default)s)"
    )
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
