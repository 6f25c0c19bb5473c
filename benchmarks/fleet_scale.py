"""Fleet scale: how the coordinator and the broker grow with the number of devices.

For each N (default 10, 100, 1000): a fresh Mosquitto; `edgeprune simulate --devices N`
(real agent code, synthetic trainer, no TensorFlow; 4 processes); the time until
all N are online in a coordinator's registry; then, for each ``--download-formats``, one
`edgeprune train --rounds 2` in its own process over all N with digits_cnn (283,786 parameters, 1.14 MB dense fp32)
at 50% sparsity: round wall time and its phases, coordinator peak RSS (the round
loop's process; the TensorFlow model worker is reported apart), the aggregator's
memory, and messages and bytes through the broker ($SYS counters) during the run.

    python benchmarks/fleet_scale.py [--devices 10 100 1000] [--json]

Targets (this 2-core machine): 1,000 agents complete a round; coordinator peak RSS
<= 500 MB at 1,000; aggregation memory independent of N; at 1,000, the delta download sends at least
5x fewer broker bytes per round than the exact broadcast.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import BIN, broker_mod, machine

MAX_COORDINATOR_RSS_MB = 500


def measure(n: int, processes: int, delay: float, work: Path, formats: list[str], rounds: int) -> list[dict]:
    from coordinator.session import Session
    from coordinator.store import Store

    b = broker_mod.start(
        "mosquitto", "127.0.0.1", 0, work / f"broker{n}", log_file=work / f"broker{n}.log", sys_interval_s=1
    )
    fleet = f"scale{n}"
    sim = None
    try:
        registry = Session(b.url, fleet, Store(work / f"registry{n}")).start(10)
        t0 = time.perf_counter()
        sim = subprocess.Popen(
            [
                str(BIN / "edgeprune"),
                "simulate",
                "--broker",
                b.url,
                "--fleet",
                fleet,
                "--devices",
                str(n),
                "--processes",
                str(processes),
                "--delay",
                str(delay),
                "--json",
                "--state-dir",
                str(work / f"sim{n}"),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        ready = json.loads(sim.stdout.readline())
        ok = registry.wait_for(
            lambda rows: sum(r["state"] == "online" and r["caps"] is not None for r in rows) >= n, 120 + n * 0.2
        )
        online_s = time.perf_counter() - t0
        registry.close()
        if not ok:
            raise RuntimeError(f"only {sum(r['state'] == 'online' for r in registry.device_table())}/{n} online")
        counters = broker_mod.SysCounters(b.url)
        rows = []
        for fmt in formats:
            rows.append(train_once(n, b.url, fleet, work, fmt, rounds, counters, online_s, ready, delay))
        counters.close()
        return rows
    finally:
        if sim is not None:
            sim.terminate()
            try:
                sim.wait(120)
            except subprocess.TimeoutExpired:
                sim.kill()
        b.stop()


def train_once(n, url, fleet, work, fmt, rounds, counters, online_s, ready, delay) -> dict:
    """One `edgeprune train` over the simulated fleet, with the broker's counters around it."""
    before = counters.snapshot()
    t1 = time.perf_counter()
    out = subprocess.run(
        [
            str(BIN / "edgeprune"),
            "train",
            "--broker",
            url,
            "--fleet",
            fleet,
            "--home",
            str(work / f"coord{n}-{fmt}"),
            "--rounds",
            str(rounds),
            "--sparsity",
            "0.5",
            "--schedule",
            "constant",
            "--eval-data",
            "none",
            "--input-shape",
            "8",
            "8",
            "1",
            "--num-classes",
            "10",
            "--wait-for",
            str(n),
            "--round-timeout",
            "1200",
            "--download-format",
            fmt,
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    train_s = time.perf_counter() - t1
    after = counters.snapshot()
    if out.returncode != 0:
        raise RuntimeError(f"edgeprune train failed ({out.returncode}): {out.stdout[-2000:]} {out.stderr[-2000:]}")
    summary = json.loads(out.stdout)
    row = summary["rounds"][0]
    last = summary["rounds"][-1]
    delta = {k.replace("/", "_"): after.get(k, 0) - before.get(k, 0) for k in broker_mod.SYS_TOPICS}
    rss = summary["peak_rss_bytes"]
    return {
        "configuration": f"N={n} {fmt}",
        "devices": n,
        "download_format": fmt,
        "rounds": rounds,
        "simulator_processes": ready["processes"],
        "synthetic_round_s": delay,
        "online_s": round(online_s, 3),
        "simulator_connect_s": ready["ready_s"],
        "clients_ok": row["clients_ok"],
        "round_complete": row["clients_ok"] == n,
        "round_wall_s": row["wall_s"],
        "round_phases_s": row["timing_s"],
        "train_command_s": round(train_s, 2),
        "model_dense_fp32_bytes": row["dense_fp32_bytes"],
        "model_broadcast_bytes": row["bytes_down_per_client"],
        "download_bytes_per_client_round": summary["bytes_down_total"] / max(1, rounds * n),
        "download_bytes_last_round": last["bytes_down_per_client"],
        "broker_bytes_sent_per_round": delta["bytes_sent"] / rounds,
        "update_bytes_per_client": row["bytes_up_per_client"],
        "coordinator_peak_rss_mb": round(rss["coordinator"] / 2**20, 1),
        "model_worker_peak_rss_mb": round(rss["model_worker"] / 2**20, 1),
        "coordinator_cpu_s": summary["cpu_s"]["coordinator"],
        "aggregator_bytes": row["aggregator_bytes"],
        "broker": delta,
        "target": {"round_complete": True, "max_coordinator_peak_rss_mb": MAX_COORDINATOR_RSS_MB}
        if n >= 1000
        else {"round_complete": True},
        "target_met": (row["clients_ok"] == n and (n < 1000 or rss["coordinator"] / 2**20 <= MAX_COORDINATOR_RSS_MB)),
    }


MIN_BROKER_BYTES_OUT_RATIO = 5.0  # issue 16: at 1,000 devices, broker bytes out per round vs exact broadcast


def downlink_savings(rows: list[dict], formats: list[str]) -> list[dict]:
    """At each N, each format's broker bytes out per round against the exact broadcast, measured in one run."""
    out = []
    for r in rows:
        if r.get("download_format") in (None, "exact"):
            continue
        exact = next(
            (e for e in rows if e.get("devices") == r["devices"] and e.get("download_format") == "exact"), None
        )
        if exact is None:
            continue
        ratio = exact["broker_bytes_sent_per_round"] / max(1.0, r["broker_bytes_sent_per_round"])
        row = {
            "configuration": f"N={r['devices']} {r['download_format']} vs exact",
            "broker_bytes_out_ratio": round(ratio, 2),
            "download_ratio_per_client_round": round(
                exact["download_bytes_per_client_round"] / max(1.0, r["download_bytes_per_client_round"]), 2
            ),
        }
        if r["devices"] >= 1000:
            row["target"] = {"min_broker_bytes_out_ratio": MIN_BROKER_BYTES_OUT_RATIO}
            row["target_met"] = ratio >= MIN_BROKER_BYTES_OUT_RATIO
        out.append(row)
    return out


def growth(rows: list[dict]) -> dict:
    """How each figure grows from the smallest to the largest N (ratio), and per added device."""
    a, z = rows[0], rows[-1]
    dn = z["devices"] - a["devices"]
    out = {"configuration": f"growth N={a['devices']}->{z['devices']}", "devices_ratio": z["devices"] / a["devices"]}
    for key in ("online_s", "round_wall_s", "coordinator_peak_rss_mb", "aggregator_bytes"):
        out[f"{key}_ratio"] = round(z[key] / a[key], 2) if a[key] else None
    out["coordinator_rss_kb_per_device"] = round(
        (z["coordinator_peak_rss_mb"] - a["coordinator_peak_rss_mb"]) * 1024 / dn, 1
    )
    out["round_ms_per_device"] = round((z["round_wall_s"] - a["round_wall_s"]) * 1000 / dn, 2)
    out["broker_bytes_sent_ratio"] = round(z["broker"]["bytes_sent"] / max(1, a["broker"]["bytes_sent"]), 1)
    out["aggregation_memory_independent_of_n"] = len({r["aggregator_bytes"] for r in rows}) == 1
    out["target"] = {"aggregation_memory_independent_of_n": True}
    out["target_met"] = out["aggregation_memory_independent_of_n"]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--processes", type=int, default=4, help="simulator processes (default 4)")
    p.add_argument("--delay", type=float, default=1.0, help="synthetic training time per round, s (default 1)")
    p.add_argument("--rounds", type=int, default=2, help="rounds per train run (the second has a base)")
    p.add_argument(
        "--download-formats",
        default="exact,delta-int8",
        help="one train run per --download-format at each N (default: exact,delta-int8)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object per configuration")
    a = p.parse_args()
    if broker_mod.mosquitto_path() is None:
        print("fleet_scale needs Mosquitto (apt-get install mosquitto)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="edgeprune-scale-"))
    rows: list[dict] = []
    formats = a.download_formats.split(",")
    for n in sorted(a.devices):
        if not a.json:
            print(f"N={n}: starting...", file=sys.stderr, flush=True)
        rows += measure(n, a.processes, a.delay, work, formats, a.rounds)
    first = [r for r in rows if r.get("download_format") == formats[0]]
    if len(first) > 1:
        rows.append(growth(first))
    rows += downlink_savings(rows, formats)
    rows.append({"configuration": "machine", **machine()})
    if a.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    print(
        f"{'N':>6} {'download':>10} {'online':>8} {'round':>8} {'ok':>6} {'coord RSS':>10} {'TF worker':>10} "
        f"{'agg MB':>7} {'msgs in/out':>17} {'MB in/out':>15} {'MB out/round':>12}  target"
    )
    for r in rows:
        if "devices" not in r:
            continue
        br = r["broker"]
        print(
            f"{r['devices']:>6} {r['download_format']:>10} {r['online_s']:>7.2f}s {r['round_wall_s']:>7.2f}s "
            f"{r['clients_ok']:>6} "
            f"{r['coordinator_peak_rss_mb']:>8.1f}MB {r['model_worker_peak_rss_mb']:>8.1f}MB "
            f"{r['aggregator_bytes'] / 2**20:>7.1f} {br['messages_received']:>8}/{br['messages_sent']:<8} "
            f"{br['bytes_received'] / 2**20:>7.1f}/{br['bytes_sent'] / 2**20:<7.1f} "
            f"{r['broker_bytes_sent_per_round'] / 2**20:>12.1f}  "
            f"{'met' if r['target_met'] else 'MISSED'}"
        )
    g = next((r for r in rows if r["configuration"].startswith("growth")), None)
    if g:
        print(
            f"\n{g['configuration']} (x{g['devices_ratio']:.0f} devices): online time x{g['online_s_ratio']}, "
            f"round wall x{g['round_wall_s_ratio']} ({g['round_ms_per_device']} ms per added device), coordinator "
            f"RSS x{g['coordinator_peak_rss_mb_ratio']} ({g['coordinator_rss_kb_per_device']} KB per added device), "
            f"aggregator memory x{g['aggregator_bytes_ratio']}, broker bytes out x{g['broker_bytes_sent_ratio']}"
        )
    for r in rows:
        if "broker_bytes_out_ratio" in r:
            print(
                f"{r['configuration']}: broker bytes out per round {r['broker_bytes_out_ratio']:.1f}x fewer, "
                f"download per client-round {r['download_ratio_per_client_round']:.1f}x smaller"
                + (
                    f" (target >= {MIN_BROKER_BYTES_OUT_RATIO}x: {'met' if r['target_met'] else 'MISSED'})"
                    if "target" in r
                    else ""
                )
            )
    return 0 if all(r.get("target_met", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
