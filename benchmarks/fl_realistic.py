"""Evidence from a realistic workload: Fashion-MNIST over 100 non-IID devices that really train.

100 simulated devices (`edgeprune simulate --trainer tf`: the real agent, its own MQTT
connection, presence, codec, outbox and acks; training served by warm TensorFlow workers
with TF-MOT on each device's own Dirichlet shard), the FL-literature CNN `fmnist_cnn`
(1,663,370 parameters, 6.65 MB fp32), 10 devices sampled per round, 1 local epoch,
batch 32, the same seed for every row, dense FedAvg and 80/90/95% target sparsity, all
in one run, evaluated on the 10,000 test images.

Reported per configuration: accuracy over the last 10 rounds (the target metric: single
rounds swing at Dirichlet 0.1), final and best accuracy, the gap to dense at the same
round, upload and download bytes per client-round and cumulative, the pruning-only upload
ratio (fp32 values + a 1-bit mask, no quantisation, no zstd) beside the full codec's,
round wall time, coordinator and worker peak RSS. One figure: accuracy vs cumulative bytes
(up + down) per configuration, written to benchmarks/results/fl_realistic.png.

    python benchmarks/fl_realistic.py [--json] [--rounds 100] [--alpha 0.1] [--configs 0 0.8 0.9 0.95]

Targets (accuracy_last10, measured in this one run): 80% within 0.5 points of dense, 90%
within 1.0, 95% within 2.5; upload at 90% at least 30x below dense fp32 averaged over the
run; dense within 2 points of 0.885 (Flower's FedAvgM baseline at Dirichlet 0.1 after
1,000 rounds, 5% participation) or an explanation of the difference.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import BIN, ROOT, PeakRss, broker_mod, machine

TARGET_GAP_PTS = {0.8: 0.5, 0.9: 1.0, 0.95: 2.5}
TARGET_UPLOAD_RATIO_90 = 30.0
FLOWER_ANCHOR = 0.885


def pruning_only_bytes(row_sparsity_per_tensor: dict, tensors: list[dict]) -> float:
    """Bytes of an update as fp32 values of the kept weights plus a 1-bit mask per prunable weight."""
    total = 0.0
    for t in tensors:
        n = 1
        for d in t["shape"]:
            n *= d
        if t["pruned"]:
            s = row_sparsity_per_tensor.get(t["name"], 0.0)
            total += n * (1.0 - s) * 4 + n / 8
        else:
            total += n * 4
    return total


def run_config(url: str, fleet: str, sparsity: float, a, work: Path, say, fmt: str = "exact") -> dict:
    from coordinator.progress import Reporter
    from coordinator.session import Session
    from coordinator.store import Store
    from coordinator.train import TrainConfig, train

    class Progress(Reporter):  # one line per round with an ETA, to stderr
        def __init__(self):
            super().__init__(quiet=True)
            self.t0 = time.monotonic()

        def round_done(self, row):
            done = row["round"]
            eta = (time.monotonic() - self.t0) / done * (a.rounds - done)
            acc = row.get("accuracy")
            say(
                f"  sparsity {sparsity:.0%} round {done}/{a.rounds}: accuracy "
                f"{f'{acc * 100:.2f}%' if acc is not None else '(not evaluated)'}, "
                f"{row['clients_ok']}/{row['clients_selected']} "
                f"clients, {row['wall_s']:.1f} s; config ETA {eta / 60:.1f} min"
            )

    store = Store(work / f"home-{sparsity}-{fmt}")
    s = Session(url, fleet, store, long_running=True, keepalive_s=30).start(20)
    try:
        assert s.wait_for(
            lambda rows: sum(r["state"] in ("online", "busy") and r["caps"] is not None for r in rows) >= a.devices, 120
        ), f"only {len(s.online())} devices online"
        cfg = TrainConfig(
            model="fmnist_cnn",
            rounds=a.rounds,
            sparsity=sparsity,
            clients_per_round=a.per_round,
            local_epochs=1,
            batch_size=32,
            lr=a.lr,
            eval_data="fashion-mnist",
            seed=a.seed,
            round_timeout_s=600,
            min_clients=max(1, a.per_round // 2),
            schedule=a.schedule,
            ramp_fraction=a.ramp,
            eval_every=a.eval_every,
            download_format=fmt,
        )
        t0 = time.monotonic()
        summary = train(cfg, s, store, Progress())
        wall = time.monotonic() - t0
        rows = store.rounds(summary["run_id"])
        tensors = store.run(summary["run_id"])["config"]["tensors"]
        how: dict[str, int] = {}  # how each client-round's model came down (cached, small, delta, chain, exact)
        for c in store.client_rounds(summary["run_id"]):
            kind = (c["metrics"] or {}).get("download", "failed")
            how[kind] = how.get(kind, 0) + 1
    finally:
        s.close()
    acc = [r["accuracy"] for r in rows]  # None where the round was not evaluated (--eval-every)
    seen = [x for x in acc if x is not None]
    ups = [r["bytes_up_per_client"] for r in rows if r.get("bytes_up_per_client")]
    prune_only = [pruning_only_bytes(r["sparsity_per_tensor"], tensors) for r in rows if r.get("bytes_up_per_client")]
    cum, total = [], 0
    for r in rows:
        total += r["bytes_up_total"] + r["bytes_down_total"]
        cum.append(total)
    dense = rows[0]["dense_fp32_bytes"]
    return {
        "configuration": ("dense FedAvg" if sparsity == 0 else f"{sparsity:.0%} sparsity")
        + ("" if fmt == "exact" else f", {fmt} download"),
        "sparsity_target": sparsity,
        "download_format": fmt,
        "run_id": summary["run_id"],
        "state": summary["state"],
        "rounds": len(rows),
        "accuracy_last10": sum(acc[-10:]) / len(acc[-10:]),
        "final_accuracy": acc[-1],
        "best_accuracy": max(seen),
        "final_sparsity": rows[-1]["sparsity"],
        "accuracy_per_round": acc,
        "upload_bytes_per_client_round": sum(ups) / len(ups),
        "download_bytes_per_client_round": sum(r["bytes_down_per_client"] for r in rows) / len(rows),
        "download_bytes_steady": sum(r["bytes_down_per_client"] for r in rows[1:]) / max(1, len(rows) - 1),
        "down_ratio_vs_dense_fp32": rows[0]["dense_fp32_bytes"]
        / (sum(r["bytes_down_per_client"] for r in rows) / len(rows)),
        "upload_total": sum(r["bytes_up_total"] for r in rows),
        "download_total": sum(r["bytes_down_total"] for r in rows),
        "downloads_by_kind": how,
        "cumulative_bytes": cum,
        "dense_fp32_bytes": dense,
        "upload_ratio_vs_dense_fp32": dense / (sum(ups) / len(ups)),
        "pruning_only_upload_ratio": dense / (sum(prune_only) / len(prune_only)),
        "round_wall_s": sum(r["wall_s"] for r in rows) / len(rows),
        "train_wall_s": round(wall, 1),
        "coordinator_peak_rss_mb": round(summary["peak_rss_bytes"]["coordinator"] / 2**20, 1),
        "model_worker_peak_rss_mb": round(summary["peak_rss_bytes"]["model_worker"] / 2**20, 1),
    }


def figure(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for r in rows:
        pts = [(b, x) for b, x in zip(r["cumulative_bytes"], r["accuracy_per_round"]) if x is not None]
        ax.plot(
            [b / 1e9 for b, _ in pts],
            [x * 100 for _, x in pts],
            label=f"{r['configuration']} (last-10 {r['accuracy_last10'] * 100:.1f}%)",
            linewidth=1.4,
        )
    ax.set_xlabel("cumulative bytes, upload + download (GB)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Fashion-MNIST, 100 devices, Dirichlet 0.1, 10 per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--devices", type=int, default=100)
    p.add_argument("--per-round", type=int, default=10)
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--configs", type=float, nargs="+", default=[0.0, 0.8, 0.9, 0.95])
    p.add_argument("--workers", type=int, default=2, help="TensorFlow workers serving the simulated devices")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--schedule", default="polynomial")
    p.add_argument("--ramp", type=float, default=0.5, help="fraction of rounds to reach the target sparsity")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=5, help="evaluate every K rounds (and each of the last 10)")
    p.add_argument(
        "--download-formats",
        default="exact",
        help="comma-separated --download-format runs of each pruned configuration (dense: exact only)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object per configuration")
    p.add_argument("--figure", default=str(ROOT / "benchmarks" / "results" / "fl_realistic.png"))
    a = p.parse_args()

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    work = Path(tempfile.mkdtemp(prefix="edgeprune-realistic-"))
    b = broker_mod.start("mosquitto", "127.0.0.1", 0, work / "broker", log_file=work / "broker.log")
    fleet = "fmnist"
    sim = subprocess.Popen(
        [
            str(BIN / "edgeprune"),
            "simulate",
            "--broker",
            b.url,
            "--fleet",
            fleet,
            "--devices",
            str(a.devices),
            "--trainer",
            "tf",
            "--workers",
            str(a.workers),
            "--data",
            "fashion-mnist",
            "--partition",
            f"dirichlet:{a.alpha}",
            "--data-seed",
            str(a.seed),
            "--heartbeat-s",
            "10",
            "--json",
            "--state-dir",
            str(work / "sim"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    t_start = time.monotonic()
    rows = []
    try:
        ready = json.loads(sim.stdout.readline())
        say(f"{ready['connected']}/{a.devices} simulated devices connected in {ready['ready_s']:.1f} s")
        rss = PeakRss(ready["pids"][0])  # the agents' host (--trainer tf: one), not the launcher
        plan = [(sp, f) for sp in a.configs for f in (["exact"] if sp == 0 else a.download_formats.split(","))]
        for i, (sparsity, fmt) in enumerate(plan):
            say(f"[{i + 1}/{len(plan)}] {'dense FedAvg' if sparsity == 0 else f'{sparsity:.0%} sparsity'}, {fmt}")
            rows.append(run_config(b.url, fleet, sparsity, a, work, say, fmt))
            left = (time.monotonic() - t_start) / (i + 1) * (len(plan) - i - 1)
            say(f"  done: last-10 accuracy {rows[-1]['accuracy_last10'] * 100:.2f}%; benchmark ETA {left / 60:.1f} min")
        peaks = rss.stop()
    finally:
        sim.terminate()
        try:
            sim.wait(120)
        except subprocess.TimeoutExpired:
            sim.kill()
        b.stop()
    dense = next((r for r in rows if r["sparsity_target"] == 0), None)
    for r in rows:
        exact = next(
            (e for e in rows if e["sparsity_target"] == r["sparsity_target"] and e["download_format"] == "exact"), None
        )
        if r["download_format"] != "exact" and exact is not None:  # issue 16's comparison, same run
            r["gap_to_exact_download_last10_pts"] = round((exact["accuracy_last10"] - r["accuracy_last10"]) * 100, 2)
            r["gap_to_exact_download_final_pts"] = round((exact["final_accuracy"] - r["final_accuracy"]) * 100, 2)
        r["simulator_peak_rss_mb"] = round(peaks["simulator_agents"] / 2**20, 1)
        r["worker_peak_rss_mb"] = round(peaks["worker_max"] / 2**20, 1)
        r["tf_workers"] = peaks["workers"]
        if dense is not None and r is not dense:
            r["gap_to_dense_last10_pts"] = round((dense["accuracy_last10"] - r["accuracy_last10"]) * 100, 2)
            r["gap_to_dense_final_pts"] = round((dense["final_accuracy"] - r["final_accuracy"]) * 100, 2)
            target = {"max_gap_pts": TARGET_GAP_PTS.get(r["sparsity_target"])}
            met = target["max_gap_pts"] is None or r["gap_to_dense_last10_pts"] <= target["max_gap_pts"]
            if r["sparsity_target"] == 0.9:
                target["min_upload_ratio_vs_dense_fp32"] = TARGET_UPLOAD_RATIO_90
                met = met and r["upload_ratio_vs_dense_fp32"] >= TARGET_UPLOAD_RATIO_90
            r["target"], r["target_met"] = target, met
        elif r is dense:
            r["target"] = {"within_pts_of_flower_anchor": 2.0, "anchor": FLOWER_ANCHOR}
            r["target_met"] = abs(r["accuracy_last10"] - FLOWER_ANCHOR) * 100 <= 2.0
    Path(a.figure).parent.mkdir(parents=True, exist_ok=True)
    figure(rows, Path(a.figure))
    total_min = (time.monotonic() - t_start) / 60
    rows.append(
        {
            "configuration": "run",
            "total_minutes": round(total_min, 1),
            "devices": a.devices,
            "per_round": a.per_round,
            "rounds": a.rounds,
            "alpha": a.alpha,
            "workers": a.workers,
            "figure": str(Path(a.figure).relative_to(ROOT)) if Path(a.figure).is_relative_to(ROOT) else a.figure,
            "target": {"max_total_minutes": 60},
            "target_met": total_min <= 60,
        }
    )
    rows.append({"configuration": "machine", **machine()})
    if a.json:
        for r in rows:
            print(json.dumps({k: v for k, v in r.items()}))
    else:
        print(
            f"{'configuration':<14} {'last10':>7} {'final':>7} {'best':>7} {'gap':>6} {'up/client':>10} "
            f"{'up ratio':>8} {'pruning-only':>12} {'down/client':>11} {'round':>6}  target"
        )
        for r in rows:
            if "accuracy_last10" not in r:
                continue
            print(
                f"{r['configuration']:<14} {r['accuracy_last10'] * 100:>6.2f}% {r['final_accuracy'] * 100:>6.2f}% "
                f"{r['best_accuracy'] * 100:>6.2f}% {r.get('gap_to_dense_last10_pts', 0):>6.2f} "
                f"{r['upload_bytes_per_client_round'] / 1e3:>8.1f}KB {r['upload_ratio_vs_dense_fp32']:>7.1f}x "
                f"{r['pruning_only_upload_ratio']:>11.1f}x {r['download_bytes_per_client_round'] / 1e6:>9.2f}MB "
                f"{r['round_wall_s']:>5.1f}s  {'met' if r.get('target_met') else 'MISSED'}"
            )
        print(f"total {total_min:.1f} min; figure {a.figure}")
    return 0 if all(r.get("target_met", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
