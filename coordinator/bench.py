"""Benchmark artifacts on devices: send them (once, by hash), run, collect, store.

Artifacts travel as broadcast blobs (retained chunks under the broker's message
limit); a device that already has one by hash does not download it again.
Devices run one after another by default, so several agents sharing one host do
not disturb each other's timings; ``parallel`` runs them together (a real fleet).
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from pathlib import Path
from typing import Any

from edge_agent.protocol.args import Artifact, Bench

from . import tblog
from .session import Session
from .store import Store
from .train import new_run_id


def collect_artifacts(store: Store, ref: str, formats: list[str], reporter) -> tuple[list[dict], str | None]:
    """Artifact records for a run id (exporting it first if needed), a .tflite file, a folder or a model file."""
    from . import export
    from .global_model import load_eval_data

    path = Path(ref)
    if path.suffix == ".tflite" and path.is_file():
        return [export.record(path.read_bytes(), path.stem, "file", path)], None
    if path.is_dir() and list(path.glob("*.tflite")):
        return [export.record(p.read_bytes(), p.stem, "file", p) for p in sorted(path.glob("*.tflite"))], None
    run = store.run(ref)
    if run is not None and store.artifacts(run["run_id"]):
        return store.artifacts(run["run_id"]), run["run_id"]
    model, run = export.resolve_model(store, ref)  # a built-in name here means the dense, untrained model
    run_id = run["run_id"] if run else new_run_id()
    out = Path((run["summary"] or {}).get("run_dir")) / "artifacts" if run else store.home / "exports" / run_id
    calib = load_eval_data((run["config"] or {}).get("eval_data") if run else "digits")
    scored = calib if run else None  # an untrained built-in model has no accuracy worth a number
    recs = export.export(model, formats, out, calibration=calib, progress=reporter.say, eval_data=scored)
    if run is None:
        store.create_run(run_id, "-", "export", {"model": ref, "formats": formats})
        store.finish_run(run_id, "done", {"run_dir": str(out)})
    for r in recs:
        store.save_artifact(run_id, r)
    return recs, run_id


def bench(
    session: Session,
    store: Store,
    artifacts: list[dict],
    devices: list[str],
    *,
    run_id: str | None,
    threads: int,
    runs: int | None,
    duration_s: float | None,
    warmup: int,
    budget_s: float,
    runtime: str,
    parallel: bool,
    reporter,
) -> dict[str, Any]:
    bench_id = new_run_id()
    config = {
        "run_id": run_id,
        "devices": devices,
        "threads": threads,
        "runs": runs,
        "duration_s": duration_s,
        "warmup": warmup,
        "budget_s": budget_s,
        "runtime": runtime,
        "artifacts": [{k: a[k] for k in ("name", "format", "sha256", "bytes", "sparsity")} for a in artifacts],
    }
    store.create_run(bench_id, session.fleet, "bench", config)
    refs = []
    for a in artifacts:
        ref = session.publish_blob(Path(a["path"]).read_bytes())
        refs.append(Artifact(a["name"], ref.sha256, ref.bytes))
    args = Bench(refs, runs, duration_s, threads, warmup, budget_s, runtime)
    per_artifact = duration_s * 2 if duration_s else 60.0
    timeout = 300.0 + len(artifacts) * min(budget_s, per_artifact + 120.0)
    results: dict[str, Any] = {}

    def on_progress(dev):
        def show(reply):
            r = reply.result or {}
            what = r.get("artifact") or (f"{r['done']}/{r['total']} timed" if r.get("total") else r.get("phase", ""))
            reporter.say(f"  {dev}: {r.get('phase', '')} {what}".rstrip())

        return show

    def one(dev: str):
        reporter.say(f"{dev}: benchmarking {len(refs)} artifacts")
        reply = session.call(dev, "bench", args, timeout_s=timeout, on_progress=on_progress(dev))
        return dev, reply

    t0 = time.perf_counter()
    if parallel:
        with cf.ThreadPoolExecutor(max_workers=len(devices) or 1) as pool:
            done = list(pool.map(one, devices))
    else:
        done = [one(d) for d in devices]
    for dev, reply in done:
        if not reply.ok:
            results[dev] = {"error": f"{reply.error_code}: {reply.error_message}"}
            reporter.warn(f"{dev}: {reply.error_code}: {reply.error_message}")
            continue
        results[dev] = reply.result
        for r in reply.result["artifacts"]:
            store.save_bench_result(
                bench_id,
                run_id,
                dev,
                {
                    **r,
                    "device": {k: reply.result.get(k) for k in ("board", "threads_requested", "order", "wall_s")},
                    "thermal": reply.result.get("thermal"),
                },
            )
        session.acknowledge(reply)  # stored: the device may drop it from its outbox
    for ref in refs:
        session.clear_blob(ref.sha256)
    summary = {"bench_id": bench_id, "run_id": run_id, "devices": results, "wall_s": round(time.perf_counter() - t0, 3)}
    summary["tensorboard"] = write_tensorboard(store, bench_id, run_id, artifacts, reporter)
    store.finish_run(
        bench_id,
        "done" if all("error" not in r for r in results.values()) else "partial",
        {"run_id": run_id, "devices": sorted(results)},
    )
    return summary


def tensorboard_dir(store: Store, bench_id: str, run_id: str | None) -> Path:
    """A benchmark's TensorBoard run: beside its training run's, or on its own."""
    run = store.run(run_id) if run_id else None
    if run is not None and run["kind"] == "train":
        return store.home / "runs" / run["run_id"] / "tensorboard" / f"bench-{bench_id}"
    return store.home / "runs" / bench_id / "tensorboard"


def write_tensorboard(store: Store, bench_id: str, run_id: str | None, artifacts: list[dict], reporter) -> str | None:
    """The stored results as a TensorBoard run, written by a model worker with no model (this process stays
    free of TensorFlow); returns its directory, or None (said as a warning: the results are stored anyway)."""
    from .model_worker import ModelWorker, ModelWorkerError

    rows = store.bench_results(bench_id=bench_id)
    logdir = tensorboard_dir(store, bench_id, run_id)
    worker = ModelWorker(None)
    try:
        worker.call("tensorboard", logdir=str(logdir), records=tblog.bench_records(rows, artifacts))
    except ModelWorkerError as exc:
        reporter.warn(f"benchmark TensorBoard run not written: {exc}")
        return None
    finally:
        worker.close()
    return str(logdir)
