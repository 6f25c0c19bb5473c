"""`edgeprune` commands: stored runs: list, show, remove, report. Each command's flags sit beside its handler."""

from __future__ import annotations

import argparse
import time

from .. import output, views
from .common import _common, _find_run, _store, positive


def cmd_runs(args: argparse.Namespace) -> int:
    runs = _store(args).runs()
    if args.json:
        output.print_json(runs)
        return 0
    output.table(
        "runs",
        ["run", "kind", "fleet", "state", "created", "rounds", "accuracy", "sparsity"],
        [
            [
                r["run_id"],
                r["kind"],
                r["fleet"],
                r["state"],
                time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created"])),
                (r["summary"] or {}).get("rounds_done", "-"),
                f"{r['summary']['final_accuracy'] * 100:.2f}%"
                if (r["summary"] or {}).get("final_accuracy") is not None
                else "-",
                f"{r['summary']['final_sparsity']:.1%}"
                if (r["summary"] or {}).get("final_sparsity") is not None
                else "-",
            ]
            for r in runs
        ],
    )
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    store = _store(args)
    run, rc = _find_run(args, args.run)
    if run is None:
        return rc
    if run["kind"] == "bench":  # a bench id: its results, not a training run's fields
        from ..report import print_bench

        results = store.bench_results(bench_id=run["run_id"])
        if args.json:
            output.print_json({**run, "results": results})
        else:
            print(
                f"bench {run['run_id']} ({run['state']}) on fleet {run['fleet']}"
                + (f", artifacts of run {run['config'].get('run_id')}" if (run["config"] or {}).get("run_id") else "")
            )
            print_bench(results)
        return 0
    rounds = store.rounds(run["run_id"])
    clients = store.client_rounds(run["run_id"])
    if args.json:
        output.print_json({**run, "rounds": rounds, "client_rounds": clients})
        return 0
    cfg = run["config"]
    print(f"run {run['run_id']} ({run['kind']}, {run['state']}) on fleet {run['fleet']}")
    print(
        f"  model {cfg.get('model')}: {cfg.get('num_params', 0):,} parameters, target sparsity {cfg.get('sparsity', 0):.0%} "
        f"({cfg.get('schedule')}, {cfg.get('granularity')}, mask policy {cfg.get('mask_policy')})"
    )
    dense = (cfg.get("layers") or {}).get("dense") or {}
    for layer, why in dense.items():
        print(f"  layer {layer} left dense: {why}")
    views.terminal("rounds", views.ROUNDS, rounds)
    failed = [c for c in clients if not c["ok"]]
    if failed:
        output.table(
            "client failures", ["round", "device", "error"], [[c["round"], c["device_id"], c["error"]] for c in failed]
        )
    if run["summary"]:
        if (run["summary"].get("error") or {}).get("message"):
            print(f"  FAILED: {run['summary']['error']['message']}")
        print(f"  run dir: {run['summary'].get('run_dir')}")
    return 0


def cmd_runs_rm(args: argparse.Namespace) -> int:
    import shutil

    store = _store(args)
    run, rc = _find_run(args, args.run)
    if run is None:
        return rc
    if run["state"] == "running" and not args.force:
        return output.fail(
            f"run {run['run_id']} is marked running (a coordinator may still be training it); "
            f"--force removes it anyway",
            code="busy",
            as_json=args.json,
        )
    run_dir = store.home / "runs" / run["run_id"]
    store.delete_run(run["run_id"])
    shutil.rmtree(run_dir, ignore_errors=True)
    if args.json:
        output.print_json({"removed": run["run_id"], "run_dir": str(run_dir)})
    else:
        print(f"removed run {run['run_id']} and {run_dir}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .. import deployment, report

    store = _store(args)
    run, rc = _find_run(args, args.run)
    if run is None:
        return rc
    budget = deployment.Budget(args.latency_budget_ms, args.size_budget_kb)
    data = report.gather(store, run, budget)
    if args.html:
        report.write_html(data, args.html)
    if args.json:
        output.print_json({**data, "html": args.html})
        return 0
    report.print_summary(data)
    if args.html:
        print(f"HTML report: {args.html}")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "report",
        help="print a run's summary and write a self-contained HTML report",
        description="Accuracy and sparsity per round (and per tensor), bytes per round, artifact sizes and "
        "accuracy, latency per variant per device (p50 with p99), energy per inference with its label, "
        "temperatures; and which artifact to ship to which device: every artifact on every device with "
        "its Pareto front, and a pick per device within the budget given. Training curves in full "
        "(per-tensor sparsity, weight histograms, per-device training) are in TensorBoard: "
        "tensorboard --logdir <home>/runs.",
    )
    p.add_argument("run", help="training run id (prefix) or a bench id")
    p.add_argument("--html", help="write the HTML report to this file")
    p.add_argument(
        "--latency-budget-ms",
        type=positive,
        metavar="MS",
        help="the pick per device is the most accurate artifact whose p50 latency there is at most this",
    )
    p.add_argument(
        "--size-budget-kb",
        type=positive,
        metavar="KB",
        help="... and whose .tflite file is at most this many KB (1 KB = 1000 B)",
    )
    _common(p, broker=False)
    p.set_defaults(func=cmd_report)
    p = sub.add_parser(
        "runs",
        help="list training runs (and other jobs) in the coordinator home; runs rm RUN",
        description="List runs (newest first). A run can be named by its id, a unique prefix or "
        "suffix of it, or `latest`, wherever a command takes RUN.",
    )
    _common(p, broker=False)
    p.set_defaults(func=cmd_runs)
    rs = p.add_subparsers(dest="runs_cmd", metavar="{rm}")
    q = rs.add_parser("rm", help="delete a run: its records, rounds, artifacts, benchmark results and run directory")
    q.add_argument("run", help="run id, unique prefix or suffix, or `latest`")
    q.add_argument("--force", action="store_true", help="also a run still marked running")
    _common(q, broker=False)
    q.set_defaults(func=cmd_runs_rm)
    p = sub.add_parser("show", help="print one run: config, per-round accuracy, sparsity, bytes, failures")
    _common(p, broker=False)
    p.add_argument("run", help="run id (a unique prefix is enough)")
    p.set_defaults(func=cmd_show)
