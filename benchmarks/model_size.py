"""Cost vs model size: what a larger model costs the coordinator, the devices and the link.

Three built-in models, 2 rounds each over the same kind of fleet: digits_cnn (digits, 8x8x1,
1.14 MB fp32), fmnist_cnn (fashion-mnist, 1,663,370 parameters, 6.65 MB) and fmnist_cnn_wide
(fashion-mnist, 6,497,162 parameters, 26.0 MB). Each model gets its own Mosquitto, its own
10 simulated devices that really train (the real agents in one host process, TF-MOT in 2 warm
TensorFlow workers, iid shards) and its own coordinator process (an in-process Session + train(),
run in a child of this script: VmHWM only grows, so a shared process would report the largest
model's peak for every later one). Every round trains all 10 devices: 1 local epoch, batch 32,
80% target sparsity from round 1 (polynomial, ramp 0.5), evaluated on the model's test split.

Data per device: digits in 10 iid shards (~144 samples each); fashion-mnist in 50 iid shards of
which the 10 devices hold the first 10 (1,200 samples each), so a round takes tens of seconds on
2 cores instead of minutes. The devices' host is `python -m edge_agent.simulate`, the process
`edgeprune simulate --processes 1 --trainer tf` starts, called directly for its --total (shard
count; `edgeprune simulate` sets it to --devices). It runs at nice 19 so the coordinator's phases
are timed as on its own CPU (as in round_overhead.py); memory is unaffected.

Measured per model: coordinator and model-worker peak RSS (the train summary); the host's RSS
idle (devices online, before training) and its peak over the run (VmHWM), and per-agent growth =
(peak - idle) / 10; the TF workers' peak; broadcast bytes and chunks per round, blob wants and
re-sent chunks; upload bytes per client; the coordinator's per-round overhead
(round_overhead.breakdown); round wall. Slopes: least squares against dense fp32 MB over the three
models, plus the two-point slope between the fashion-mnist models (same data and input; digits
also differs in input size, data and test set, which moves round wall and evaluation time). Then
the agent's pre-training check (edge_agent.commands.check_training_fits) on each model's size for
a device with 1,000 MB of memory available (psutil's figure patched; the check itself is real).

    python benchmarks/model_size.py [--json] [--models digits_cnn fmnist_cnn fmnist_cnn_wide]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import PeakRss, broker_mod, hwm_bytes, machine
from round_overhead import breakdown

MODELS = {"digits_cnn": "digits", "fmnist_cnn": "fashion-mnist", "fmnist_cnn_wide": "fashion-mnist"}
DEVICES = 10
ROUNDS = 2
SHARDS = {"digits": DEVICES, "fashion-mnist": 50}
FITS_AVAILABLE_BYTES = 1000 * 10**6  # a 2 GB board with a desktop running: fits two models, not the wide one
MB = 1e6


def measure(model: str, a, say) -> dict:
    """One model on a fresh broker, simulator and coordinator (this process)."""
    import psutil

    from coordinator.progress import Reporter
    from coordinator.session import Session
    from coordinator.store import Store
    from coordinator.train import TrainConfig, train

    class Progress(Reporter):
        def __init__(self):
            super().__init__(quiet=True)

        def round_done(self, row):
            say(
                f"  {model} round {row['round']}/{ROUNDS}: {row['clients_ok']}/{row['clients_selected']} clients, "
                f"accuracy {row['accuracy']:.3f}, down {row['bytes_down_per_client'] / MB:.2f} MB, "
                f"{row['wall_s']:.1f} s"
            )

    data = MODELS[model]
    work = Path(tempfile.mkdtemp(prefix=f"edgeprune-size-{model}-"))
    fleet = f"size_{model}"
    b = broker_mod.start("mosquitto", "127.0.0.1", 0, work / "broker", log_file=work / "broker.log")
    # `nice` execs the host, so sim.pid is the process that holds the 10 agents
    sim = subprocess.Popen(
        ["nice", "-n", str(a.nice), sys.executable, "-m", "edge_agent.simulate", "--broker", b.url]
        + ["--fleet", fleet, "--prefix", "dev", "--count", str(DEVICES), "--total", str(SHARDS[data])]
        + ["--trainer", "tf", "--workers", str(a.workers), "--data", data, "--partition", "iid"]
        + ["--state-root", str(work / "sim")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        ready = json.loads(sim.stdout.readline())
        say(f"{model}: {ready['connected']}/{DEVICES} simulated devices connected in {ready['connect_s']:.1f} s")
        store = Store(work / "home")
        s = Session(b.url, fleet, store, long_running=True, keepalive_s=30).start(20)
        try:
            assert s.wait_for(
                lambda rows: sum(r["state"] in ("online", "busy") and r["caps"] is not None for r in rows) >= DEVICES,
                120,
            ), f"only {len(s.online())} devices online"
            time.sleep(2.0)  # presence and caps exchanged: the host as it idles
            idle_rss, idle_hwm = psutil.Process(sim.pid).memory_info().rss, hwm_bytes(sim.pid)
            rss = PeakRss(sim.pid)
            cfg = TrainConfig(
                model=model,
                rounds=ROUNDS,
                sparsity=0.8,
                ramp_fraction=0.5,
                clients_per_round=DEVICES,
                min_clients=DEVICES // 2,
                local_epochs=1,
                batch_size=32,
                eval_data=data,
                seed=0,
                round_timeout_s=900,
            )
            summary = train(cfg, s, store, Progress())
            peaks = rss.stop()
            if summary["state"] != "done":
                raise RuntimeError(f"{model}: run {summary['state']}: {summary.get('error')}")
            rows = store.rounds(summary["run_id"])
            stats, chunk = s.stats, s.chunk_bytes
        finally:
            s.close()
    finally:
        sim.terminate()
        try:
            sim.wait(60)
        except subprocess.TimeoutExpired:
            sim.kill()
        b.stop()
        shutil.rmtree(work, ignore_errors=True)  # the wide model leaves ~330 MB of blobs and round files
    rounds = []
    for r in rows:
        o = breakdown(r)
        rounds.append(
            {
                "round": r["round"],
                "target_sparsity": r["target_sparsity"],
                "sparsity": r["sparsity"],
                "clients_ok": r["clients_ok"],
                "accuracy": r["accuracy"],
                "bytes_down_per_client": r["bytes_down_per_client"],
                "broadcast_chunks": math.ceil(r["bytes_down_per_client"] / chunk),
                "bytes_up_per_client": r["bytes_up_per_client"],
                "wall_s": r["wall_s"],
                "coordinator_s": o["coordinator_s"],
                "overhead": o["overhead"],
                "coordinator_s_excl_evaluate": round(o["coordinator_s"] - o["phases_s"]["evaluate"], 4),
                "phases_s": o["phases_s"],
            }
        )
    peak = peaks["simulator_agents"]
    return {
        "configuration": model,
        "data": data,
        "shards": SHARDS[data],
        "params": summary["num_params"],
        "dense_fp32_bytes": summary["dense_fp32_bytes"],
        "coordinator_peak_rss_bytes": summary["peak_rss_bytes"]["coordinator"],
        "model_worker_peak_rss_bytes": summary["peak_rss_bytes"]["model_worker"],
        "simulator_idle_rss_bytes": idle_rss,
        "simulator_idle_hwm_bytes": idle_hwm,
        "simulator_peak_rss_bytes": peak,
        "per_agent_growth_bytes": round((peak - idle_rss) / DEVICES),  # (peak - idle) / 10, not one agent's own
        "tf_worker_peak_rss_bytes": peaks["worker_max"],
        "tf_workers": peaks["workers"],
        "chunk_bytes": chunk,
        "wants_in": stats.wants_in,
        "resent_chunks": stats.resent_chunks,
        "rounds": rounds,
        "train_wall_s": summary["total_wall_s"],
        "final_accuracy": summary["final_accuracy"],
        "simulator_nice": a.nice,
        "workers": a.workers,
    }


def samples_per_device(data: str) -> list[int]:
    """The 10 devices' shard sizes, from the same partition the devices compute (seed 0)."""
    from edge_agent.ml import data as d

    y = d.digits_split()[0].y if data == "digits" else d.read_fashion_mnist("train")[1]
    return [len(s) for s in d.partition(y, SHARDS[data], d.parse_partition("iid"), seed=0)[:DEVICES]]


def fits_check(model_bytes: int) -> dict:
    """The agent's own check before it fetches a model, against a device with FITS_AVAILABLE_BYTES free
    (psutil's reading patched; disk is this machine's)."""
    import types
    from unittest import mock

    import psutil

    from edge_agent.commands import TF_RUNTIME_BYTES, TRAIN_MEMORY_FACTOR, check_training_fits
    from edge_agent.protocol.errors import ProtocolError

    agent = types.SimpleNamespace(state_dir=tempfile.gettempdir(), trainer=None)  # no worker yet: TF counted
    vm = psutil.virtual_memory()._replace(available=FITS_AVAILABLE_BYTES)
    out = {
        "available_bytes": FITS_AVAILABLE_BYTES,
        "estimate_bytes": model_bytes * TRAIN_MEMORY_FACTOR + TF_RUNTIME_BYTES,  # the check's estimate
    }
    with mock.patch.object(psutil, "virtual_memory", return_value=vm):
        try:
            check_training_fits(agent, model_bytes)
            out |= {"refused": False, "message": None}
        except ProtocolError as exc:
            out |= {"refused": True, "code": exc.code.value, "message": str(exc)}
    return out


def fit(xs: list[float], ys: list[float]) -> dict:
    """Least-squares line y = slope * x + intercept and its r^2."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    intercept = my - slope * mx
    ss = sum((y - my) ** 2 for y in ys)
    res = sum((y - slope * x - intercept) ** 2 for x, y in zip(xs, ys))
    return {
        "slope": round(slope, 6),
        "intercept": round(intercept, 4),
        "r2": round(1 - res / ss, 4) if ss else None,
    }


# slope name -> (unit, cost in that unit for one model row); x is dense fp32 MB (10^6 bytes)
COSTS = {
    "coordinator_rss_mb_per_model_mb": ("MB/MB", lambda r: r["coordinator_peak_rss_bytes"] / MB),
    "model_worker_rss_mb_per_model_mb": ("MB/MB", lambda r: r["model_worker_peak_rss_bytes"] / MB),
    "simulator_peak_rss_mb_per_model_mb": ("MB/MB", lambda r: r["simulator_peak_rss_bytes"] / MB),
    "per_agent_growth_mb_per_model_mb": ("MB/MB", lambda r: r["per_agent_growth_bytes"] / MB),
    "tf_worker_rss_mb_per_model_mb": ("MB/MB", lambda r: r["tf_worker_peak_rss_bytes"] / MB),
    **{
        f"{name}_round{i + 1}": (unit, lambda r, k=key, i=i, f=scale: r["rounds"][i][k] / f)
        for i in range(ROUNDS)
        for name, unit, key, scale in (
            ("broadcast_bytes_per_model_byte", "B/B", "bytes_down_per_client", MB),
            ("upload_bytes_per_model_byte", "B/B", "bytes_up_per_client", MB),
            ("coordinator_overhead_s_per_model_mb", "s/MB", "coordinator_s", 1),
            ("coordinator_overhead_excl_evaluate_s_per_model_mb", "s/MB", "coordinator_s_excl_evaluate", 1),
            ("round_wall_s_per_model_mb", "s/MB", "wall_s", 1),
        )
    },
}


def slopes(rows: list[dict]) -> dict:
    """Each cost's line over all models, and its slope between the two fashion-mnist models alone."""
    xs = [r["dense_fp32_bytes"] / MB for r in rows]
    pair = [r for r in rows if r["data"] == "fashion-mnist"]
    out = {}
    for name, (unit, cost) in COSTS.items():
        out[name] = {"unit": unit, **fit(xs, [cost(r) for r in rows])}
        if len(pair) == 2:
            dx = (pair[1]["dense_fp32_bytes"] - pair[0]["dense_fp32_bytes"]) / MB
            out[name]["fmnist_pair_slope"] = round((cost(pair[1]) - cost(pair[0])) / dx, 6)
    return out


_mb = lambda b: f"{b / MB:,.1f}"  # noqa: E731
_each = lambda key, fmt: lambda r: " / ".join(fmt(x[key]) for x in r["rounds"])  # noqa: E731
ROWS = [  # label, cell, slope name (per-round costs: the name without _roundN); the terminal and README tables
    ("parameters", lambda r: f"{r['params']:,}", None),
    ("dense fp32 MB", lambda r: f"{r['dense_fp32_bytes'] / MB:.2f}", None),
    ("samples per device", lambda r: "-".join(f"{n:,}" for n in sorted(set(r["samples_per_device"]))), None),
    ("coordinator peak RSS MB", lambda r: _mb(r["coordinator_peak_rss_bytes"]), "coordinator_rss_mb_per_model_mb"),
    ("model worker peak RSS MB", lambda r: _mb(r["model_worker_peak_rss_bytes"]), "model_worker_rss_mb_per_model_mb"),
    ("simulator (10 agents) idle RSS MB", lambda r: _mb(r["simulator_idle_rss_bytes"]), None),
    ("simulator peak RSS MB", lambda r: _mb(r["simulator_peak_rss_bytes"]), "simulator_peak_rss_mb_per_model_mb"),
    (
        "per-agent growth MB = (peak - idle) / 10",
        lambda r: _mb(r["per_agent_growth_bytes"]),
        "per_agent_growth_mb_per_model_mb",
    ),
    ("TF training worker peak RSS MB", lambda r: _mb(r["tf_worker_peak_rss_bytes"]), "tf_worker_rss_mb_per_model_mb"),
    ("broadcast MB per device, round 1 / 2", _each("bytes_down_per_client", _mb), "broadcast_bytes_per_model_byte"),
    ("broadcast chunks, round 1 / 2", _each("broadcast_chunks", str), None),
    ("blob wants / re-sent chunks", lambda r: f"{r['wants_in']} / {r['resent_chunks']}", None),
    (
        "upload MB per client, round 1 / 2",
        _each("bytes_up_per_client", lambda b: f"{b / MB:.3f}"),
        "upload_bytes_per_model_byte",
    ),
    (
        "coordinator s per round, round 1 / 2",
        _each("coordinator_s", lambda x: f"{x:.2f}"),
        "coordinator_overhead_s_per_model_mb",
    ),
    (
        "... without evaluation",
        _each("coordinator_s_excl_evaluate", lambda x: f"{x:.2f}"),
        "coordinator_overhead_excl_evaluate_s_per_model_mb",
    ),
    ("... share of the round wall", _each("overhead", lambda x: f"{x:.1%}"), None),
    ("round wall s, round 1 / 2", _each("wall_s", lambda x: f"{x:.1f}"), "round_wall_s_per_model_mb"),
    (
        f"device with {FITS_AVAILABLE_BYTES / MB:,.0f} MB available",
        lambda r: "refused" if r["fits_check"]["refused"] else "accepted",
        None,
    ),
]


def table(rows: list[dict], slope: dict) -> str:
    """Models as columns; the last column is each cost's least-squares slope (r1 / r2 for per-round costs)."""
    lines = ROWS

    def sl(name: str | None) -> str:
        names = [n for n in (name, f"{name}_round1", f"{name}_round2") if n in slope]
        if not names:
            return ""
        return " / ".join(f"{slope[n]['slope']:.3g}" for n in names) + f" {slope[names[0]]['unit']}"

    width = max(len(label) for label, _, _ in lines)
    out = [f"{'':<{width}}  " + "  ".join(f"{r['configuration']:>16}" for r in rows) + "  slope vs model MB"]
    for label, cell, name in lines:
        out.append(f"{label:<{width}}  " + "  ".join(f"{cell(r):>16}" for r in rows) + f"  {sl(name)}")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--workers", type=int, default=2, help="TensorFlow workers serving the simulated devices")
    p.add_argument("--nice", type=int, default=19, help="niceness of the simulated devices and their workers")
    p.add_argument("--json", action="store_true", help="print one JSON object per model, the slopes, the machine")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one model in this process, print its row
    a = p.parse_args()

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if a.one:
        print(json.dumps(measure(a.one, a, say)), flush=True)
        return 0
    t0 = time.monotonic()
    rows = []
    for i, model in enumerate(a.models):
        say(f"[{i + 1}/{len(a.models)}] {model}")
        out = subprocess.run(
            [sys.executable, __file__, "--one", model, "--workers", str(a.workers), "--nice", str(a.nice)],
            stdout=subprocess.PIPE,
            text=True,
            timeout=3600,
        )
        if out.returncode != 0:
            say(f"{model} failed (exit {out.returncode})")
            return 1
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["samples_per_device"] = samples_per_device(row["data"])
        row["fits_check"] = fits_check(row["dense_fp32_bytes"])
        rows.append(row)
        say(f"  done in {(time.monotonic() - t0) / 60:.1f} min so far")
    slope = {
        "configuration": "slope",
        "x": "dense fp32 model MB (10^6 bytes)",
        "models": [r["configuration"] for r in rows],
        **(slopes(rows) if len(rows) >= 2 else {}),
        "total_minutes": round((time.monotonic() - t0) / 60, 1),
    }
    if a.json:
        for r in [*rows, slope, {"configuration": "machine", **machine()}]:
            print(json.dumps(r))
    else:
        print(table(rows, slope))
        print(f"total {slope['total_minutes']} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
