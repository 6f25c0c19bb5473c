"""`edgeprune` commands: TFLite artifacts: export, and benchmark on devices. Each command's flags sit beside its handler."""

from __future__ import annotations

import argparse
from pathlib import Path

from edge_agent.protocol.constants import DEFAULT_CHUNK_BYTES

from .. import output, views
from ..fleet import is_live
from .common import _common, _session, _store


def cmd_export(args: argparse.Namespace) -> int:
    from .. import export
    from ..global_model import load_eval_data
    from ..progress import Reporter
    from ..train import new_run_id

    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in export.FORMATS]
    if bad:
        return output.fail(
            f"unknown format(s) {', '.join(bad)}; choose from {', '.join(export.FORMATS)}",
            code="bad_args",
            as_json=args.json,
            status=2,
        )
    store = _store(args)
    reporter = Reporter(quiet=args.json)
    try:
        model, run = export.resolve_model(store, args.model, args.prune, args.prune_policy, args.granularity)
        run_eval = ((run or {}).get("config") or {}).get("eval_data")
        calib = load_eval_data(args.calibration_data or run_eval or "digits")
        qat = load_eval_data(args.qat_data) if args.qat else None
        scored = load_eval_data(args.eval_data or (run_eval if run else None))
    except ValueError as exc:
        return output.fail(str(exc), code="bad_args", as_json=args.json, status=2)
    run_id = run["run_id"] if run else new_run_id()
    out = (
        Path(args.out)
        if args.out
        else (Path(run["summary"]["run_dir"]) / "artifacts" if run else store.home / "exports" / run_id)
    )
    recs = export.export(model, formats, out, calibration=calib, qat_data=qat, progress=reporter.say, eval_data=scored)
    if run is None:
        store.create_run(
            run_id,
            "-",
            "export",
            {"model": args.model, "formats": formats, "prune": args.prune, "prune_policy": args.prune_policy},
        )
        store.finish_run(run_id, "done", {"run_dir": str(out)})
    for r in recs:
        store.save_artifact(run_id, r)
    trained = ((run or {}).get("summary") or {}).get("final_sparsity")
    if args.json:
        output.print_json({"run_id": run_id, "trained_sparsity": trained, "artifacts": recs})
        return 0
    views.terminal(f"artifacts of {run_id} in {out}", views.artifacts(trained), views.with_dense(recs))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .. import bench as bench_mod
    from ..progress import Reporter

    reporter = Reporter(quiet=args.json)
    store = _store(args)
    try:
        artifacts, run_id = bench_mod.collect_artifacts(store, args.model, args.formats.split(","), reporter)
    except ValueError as exc:
        return output.fail(str(exc), code="bad_args", as_json=args.json, status=2)
    try:
        session = _session(args, long_running=True)
    except ConnectionError as exc:
        return output.fail(str(exc), code="connect", as_json=args.json)
    try:
        rows = session.discover(args.wait)
        online = [r["device_id"] for r in rows if is_live(r)]
        devices = online if args.devices == "all" else [d for d in args.devices.split(",") if d]
        missing = [d for d in devices if d not in online]
        if missing:
            reporter.warn(f"not online, skipped: {', '.join(missing)}")
            devices = [d for d in devices if d in online]
        if not devices:
            if args.devices != "all" and online:
                why = f"none of {args.devices} is online in fleet {args.fleet!r}; online: {', '.join(online)}"
            else:
                seen = session.fleets_seen()
                why = f"no online devices to benchmark in fleet {args.fleet!r}; fleets on this broker: " + (
                    ", ".join(f"{f} ({n})" for f, n in seen.items()) or "none"
                )
            return output.fail(why, code="no_devices", as_json=args.json)
        summary = bench_mod.bench(
            session,
            store,
            artifacts,
            devices,
            run_id=run_id,
            threads=args.threads,
            runs=args.runs,
            duration_s=args.duration,
            warmup=args.warmup,
            budget_s=args.budget,
            runtime=args.runtime,
            parallel=args.parallel,
            reporter=reporter,
        )
    finally:
        session.close()
    if args.json:
        output.print_json(summary)
        return 0
    from ..report import print_bench

    print_bench(store.bench_results(bench_id=summary["bench_id"]))
    print(f"bench {summary['bench_id']} stored; `edgeprune report {run_id or summary['bench_id']}` for the report")
    return 0 if all("error" not in r for r in summary["devices"].values()) else 1


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "export",
        help="turn a run's global model (or a tf-keras file) into TFLite artifacts",
        description="Convert a trained model into TFLite variants and record each with its sha256, "
        "raw and gzip size, and the weight sparsity read back from the .tflite bytes. "
        "Note: TFLite stores int8 sparsity compactly only in 1x16 blocks of FULLY_CONNECTED "
        "weights; train with --granularity block for small sparse-int8 artifacts.",
    )
    p.add_argument(
        "model",
        help="run id (prefix), a tf-keras model file (.keras, .h5, SavedModel dir), or a built-in "
        "model name (digits_cnn, mlp, mobilenet_tiny) for a latency study with untrained weights",
    )
    p.add_argument(
        "--prune", type=float, default=0.0, help="built-in model only: magnitude-prune to this sparsity with TF-MOT"
    )
    p.add_argument(
        "--prune-policy",
        choices=["all", "xnnpack"],
        default="all",
        help="built-in model only: which layers --prune touches (xnnpack: 1x1 convolutions only)",
    )
    p.add_argument(
        "--granularity",
        choices=["unstructured", "block", "2:4"],
        default="unstructured",
        help="built-in model only: pruning granularity for --prune",
    )
    p.add_argument(
        "--formats", default="dense,sparse,sparse-int8,fp16", help="comma-separated: dense, sparse, sparse-int8, fp16"
    )
    p.add_argument(
        "--qat",
        action="store_true",
        help="also make sparse-int8-qat: pruning-preserving quantisation-aware fine-tuning",
    )
    p.add_argument(
        "--qat-data",
        default="digits",
        help="training data for --qat fine-tuning: 'digits', .npz or .csv (default digits)",
    )
    p.add_argument("--calibration-data", help="representative data for int8 calibration (default: the run's eval data)")
    p.add_argument(
        "--eval-data",
        help="labelled data each .tflite is scored on, in the TFLite interpreter: 'digits', 'fashion-mnist', "
        ".npz, .csv or an image folder (default: the run's eval data; none for a model without a run)",
    )
    p.add_argument("--out", help="output directory (default: the run's artifacts/ folder)")
    _common(p, broker=False)
    p.set_defaults(func=cmd_export)
    p = sub.add_parser(
        "bench",
        help="benchmark a run's artifacts (or .tflite files) on devices",
        description="Send TFLite artifacts to devices (chunked, sha256-verified, cached by hash), "
        "benchmark them interleaved on each device, and store the results.",
    )
    _common(p)
    p.add_argument(
        "--model",
        required=True,
        help="run id (exported first if needed), a .tflite file, a folder of them, or a model file",
    )
    p.add_argument(
        "--formats", default="dense,sparse,sparse-int8,fp16", help="variants to export when the run has none yet"
    )
    p.add_argument("--devices", default="all", help="'all' or comma-separated device ids")
    p.add_argument("--threads", type=int, default=0, help="interpreter threads (0 = runtime default)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--runs", type=int, default=None, help="timed inferences per artifact (default 200)")
    g.add_argument("--duration", type=float, default=None, help="seconds of timed inferences per artifact instead")
    p.add_argument("--warmup", type=int, default=10, help="untimed inferences first (default 10)")
    p.add_argument(
        "--budget", type=float, default=600.0, help="seconds an artifact may take before it is stopped (default 600)"
    )
    p.add_argument(
        "--runtime",
        default="auto",
        choices=["auto", "litert", "tflite_runtime", "tf.lite"],
        help="force a runtime (default: the best the device has)",
    )
    p.add_argument("--parallel", action="store_true", help="benchmark all devices at once (default: one after another)")
    p.add_argument(
        "--chunk-bytes",
        type=int,
        default=DEFAULT_CHUNK_BYTES,
        help=f"bytes per MQTT message when sending artifacts (default {DEFAULT_CHUNK_BYTES})",
    )
    p.add_argument("--wait", type=float, default=2.0, help=argparse.SUPPRESS)
    p.add_argument("--connect-timeout", type=float, default=10.0, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_bench)
