"""Structured pruning: what removing whole units and filters buys, measured in one run.

digits (federated, 4 local agents with Dirichlet-free equal shards, `edgeprune train`,
fp32 updates so the structured runs' bytes are compared before any sparse encoding; the
unstructured run's fp32 update still carries masks, zstd-compressed):
  0% (dense FedAvg), 25%, 50%, 75% of each shrinkable layer's units removed
  (`--structured`, a step every 2 rounds, recovery rounds after the last), and an
  unstructured-pruned run (`--sparsity`) with as many non-zero weights as the 50% model.
MobileNet-style model (untrained weights, for size and latency only): 0-75% of the
  filters of its shrinkable layers removed by weight L1 norm.

Every final model is exported to dense fp32 TFLite and all of them are benchmarked on
a local agent, interleaved: p50 latency, parameters, FLOPs, TFLite size, accuracy.

    python benchmarks/structured_pruning.py [--rounds 8] [--runs 500] [--json]

Targets: at 50% of units removed, p50 latency >= 1.8x faster than dense and accuracy
within 2 points of dense FedAvg on digits; upload bytes per round >= 3x fewer than
dense fp32.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from common import BIN, bench_artifacts, local_fleet, machine

FRACTIONS = (0.0, 0.25, 0.5, 0.75)
MIN_SPEEDUP = 1.8
MAX_ACC_GAP_PTS = 2.0
MIN_UPLOAD_RATIO = 3.0


def fed_run(url: str, home: Path, rounds: int, structured: float, sparsity: float) -> dict:
    cmd = [
        str(BIN / "edgeprune"),
        "train",
        "--broker",
        url,
        "--fleet",
        "sp",
        "--home",
        str(home),
        "--rounds",
        str(rounds),
        "--sparsity",
        f"{sparsity:.4f}",
        "--update-format",
        "fp32",
        "--wait-for",
        "4",
        "--wait-timeout",
        "300",
        "--seed",
        "1",
        "--json",
    ]
    if structured:
        cmd += ["--structured", str(structured), "--structured-every", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"edgeprune train failed: {out.stdout[-1500:]} {out.stderr[-1500:]}")
    return json.loads(out.stdout)


def shrink_l1(model, fraction: float):
    """``model`` with ``fraction`` of each shrinkable layer's units removed, lowest weight-L1 first
    (the weights of the units that stay are kept)."""
    from coordinator import surgery
    from edge_agent.ml import models, pruning

    names = [s["name"] for s in pruning.weight_spec(model)]
    weights = pruning.get_weights(model)
    arch = model.to_json()
    shrinkable = surgery.report(arch)["shrinkable"]
    by_name = dict(zip(names, weights))
    score = {
        k: np.abs(by_name[f"{k}/kernel"]).sum(axis=tuple(range(by_name[f"{k}/kernel"].ndim - 1))) for k in shrinkable
    }
    keep = surgery.keep_top(score, shrinkable, shrinkable, fraction)
    new_arch, cuts = surgery.shrink(arch, names, keep)
    small = models.from_json(new_arch)
    pruning.set_state(small, surgery.apply(cuts, names, weights))
    return small


def mobilenet_shrunk(fraction: float):
    """mobilenet_tiny (96x96x3, untrained) with ``fraction`` of each shrinkable layer's filters removed,
    lowest weight-L1 first; returns (model, params, flops, architecture)."""
    from coordinator import surgery
    from coordinator.model_worker import flops
    from edge_agent.ml import models

    model = models.build("mobilenet_tiny", (96, 96, 3), 10, 0)
    if fraction:
        model = shrink_l1(model, fraction)
    units = surgery.units(surgery.parse(model.to_json()))
    return model, int(model.count_params()), flops(model), units


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--runs", type=int, default=500, help="benchmark runs per artifact (default 500)")
    p.add_argument("--json", action="store_true", help="print one JSON object per configuration")
    a = p.parse_args()
    log = (lambda *x: None) if a.json else (lambda *x: print(*x, file=sys.stderr, flush=True))

    from coordinator import export
    from coordinator.session import Session
    from coordinator.store import Store
    from edge_agent.ml import models, tfenv

    tfenv.load()
    shard = lambda i: ["--data-shard", f"{i}/4"]  # noqa: E731
    with local_fleet(4, "sp", ["--data", "digits", "--train-threads", "1"], per_agent=shard) as (b, work):
        configs = []
        for frac in FRACTIONS:
            log(f"== digits: {frac:.0%} of units removed, {a.rounds} federated rounds ...")
            s = fed_run(b.url, work / "coord", a.rounds, frac, 0.0)
            configs.append({"model": "digits_cnn", "kind": "structured", "removed": frac, "summary": s})
        p50 = next(c for c in configs if c["removed"] == 0.5)["summary"]
        dense = configs[0]["summary"]
        same = 1.0 - p50["num_params"] / dense["num_params"]
        log(f"== digits: unstructured pruning at {same:.1%} (as many weights as the 50% model) ...")
        configs.append(
            {
                "model": "digits_cnn",
                "kind": "unstructured",
                "removed": None,
                "sparsity": same,
                "summary": fed_run(b.url, work / "coord", a.rounds, 0.0, round(same, 4)),
            }
        )
        for c in configs:
            model = models.load_file(str(Path(c["summary"]["run_dir"]) / "model.keras"))
            tag = f"digits-{c['kind']}-{c['removed'] if c['removed'] is not None else 'u'}"
            fmts = ["dense"] if c["kind"] == "structured" else ["dense", "sparse"]
            c["artifacts"] = export.export(model, fmts, work / "art" / tag, prefix=tag)
        for frac in FRACTIONS:
            log(f"== mobilenet_tiny: {frac:.0%} of filters removed (L1 norm, untrained weights) ...")
            model, params, fl, units = mobilenet_shrunk(frac)
            tag = f"mobilenet-{int(frac * 100)}"
            configs.append(
                {
                    "model": "mobilenet_tiny",
                    "kind": "structured",
                    "removed": frac,
                    "params": params,
                    "flops": fl,
                    "architecture": units,
                    "artifacts": export.export(model, ["dense"], work / "art" / tag, prefix=tag),
                }
            )

        store = Store(work / "bench-home")
        session = Session(b.url, "sp", store, long_running=True).start()
        session.wait_online(4, 30)
        arts = [x for c in configs for x in c["artifacts"]]
        log(f"== benchmarking {len(arts)} artifacts on dev000 ({a.runs} runs each, interleaved) ...")
        results = bench_artifacts(session, store, arts, "dev000", a.runs, warmup=20, budget_s=900)
        session.close()
    lat = {name: r["latency_ms"]["p50"] for name, r in results.items()}

    rows = []
    for c in configs:
        s = c.get("summary") or {}
        for art in c["artifacts"]:
            rows.append(
                {
                    "model": c["model"],
                    "kind": c["kind"],
                    "units_removed": c["removed"],
                    "sparsity": c.get("sparsity"),
                    "variant": art["format"],
                    "params": s.get("num_params", c.get("params")),
                    "nonzero_params": (
                        round(s["num_params"] * (1 - (s.get("final_sparsity_overall") or 0.0)))
                        if s
                        else c.get("params")
                    ),
                    "flops": s.get("flops", c.get("flops")),
                    "architecture": s.get("architecture", c.get("architecture")),
                    "tflite_bytes": art["bytes"],
                    "p50_ms": lat[art["name"]],
                    "accuracy": s.get("final_accuracy"),
                    "upload_bytes_last_round": s["rounds"][-1]["bytes_up_per_client"] if s else None,
                    "upload_bytes_avg_per_round": s.get("upload_bytes_per_client_round"),
                    "upload_encoding": ("fp32, plain" if c["kind"] == "structured" else "fp32 values + masks, zstd")
                    if s
                    else None,
                }
            )
    for r in rows:
        base = next(
            x for x in rows if x["model"] == r["model"] and x["units_removed"] == 0.0 and x["variant"] == "dense"
        )
        r["speedup_vs_dense"] = round(base["p50_ms"] / r["p50_ms"], 3)
        r["flops_ratio_vs_dense"] = round(base["flops"] / r["flops"], 3) if r["flops"] else None
        r["params_ratio_vs_dense"] = round(base["params"] / r["params"], 3)
        if r["model"] == "digits_cnn":
            r["accuracy_gap_pts"] = round((base["accuracy"] - r["accuracy"]) * 100, 2)
            if r["upload_bytes_last_round"]:  # once the model has its final size, and over the whole run
                r["upload_ratio_vs_dense"] = round(base["upload_bytes_last_round"] / r["upload_bytes_last_round"], 2)
                r["upload_ratio_vs_dense_avg"] = round(
                    base["upload_bytes_avg_per_round"] / r["upload_bytes_avg_per_round"], 2
                )
        if r["units_removed"] == 0.5 and r["model"] == "digits_cnn":
            r["target"] = {
                "min_speedup": MIN_SPEEDUP,
                "max_accuracy_gap_pts": MAX_ACC_GAP_PTS,
                "min_upload_ratio": MIN_UPLOAD_RATIO,
            }
            r["target_met"] = (
                r["speedup_vs_dense"] >= MIN_SPEEDUP
                and r["accuracy_gap_pts"] <= MAX_ACC_GAP_PTS
                and r.get("upload_ratio_vs_dense", 0) >= MIN_UPLOAD_RATIO
            )
        elif r["units_removed"] == 0.5:
            r["target"] = {"min_speedup": MIN_SPEEDUP}
            r["target_met"] = r["speedup_vs_dense"] >= MIN_SPEEDUP
    rows.append({"configuration": "machine", **machine()})
    if a.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print(
            f"{'model':<15} {'kind':<12} {'removed':>7} {'variant':<7} {'params':>8} {'MFLOPs':>7} {'TFLite B':>9} "
            f"{'p50 ms':>7} {'speedup':>7} {'acc':>7} {'gap':>6} {'upload':>7}  target"
        )
        for r in rows[:-1]:
            acc = f"{r['accuracy'] * 100:.2f}%" if r.get("accuracy") is not None else "-"
            gap = f"{r['accuracy_gap_pts']:.2f}" if r.get("accuracy_gap_pts") is not None else "-"
            up = f"{r['upload_ratio_vs_dense']:.2f}x" if r.get("upload_ratio_vs_dense") else "-"
            removed = f"{r['units_removed']:.0%}" if r["units_removed"] is not None else f"u{r['sparsity']:.0%}"
            met = {True: "met", False: "MISSED"}.get(r.get("target_met"), "")
            print(
                f"{r['model']:<15} {r['kind']:<12} {removed:>7} {r['variant']:<7} {r['params']:>8,} "
                f"{(r['flops'] or 0) / 1e6:>7.2f} {r['tflite_bytes']:>9,} {r['p50_ms']:>7.3f} "
                f"{r['speedup_vs_dense']:>6.2f}x {acc:>7} {gap:>6} {up:>7}  {met}"
            )
    return 0 if all(r.get("target_met", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
