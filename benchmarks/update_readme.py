"""Regenerate the README's Performance section from the benchmark results in benchmarks/results/.

    python benchmarks/fl_pruning.py --json > benchmarks/results/fl_pruning.json
    python benchmarks/export_bench.py --json > benchmarks/results/export_bench.json
    python benchmarks/fleet_scale.py --json > benchmarks/results/fleet_scale.json
    python benchmarks/round_overhead.py --json > benchmarks/results/round_overhead.json
    python benchmarks/agent_footprint.py --json > benchmarks/results/agent_footprint.json
    python benchmarks/structured_pruning.py --json > benchmarks/results/structured_pruning.json
    python benchmarks/fl_realistic.py --json > benchmarks/results/fl_realistic.json   (about an hour)
    python benchmarks/fl_realistic.py --configs 0.8 --rounds 30 --download-formats exact,delta-int8,delta-int4 \
        --figure benchmarks/results/fl_realistic_downlink.png --json > benchmarks/results/fl_realistic_downlink.json
    python benchmarks/brokers.py --json > benchmarks/results/brokers.json
    python benchmarks/model_size.py --json > benchmarks/results/model_size.json   (about 10 minutes)
    python benchmarks/fmnist_export.py --json > benchmarks/results/fmnist_export.json   (about 20 minutes)
    python benchmarks/update_readme.py

Only measured figures appear; a missing results file leaves its table out.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BEGIN, END = "<!-- performance:begin -->", "<!-- performance:end -->"


def _load(name: str):
    """A results file: one JSON array, or one JSON object per line (what --json prints)."""
    path = RESULTS / f"{name}.json"
    if not path.exists():
        return None
    text = path.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]


def _met(r) -> str:
    return {True: "met", False: "**missed**"}.get(r.get("target_met"), "-")


def scale_section(rows) -> list[str]:
    runs = [r for r in rows if "devices" in r]
    g = next((r for r in rows if r["configuration"].startswith("growth")), None)
    rounds = runs[0].get("rounds", 1)
    out = [
        f"**Fleet scale** (`python benchmarks/fleet_scale.py`): `edgeprune simulate` agents (the real agent code "
        f"with a synthetic trainer, {runs[0]['simulator_processes']} processes on this same machine) against "
        f"Mosquitto; at each size one `edgeprune train --rounds {rounds}` per download format over all of them "
        f"with digits_cnn ({runs[0]['model_dense_fp32_bytes'] / 1e6:.2f} MB dense fp32) at 50% sparsity. Round "
        "figures are round 1; broker figures are Mosquitto's `$SYS` counters over the train command (MB out per "
        "round: divided by the rounds).",
        "",
        "| devices | download | all online | round wall | of which decode+check | coordinator peak RSS | TF model "
        "worker (apart) | coordinator CPU | aggregator memory | broker msgs in/out | broker MB in/out | MB out per "
        "round | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        b = r["broker"]
        per_round = r.get("broker_bytes_sent_per_round", b["bytes_sent"])
        out.append(
            f"| {r['devices']:,} | {r.get('download_format', 'exact')} | {r['online_s']:.1f} s | {r['round_wall_s']:.1f} s "
            f"({r['clients_ok']:,} updates) | {r['round_phases_s']['decode']:.1f} s | "
            f"{r['coordinator_peak_rss_mb']:.0f} MB | {r['model_worker_peak_rss_mb']:.0f} MB | "
            f"{r['coordinator_cpu_s']:.0f} s | {r['aggregator_bytes'] / 2**20:.1f} MiB | "
            f"{b['messages_received']:,} / {b['messages_sent']:,} | {b['bytes_received'] / 1e6:,.0f} / "
            f"{b['bytes_sent'] / 1e6:,.0f} | {per_round / 1e6:,.0f} | {_met(r)} |"
        )
    for r in rows:
        if "broker_bytes_out_ratio" in r:
            out += [
                "",
                f"{r['configuration']}: **{r['broker_bytes_out_ratio']:.1f}x** fewer broker bytes out per round, "
                f"download per client-round {r['download_ratio_per_client_round']:.1f}x smaller"
                + (f" (target >= {r['target']['min_broker_bytes_out_ratio']}x: {_met(r)})." if "target" in r else "."),
            ]
    if g:
        out += [
            "",
            f"From {runs[0]['devices']} to {runs[-1]['devices']:,} devices (x{g['devices_ratio']:.0f}): "
            f"coordinator RSS x{g['coordinator_peak_rss_mb_ratio']} ({g['coordinator_rss_kb_per_device']} KB "
            f"per added device), aggregator memory x{g['aggregator_bytes_ratio']} (streaming), broker bytes out "
            f"x{g['broker_bytes_sent_ratio']} (the model goes to every device), round wall "
            f"x{g['round_wall_s_ratio']}: the simulated devices share the machine's 2 cores, so the 1,000-device "
            "round waits mostly for 1,000 Python clients to download 1 MB each (see docs/scaling.md).",
        ]
    return out


def overhead_section(rows) -> list[str]:
    r = next(x for x in rows if x["configuration"].endswith(tuple("0123456789")) and "clients" in x)
    ph = r["phases_s_per_round"]
    parts = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in ph.items() if k not in ("wait", "transfer"))
    return [
        f"**Round overhead** (`python benchmarks/round_overhead.py`): {r['clients']} local agents training "
        f"digits_cnn with TF-MOT (nice {r['agents_nice']}, so the coordinator is timed as on its own CPU), "
        f"{r['configuration'].split(', ')[1]}: the coordinator's own time is **{r['overhead']:.1%}** of the "
        f"{r['round_wall_s']:.1f} s round (target <= 5%: {_met(r)}; the round-loop thread's CPU time in those "
        f"phases {r['cpu_overhead']:.1%}, not counting the model worker's evaluation or the MQTT thread); "
        f"per round {parts}; clients and network {ph['wait'] + ph['transfer']:.2f} s."
    ]


def structured_section(rows) -> list[str]:
    runs = [r for r in rows if "model" in r]
    out = [
        "**Structured pruning** (`python benchmarks/structured_pruning.py`): digits_cnn trained federated by 4 "
        "local agents (fp32 updates: plain for the structured runs, values + masks + zstd for the unstructured one) "
        "with 0-75% of each shrinkable layer's units removed in steps at rounds 2, 4 and 6 of 8 (so the run "
        "average includes the rounds before the model reached its size), and an unstructured run with as many "
        "non-zero weights as the 50% model; "
        "mobilenet_tiny with untrained weights (filters removed by L1 norm) for size and latency only. Dense fp32 "
        "TFLite of every final model, p50 on a local agent (LiteRT, 1 thread, interleaved).",
        "",
        "| model | pruning | variant | params (non-zero) | MFLOPs | TFLite bytes | p50 ms | speedup | accuracy | "
        "gap | upload vs dense: last round / run average | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        what = (
            f"{r['units_removed']:.0%} of units"
            if r["units_removed"] is not None
            else f"unstructured {r['sparsity']:.1%}"
        )
        acc = f"{r['accuracy'] * 100:.2f}%" if r.get("accuracy") is not None else "-"
        gap = f"{r['accuracy_gap_pts']:.2f} pts" if r.get("accuracy_gap_pts") is not None else "-"
        up = (
            f"{r['upload_ratio_vs_dense']:.2f}x / {r['upload_ratio_vs_dense_avg']:.2f}x"
            if r.get("upload_ratio_vs_dense_avg")
            else "-"
        )
        out.append(
            f"| {r['model']} | {what} | {r['variant']} | {r['params']:,} ({r['nonzero_params']:,}) | "
            f"{(r['flops'] or 0) / 1e6:.2f} | {r['tflite_bytes']:,} | {r['p50_ms']:.3f} | "
            f"{r['speedup_vs_dense']:.2f}x | {acc} | {gap} | {up} | {_met(r) if 'target' in r else ''} |"
        )
    return out


def footprint_section(rows) -> list[str]:
    by = {r["configuration"]: r for r in rows}
    s, i, k, t = (by["start_to_online"], by["idle_plain"], by["idle_with_signing_keys"], by["after_training_round"])
    return [
        f"**Agent footprint** (`python benchmarks/agent_footprint.py`): start to online median "
        f"**{s['median_s']:.2f} s** (max {s['max_s']:.2f} s, {s['starts']} starts; target <= 1 s: {_met(s)}); "
        f"idle RSS **{i['rss_mb']:.1f} MB** (no TensorFlow mapped), {k['rss_mb']:.1f} MB with the secure fleet's "
        f"signing keys (target <= 40 MB: {_met(i)} / {_met(k)}); after a training round "
        f"{t['after_mb']:.1f} MB ({t['delta_mb']:+.1f} MB vs idle, worker gone; its peak was "
        f"{t['worker_peak_rss_mb']:.0f} MB; {_met(t)}). For scale: an idle Flower 1.42 SuperNode with its "
        "launcher measured ~280 MiB on this machine."
    ]


def fl_section(rows) -> list[str]:
    plain = next(r for r in rows if r.get("configuration") == "plain_single_process_loop")
    over_seeds = [r for r in rows if r.get("configuration") == "download_over_seeds"]
    runs = [r for r in rows if "sparsity" in r and "configuration" not in r]
    first = runs[0]
    seed = first.get("seed", 0)  # the dense run's: the table shows that seed, the second one all of them
    runs = [r for r in runs if r.get("seed", seed) == seed]
    out = [
        f"**Federated pruning on digits** (`python benchmarks/fl_pruning.py`): {first['clients']} agents as local "
        f"processes, Dirichlet alpha 0.5 shards, {first['rounds']} rounds x 2 local epochs, seed {seed} for every "
        "row, all measured in one run. Upload and download bytes are averaged over every client-round of the run "
        "(ramp-up rounds and round 1's seeded download, about 1 KB, included); 'last round' is the steady-state last round's "
        "upload, the download in brackets the mean after round 1. Each pruned sparsity runs with every "
        "`--download-format`; 'vs exact download' is the accuracy gap to the exact broadcast at that sparsity "
        "and seed (the download targets are judged over seeds, in the table after this one).",
        "",
        "| sparsity | download | final accuracy | gap to dense | vs exact download | upload B/client-round | "
        "vs dense fp32 | last round | download B/client-round (steady) | vs dense fp32 | round wall | vs dense "
        "round (after round 1) | total wall | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        target = r.get("target") or {}
        met = {True: "met", False: "**missed**", None: "-"}[r.get("target_met")]
        gap_exact = r.get("accuracy_gap_vs_exact_pts")
        down = r.get("download_bytes_per_client_round")
        out.append(
            f"| {r['sparsity']:.0%} | {r.get('download_format', 'exact')} | {r['final_accuracy'] * 100:.2f}% | "
            f"{r['accuracy_gap_pts']:.2f} pts | {'' if gap_exact is None else f'{gap_exact:.2f} pts'} | "
            f"{r['upload_bytes_per_client_round']:,.0f} | {r['ratio_vs_dense_fp32']:.1f}x | "
            f"{r['dense_fp32_bytes'] / r['upload_bytes_last_round']:.1f}x | "
            + (
                f"{down:,.0f} ({r['download_bytes_steady']:,.0f}) | {r['down_ratio_vs_dense_fp32']:.1f}x | "
                if down is not None and "download_bytes_steady" in r
                else "| | "
            )
            + f"{r['round_wall_s']:.2f} s | "
            + (
                f"{r['round_wall_ratio_vs_dense']:.2f}x ({r['round_wall_ratio_vs_dense_after_round_1']:.2f}x) | "
                if "round_wall_ratio_vs_dense" in r
                else "| "
            )
            + f"{r['total_wall_s']:.1f} s | {met} {json.dumps(target) if target else ''} |"
        )
    spread = (
        f" (mean of {plain['total_wall_s_before']:.1f} s before and {plain['total_wall_s_after']:.1f} s after "
        "the federated runs)"
        if "total_wall_s_before" in plain
        else ""
    )
    out.append(
        f"| plain loop | | {plain['final_accuracy'] * 100:.2f}% | | | | | | | | | | {plain['total_wall_s']:.1f} s{spread} | |"
    )
    dense = next((r for r in runs if r["sparsity"] == 0.0), None)
    if dense:
        out += [
            "",
            f"Dense edgeprune run vs the same FedAvg in one plain process (both timed from process start, "
            f"TensorFlow import included): **{dense['wall_ratio_vs_plain_loop']:.2f}x** (target <= 1.5x).",
        ]
    if over_seeds:
        out += [
            "",
            "The download formats over training seeds "
            f"{', '.join(str(x) for x in over_seeds[0]['seeds'])} (same run, same shards; each seed's gap is to "
            "the exact broadcast with that seed; one test image is 0.28 points):",
            "",
            "| sparsity | download | gap to exact, mean (positive: below exact) | per seed | download vs dense fp32 (mean) | target |",
            "|---|---|---|---|---|---|",
        ]
        for o in over_seeds:
            out.append(
                f"| {o['sparsity']:.0%} | {o['download_format']} | {o['mean_accuracy_gap_vs_exact_pts']:+.2f} pts | "
                f"{', '.join(f'{g:+.2f}' for g in o['accuracy_gaps_vs_exact_pts'])} | "
                f"{o['down_ratio_vs_dense_fp32']:.1f}x | {_met(o)} {json.dumps(o['target'])} |"
            )
    return out


def export_section(rows) -> list[str]:
    out = [
        "**Export and on-device latency** (`python benchmarks/export_bench.py`): digits_cnn trained centrally "
        "with TF-MOT, every TFLite variant, accuracy of each artifact on the held-out split (LiteRT), latency on "
        "a local agent (LiteRT, 1 thread, interleaved); mobilenet_tiny with untrained weights pruned by the "
        "xnnpack policy, for latency only.",
        "",
        "| model | sparsity | granularity | variant | bytes | vs dense fp32 | read-back sparsity | accuracy | "
        "p50 ms | vs dense p50 | harness / independent loop |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        acc = f"{r['accuracy'] * 100:.1f}%" if r.get("accuracy") is not None and r["model"] == "digits_cnn" else "-"
        flag = " (no-delegate fallback)" if r.get("delegate_fallback") else ""
        out.append(
            f"| {r['model']} | {r['sparsity']:.0%} | {r['granularity']} | {r['variant']} | {r['bytes']:,} | "
            f"{r['size_ratio_vs_dense_fp32']:.1f}x | {r['readback_sparsity']:.2%} | {acc} | "
            f"{r['p50_ms']:.3f}{flag} | {r['p50_ratio_vs_dense_same_model']:.2f}x | "
            f"{r['harness_vs_independent']:.3f} |"
        )
    return out


def brokers_section(rows) -> list[str]:
    runs = [r for r in rows if r.get("broker")]
    out = [
        "**Brokers** (`python benchmarks/brokers.py`): the same job on every broker edgeprune supports, from "
        "`./scripts/cluster` on loopback ports: 12 simulated devices spread over the nodes, the coordinator on "
        "node A, digits_cnn at 50% sparsity, 3 rounds (round wall: mean of rounds 2-3); on the clusters a second "
        "run kills node A (the coordinator's and a third of the devices' node) 1 s into round 1. Wants / re-sent: "
        "`blob_want` requests for broadcast chunks that did not arrive, and the chunks re-sent in answer.",
        "",
        "| broker | round wall | coordinator msgs in/out per round | wants / re-sent chunks | coordinator "
        "failover | rounds (devices each) | counted once | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        if "error" in r or "skipped" in r:
            out.append(f"| {r['configuration']} | {r.get('error') or r.get('skipped')} | | | | | | {_met(r)} |")
            continue
        fo = f"{r['coordinator_failover_s']:.2f} s" if r.get("coordinator_failover_s") is not None else "-"
        out.append(
            f"| {r['configuration']} | {r['round_wall_s']:.2f} s | {r['messages_in_per_round']} / "
            f"{r['messages_out_per_round']} | {r['blob_wants']} / {r['resent_chunks']} | {fo} | "
            f"{r['rounds_done']} ({', '.join(str(c) for c in r['clients_ok'])}) | "
            f"{'yes' if r['counted_once'] else '**no**'} | {_met(r)} |"
        )
    return out


def _realistic_runs(rows) -> tuple[list[dict], dict]:
    """fl_realistic's rows: each configuration's, and the run's own (devices, rounds, minutes, figure)."""
    return [r for r in rows if "accuracy_last10" in r], next((r for r in rows if r.get("configuration") == "run"), {})


def realistic_section(rows) -> list[str]:
    runs, meta = _realistic_runs(rows)
    out = [
        f"**Realistic workload** (`python benchmarks/fl_realistic.py`, {meta.get('total_minutes', '?')} min): "
        f"Fashion-MNIST, {meta.get('devices')} simulated devices that really train (TF-MOT, {meta.get('workers')} "
        f"warm TensorFlow workers on this machine's 2 cores), Dirichlet alpha {meta.get('alpha')}, "
        f"{meta.get('per_round')} devices per round, 1 local epoch, batch 32, {meta.get('rounds')} rounds, "
        "fmnist_cnn (1,663,370 parameters), the same seed for every row, all in one run. Accuracy on the 10,000 "
        "test images; last-10 = mean of the last 10 rounds (the target metric: single rounds swing at this skew). "
        "Pruning-only ratio: fp32 values + a 1-bit mask, no quantisation, no zstd.",
        "",
        "| configuration | last-10 accuracy | final | best | gap to dense (last-10) | upload/client-round | "
        "vs dense fp32 | pruning-only | download/client-round | round wall | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        out.append(
            f"| {r['configuration']} | {r['accuracy_last10'] * 100:.2f}% | {r['final_accuracy'] * 100:.2f}% | "
            f"{r['best_accuracy'] * 100:.2f}% | {r.get('gap_to_dense_last10_pts', 0.0):.2f} pts | "
            f"{r['upload_bytes_per_client_round']:,.0f} B | {r['upload_ratio_vs_dense_fp32']:.1f}x | "
            f"{r['pruning_only_upload_ratio']:.1f}x | {r['download_bytes_per_client_round']:,.0f} B | "
            f"{r['round_wall_s']:.1f} s | {_met(r)} {json.dumps(r.get('target', {}))} |"
        )
    if meta.get("figure"):
        out += ["", f"![accuracy vs cumulative bytes]({meta['figure']})"]
    return out


def realistic_downlink_section(rows) -> list[str]:
    runs, meta = _realistic_runs(rows)
    out = [
        f"**Download formats on the realistic workload** (`python benchmarks/fl_realistic.py --configs 0.8 "
        f"--rounds {meta.get('rounds')} --download-formats {','.join(r.get('download_format', 'exact') for r in runs)}`, "
        f"{meta.get('total_minutes', '?')} min): the same fleet and model as above, 80% target sparsity, "
        f"{meta.get('rounds')} rounds, one run; each row differs only in `--download-format`. Download bytes are what "
        "each selected device fetched, averaged over every client-round (round 1's seeded download included) and "
        "after round 1. With 10 of 100 devices per round few selected devices hold last round's model: in a delta "
        "format each catches up by the chain of deltas since the model it holds (or since the seeded first one) "
        "when that costs less than the exact model, and fetches the exact model otherwise; 'how the model came' "
        "counts the client-rounds of each kind.",
        "",
        "| download | last-10 accuracy | final | gap to exact (last-10) | download/client-round | after round 1 | "
        "vs dense fp32 | how the model came |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        kinds = r.get("downloads_by_kind") or {}
        out.append(
            f"| {r.get('download_format', 'exact')} | {r['accuracy_last10'] * 100:.2f}% | "
            f"{r['final_accuracy'] * 100:.2f}% | {r.get('gap_to_exact_download_last10_pts', 0.0):.2f} pts | "
            f"{r['download_bytes_per_client_round']:,.0f} B | {r['download_bytes_steady']:,.0f} B | "
            f"{r['down_ratio_vs_dense_fp32']:.1f}x | "
            f"{', '.join(f'{k} {n}' for k, n in sorted(kinds.items(), key=lambda kv: -kv[1])) or 'not recorded'} |"
        )
    return out


def fmnist_export_section(rows) -> list[str]:
    arts = [r for r in rows if "variant" in r]
    meta = next((r for r in rows if r.get("configuration") == "run"), {})
    pi = any("emulated_pi" in r for r in arts)
    out = [
        f"**fmnist_cnn on the device** (`python benchmarks/fmnist_export.py`, {meta.get('total_minutes', '?')} min): "
        f"trained centrally on the 60,000 Fashion-MNIST images ({meta.get('epochs')} epochs; the 50%-structured "
        "model is the dense one with half the units of conv1, conv2 and fc1 removed by weight L1 norm, then one "
        "epoch of recovery), exported, every `.tflite` evaluated with LiteRT on the 10,000 test images, then "
        f"benchmarked on a local agent ({meta.get('runs')} runs, 1 thread, interleaved)"
        + (
            f" and on the emulated Pi ({meta.get('pi_runs')} runs; arm64 under qemu-user: **emulated**, its "
            "milliseconds are qemu's, only the ratios within its column mean anything)."
            if pi
            else f". Emulated Pi: {meta.get('emulated_pi', 'not run')}."
        ),
        "",
        "| model | variant | bytes | vs dense fp32 | weight sparsity (read back) | accuracy | p50 | p99 | "
        "p50 vs dense model | peak RSS |" + (" emulated Pi p50 | vs dense model (emulated) |" if pi else ""),
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if pi else ""),
    ]
    for r in arts:
        loc, emu = r["local"], r.get("emulated_pi") or {}
        line = (
            f"| {r['configuration']} | {r['variant']} | {r['bytes']:,} | {r['size_ratio_vs_dense_fp32']:.1f}x | "
            f"{r['readback_sparsity'] * 100:.1f}% | {r['tflite_accuracy'] * 100:.2f}% | "
        )
        if "p50_ms" in loc:
            fallback = " (no-delegate fallback)" if loc.get("delegate_fallback") else ""
            line += (
                f"{loc['p50_ms']:.3f} ms{fallback} | {loc['p99_ms']:.3f} ms | {loc['p50_vs_dense_model']:.2f}x | "
                f"{loc['peak_rss_mb']:.1f} MB |"
            )
        else:
            line += f"{loc.get('status')}: {loc.get('error')} | | | |"
        if pi:
            line += (
                f" {emu['p50_ms']:.2f} ms{' (no-delegate fallback)' if emu.get('delegate_fallback') else ''} | "
                f"{emu['p50_vs_dense_model']:.2f}x |"
                if "p50_ms" in emu
                else f" {emu.get('status')} | |"
            )
        out.append(line)
    out += [
        "",
        "No-delegate fallback: XNNPACK could not prepare that graph (unstructured sparse int8 on x86), so "
        "LiteRT ran it on its builtin kernels. Accuracy is each artifact's own, read back from its bytes; "
        "the int8 variants are calibrated on 1,000 training images (post-training quantisation).",
    ]
    return out


def model_size_section(rows) -> list[str]:
    runs = [r for r in rows if "dense_fp32_bytes" in r]
    sl = next((r for r in rows if r.get("configuration") == "slope"), {})

    def slope(name: str) -> str:
        names = [n for n in (name, f"{name}_round1", f"{name}_round2") if n in sl]
        if not names:
            return ""
        fits = " / ".join(f"{sl[n]['slope']:.3g}" for n in names)
        pair = " / ".join(f"{sl[n]['fmnist_pair_slope']:.3g}" for n in names if "fmnist_pair_slope" in sl[n])
        return f"{fits} {sl[names[0]]['unit']}" + (f" ({pair})" if pair else "")

    from model_size import ROWS  # the benchmark's own rows: the README shows what it printed

    out = [
        f"**Cost vs model size** (`python benchmarks/model_size.py`, {sl.get('total_minutes', '?')} min): per model "
        f"a fresh Mosquitto, {runs[0]['rounds'][0]['clients_ok'] if runs else '?'} simulated devices that really "
        "train (one host process, 2 warm TensorFlow workers at nice 19) and a fresh coordinator process; 2 rounds "
        "of all 10 devices, 1 local epoch, batch 32, 80% target sparsity, iid shards, evaluation every round. "
        "MB = 10^6 bytes. Slope: least squares over the three models against dense fp32 MB (in brackets: "
        "between the two fashion-mnist models alone, which share data and input size).",
        "",
        "| | " + " | ".join(r["configuration"] for r in runs) + " | slope per model MB |",
        "|---|" + "---|" * len(runs) + "---|",
    ]
    bold = {"refused": "**refused**"}
    for label, cell, name in ROWS:
        cells = (bold.get(cell(r), cell(r)) for r in runs)
        out.append(f"| {label} | " + " | ".join(cells) + f" | {slope(name) if name else ''} |")
    if "coordinator_rss_mb_per_model_mb" in sl:
        v = lambda name, key="slope": f"{sl[name][key]:.3g}"  # noqa: E731
        both = lambda name: f"{v(name)} ({v(name, 'fmnist_pair_slope')})"  # noqa: E731
        out += [
            "",
            "Per MB of dense fp32 model (least squares over the three models; the fashion-mnist pair in "
            f"brackets): coordinator peak RSS +{both('coordinator_rss_mb_per_model_mb')} MB, each TF training "
            f"worker +{both('tf_worker_rss_mb_per_model_mb')} MB, the simulator host "
            f"+{both('per_agent_growth_mb_per_model_mb')} MB per agent; the broadcast is "
            f"{both('broadcast_bytes_per_model_byte_round1')} bytes per model byte in round 1 (the dense start) "
            f"and {both('broadcast_bytes_per_model_byte_round2')} in round 2 (80% sparse), the upload "
            f"{both('upload_bytes_per_model_byte_round1')} and {both('upload_bytes_per_model_byte_round2')}; the "
            f"coordinator's own time per round +{both('coordinator_overhead_s_per_model_mb_round1')} s and "
            f"+{both('coordinator_overhead_s_per_model_mb_round2')} s per MB in rounds 1 and 2, "
            f"{both('coordinator_overhead_excl_evaluate_s_per_model_mb_round1')} and "
            f"{both('coordinator_overhead_excl_evaluate_s_per_model_mb_round2')} s without the evaluation.",
        ]
    wide = max(runs, key=lambda r: r["dense_fp32_bytes"], default=None)
    if wide and wide["fits_check"]["refused"]:
        f = wide["fits_check"]
        out += [
            "",
            f"The agent refuses {wide['configuration']} before fetching it on a device with "
            f"{f['available_bytes'] / 1e6:,.0f} MB available (`check_training_fits`, psutil's figure patched): "
            f"\"{f['message']}\". Its estimate ({f['estimate_bytes'] / 1e6:,.0f} MB) is below the "
            f"{wide['tf_worker_peak_rss_bytes'] / 1e6:,.0f} MB this run's training worker peaked at (a pool worker, "
            "which also holds the devices' shards and the cached training split).",
        ]
    return out


def main() -> int:
    readme = (ROOT / "README.md").read_text()
    if BEGIN not in readme or END not in readme:
        print("README has no performance markers", file=sys.stderr)
        return 1
    parts = []
    machine = RESULTS / "machine.txt"
    if machine.exists():
        parts += [machine.read_text().strip(), ""]
    fl = _load("fl_pruning")
    if fl:
        parts += fl_section(fl) + [""]
    ex = _load("export_bench")
    if ex:
        parts += export_section(ex) + [""]
    for name, section in (
        ("fl_realistic", realistic_section),
        ("fl_realistic_downlink", realistic_downlink_section),
        ("fmnist_export", fmnist_export_section),
        ("model_size", model_size_section),
        ("structured_pruning", structured_section),
        ("fleet_scale", scale_section),
        ("round_overhead", overhead_section),
        ("agent_footprint", footprint_section),
        ("brokers", brokers_section),
    ):
        rows = _load(name)
        if rows:
            parts += section(rows) + [""]
    body = "\n".join(parts).strip()
    new = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), f"{BEGIN}\n{body}\n{END}", readme, flags=re.S)
    (ROOT / "README.md").write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
