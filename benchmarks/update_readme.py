"""Regenerate the README's Performance section from the benchmark results in benchmarks/results/.

    python benchmarks/fl_pruning.py --json > benchmarks/results/fl_pruning.json
    python benchmarks/export_bench.py --json > benchmarks/results/export_bench.json
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
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def fl_section(rows) -> list[str]:
    plain = next(r for r in rows if r.get("configuration") == "plain_single_process_loop")
    runs = [r for r in rows if "sparsity" in r]
    first = runs[0]
    out = [f"**Federated pruning on digits** (`python benchmarks/fl_pruning.py`): {first['clients']} agents as local "
           f"processes, Dirichlet alpha 0.5 shards, {first['rounds']} rounds x 2 local epochs, the same seed for every "
           "row, all measured in one run. Upload bytes are averaged over every client-round of the run "
           "(ramp-up rounds included); the last column is the steady-state last round.", "",
           "| sparsity | final accuracy | gap to dense | upload B/client-round | vs dense fp32 | last round | "
           "round wall | total wall | target |", "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        target = r.get("target") or {}
        met = {True: "met", False: "**missed**", None: "-"}[r.get("target_met")]
        out.append(f"| {r['sparsity']:.0%} | {r['final_accuracy'] * 100:.2f}% | {r['accuracy_gap_pts']:.2f} pts | "
                   f"{r['upload_bytes_per_client_round']:,.0f} | {r['ratio_vs_dense_fp32']:.1f}x | "
                   f"{r['dense_fp32_bytes'] / r['upload_bytes_last_round']:.1f}x | {r['round_wall_s']:.2f} s | "
                   f"{r['total_wall_s']:.1f} s | {met} {json.dumps(target) if target else ''} |")
    spread = (f" (mean of {plain['total_wall_s_before']:.1f} s before and {plain['total_wall_s_after']:.1f} s after "
              "the federated runs)" if "total_wall_s_before" in plain else "")
    out.append(f"| plain loop | {plain['final_accuracy'] * 100:.2f}% | | | | | | {plain['total_wall_s']:.1f} s{spread} | |")
    dense = next((r for r in runs if r["sparsity"] == 0.0), None)
    if dense:
        out += ["", f"Dense edgeprune run vs the same FedAvg in one plain process (both timed from process start, "
                    f"TensorFlow import included): **{dense['wall_ratio_vs_plain_loop']:.2f}x** (target <= 1.5x)."]
    return out


def export_section(rows) -> list[str]:
    out = ["**Export and on-device latency** (`python benchmarks/export_bench.py`): digits_cnn trained centrally "
           "with TF-MOT, every TFLite variant, accuracy of each artifact on the held-out split (LiteRT), latency on "
           "a local agent (LiteRT, 1 thread, interleaved); mobilenet_tiny with untrained weights pruned by the "
           "xnnpack policy, for latency only.", "",
           "| model | sparsity | granularity | variant | bytes | vs dense fp32 | read-back sparsity | accuracy | "
           "p50 ms | vs dense p50 | harness / independent loop |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = f"{r['accuracy'] * 100:.1f}%" if r.get("accuracy") is not None and r["model"] == "digits_cnn" else "-"
        flag = " (no-delegate fallback)" if r.get("delegate_fallback") else ""
        out.append(f"| {r['model']} | {r['sparsity']:.0%} | {r['granularity']} | {r['variant']} | {r['bytes']:,} | "
                   f"{r['size_ratio_vs_dense_fp32']:.1f}x | {r['readback_sparsity']:.2%} | {acc} | "
                   f"{r['p50_ms']:.3f}{flag} | {r['p50_ratio_vs_dense_same_model']:.2f}x | "
                   f"{r['harness_vs_independent']:.3f} |")
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
    body = "\n".join(parts).strip()
    new = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), f"{BEGIN}\n{body}\n{END}", readme, flags=re.S)
    (ROOT / "README.md").write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
