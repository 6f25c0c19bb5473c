"""Export and on-device benchmark: what pruning does to the artifacts that ship, measured.

Trains digits_cnn centrally with TF-MOT at 0%, 80% and 90% sparsity (unstructured
and 1x16-block granularity), exports every TFLite variant, evaluates each
artifact's accuracy with LiteRT, benchmarks all of them on a local agent through
the real broker (interleaved), and does the same latency study for the
MobileNet-style model pruned with the xnnpack policy. Everything in one run.

    python benchmarks/export_bench.py [--json] [--epochs 15] [--runs 300]
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from common import bench_artifacts, local_fleet, machine

TARGETS = {0.8: {"min_int8_size_ratio": 8.0}, 0.9: {"min_int8_size_ratio": 12.0}}
MAX_READBACK_GAP_PTS = 0.5
MAX_HARNESS_DEVIATION = 0.05


def train_pruned(
    sparsity: float,
    granularity: str,
    epochs: int,
    seed: int,
    model_name: str = "digits_cnn",
    split=None,
    lr: float = 2e-3,
):
    """Central TF-MOT training on a train split (default: digits); returns (stripped model, mask sparsity, accuracy)."""
    from edge_agent.ml import data, models, pruning, tfenv

    t = tfenv.load()
    train, test = split or data.digits_split()
    model = models.build(model_name, tuple(train.x.shape[1:]), 10, seed)
    steps = epochs * int(np.ceil(len(train) / 32))
    if sparsity > 0:
        sched = lambda: t.tfmot.sparsity.keras.PolynomialDecay(0.0, sparsity, 0, int(steps * 0.7), frequency=10)  # noqa: E731
        model, report, _ = pruning.wrap(model, granularity, sched)
    models.compile_model(model, lr)
    t.tf.keras.utils.set_random_seed(seed)
    cbs = [t.tfmot.sparsity.keras.UpdatePruningStep()] if sparsity > 0 else []
    model.fit(train.x, train.y, epochs=epochs, batch_size=32, verbose=0, callbacks=cbs)
    if sparsity > 0:
        model = t.tfmot.sparsity.keras.strip_pruning(model)
    models.compile_model(model)
    return model, kernel_sparsity(model), float(model.evaluate(test.x, test.y, verbose=0)[1])


def kernel_sparsity(model) -> float:
    """Share of zeros in the model's kernels (what pruning trained, before any export)."""
    kernels = [
        layer.get_weights()[0] for layer in model.layers if layer.get_weights() and layer.get_weights()[0].ndim > 1
    ]
    return float(1.0 - sum(int(np.count_nonzero(k)) for k in kernels) / sum(k.size for k in kernels))


def tflite_accuracy(path: str, test=None) -> float:
    """Accuracy of a .tflite file on a test split (default: digits), with LiteRT's reference kernels."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from edge_agent.ml import data

    test = test if test is not None else data.digits_split()[1]
    interp = Interpreter(
        model_path=path, experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    )
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    interp.resize_tensor_input(inp["index"], [len(test), *test.x.shape[1:]])
    interp.allocate_tensors()
    interp.set_tensor(inp["index"], test.x.astype(np.float32))
    interp.invoke()
    return float((interp.get_tensor(out["index"]).argmax(-1) == test.y).mean())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--runs", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    log = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))

    from coordinator import export
    from coordinator.session import Session
    from coordinator.store import Store

    with local_fleet(1, "xb", ["--heartbeat-s", "5"]) as (b, work):
        out = work / "artifacts"
        configs = []
        for sparsity, gran in [
            (0.0, "unstructured"),
            (0.8, "unstructured"),
            (0.8, "block"),
            (0.9, "unstructured"),
            (0.9, "block"),
        ]:
            log(f"== digits_cnn: training at {sparsity:.0%} ({gran}) ...")
            model, mask_sparsity, acc = train_pruned(sparsity, gran, args.epochs, args.seed)
            tag = f"digits-{int(sparsity * 100)}-{gran}"
            recs = export.export(
                model,
                list(export.FORMATS),
                out / tag,
                calibration=__import__("edge_agent.ml.data", fromlist=["x"]).digits_split()[1],
                prefix=tag,
            )
            for r in recs:
                r["accuracy"] = tflite_accuracy(r["path"])
            configs.append(
                {
                    "model": "digits_cnn",
                    "sparsity": sparsity,
                    "granularity": gran,
                    "trained_mask_sparsity": mask_sparsity,
                    "keras_accuracy": acc,
                    "artifacts": recs,
                }
            )
        log("== mobilenet_tiny latency study (untrained weights, xnnpack policy) ...")
        for sparsity in (0.0, 0.8, 0.9):
            model = export.latency_model("mobilenet_tiny", sparsity, policy="xnnpack")
            tag = f"mobilenet-{int(sparsity * 100)}-xnnpack"
            recs = export.export(model, ["dense", "sparse"], out / tag, prefix=tag)
            configs.append(
                {"model": "mobilenet_tiny", "sparsity": sparsity, "granularity": "xnnpack policy", "artifacts": recs}
            )

        store = Store(work / "home")
        session = Session(b.url, "xb", store, long_running=True).start()
        session.wait_online(1, 30)
        all_arts = [a for c in configs for a in c["artifacts"]]
        log(f"== benchmarking {len(all_arts)} artifacts on a local agent ({args.runs} runs each, interleaved) ...")
        by_name = bench_artifacts(session, store, all_arts, "dev000", args.runs, warmup=20, budget_s=600)
        session.close()

    rows = []
    dense_fp32 = None
    for c in configs:
        arts = {a["format"]: a for a in c["artifacts"]}
        if c["model"] == "digits_cnn" and c["sparsity"] == 0.0:
            dense_fp32 = arts["dense"]["bytes"]
        base = arts["dense"]
        base_p50 = by_name[base["name"]]["latency_ms"]["p50"]
        for fmt, a in arts.items():
            r = by_name[a["name"]]
            ref_bytes = dense_fp32 if c["model"] == "digits_cnn" else configs[-3]["artifacts"][0]["bytes"]
            row = {
                "model": c["model"],
                "sparsity": c["sparsity"],
                "granularity": c["granularity"],
                "variant": fmt,
                "bytes": a["bytes"],
                "gzip_bytes": a["gzip_bytes"],
                "size_ratio_vs_dense_fp32": ref_bytes / a["bytes"],
                "readback_sparsity": a["sparsity"],
                "trained_mask_sparsity": c.get("trained_mask_sparsity"),
                "accuracy": a.get("accuracy"),
                "p50_ms": r["latency_ms"]["p50"],
                "p50_ratio_vs_dense_same_model": r["latency_ms"]["p50"] / base_p50,
                "harness_vs_independent": r["harness_vs_independent"],
                "delegate_fallback": bool(r.get("fallback")),
                "runtime": r["runtime"]["name"],
            }
            if c.get("trained_mask_sparsity") is not None:
                row["readback_gap_pts"] = abs(a["sparsity"] - c["trained_mask_sparsity"]) * 100
            target = TARGETS.get(c["sparsity"]) if c["model"] == "digits_cnn" and fmt == "sparse-int8" else None
            checks = {
                "readback_within_0.5pts": row.get("readback_gap_pts", 0) <= MAX_READBACK_GAP_PTS,
                "harness_within_5pct": abs(row["harness_vs_independent"] - 1) <= MAX_HARNESS_DEVIATION,
            }
            if target:
                row["target"] = target
                checks["int8_size"] = row["size_ratio_vs_dense_fp32"] >= target["min_int8_size_ratio"]
            row["checks"] = checks
            rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"\nexport_bench: machine {machine()}; one local agent, LiteRT, 1 thread, {args.runs} runs per artifact")
    print(
        "read-back: weight sparsity read from the .tflite bytes; trained: zeros in the Keras kernels after "
        "strip_pruning; vs dense: p50 ratio to the same model's dense fp32 artifact, same device, same job."
    )
    print(
        f"{'model':<15}{'sparsity':>8} {'granularity':<15}{'variant':<12}{'bytes':>10}{'vs fp32':>8}{'read-back':>10}"
        f"{'trained':>8}{'acc':>7}{'p50 ms':>8}{'vs dense':>9}{'harness':>8}  checks"
    )
    for r in rows:
        print(
            f"{r['model']:<15}{r['sparsity']:>8.0%} {r['granularity']:<15}{r['variant']:<12}{r['bytes']:>10,}"
            f"{r['size_ratio_vs_dense_fp32']:>7.1f}x{r['readback_sparsity']:>10.2%}"
            + (f"{r['trained_mask_sparsity']:>8.2%}" if r["trained_mask_sparsity"] is not None else f"{'-':>8}")
            + (f"{r['accuracy'] * 100:>6.1f}%" if r["accuracy"] is not None else f"{'-':>7}")
            + f"{r['p50_ms']:>8.3f}"
            f"{r['p50_ratio_vs_dense_same_model']:>8.2f}x{r['harness_vs_independent']:>8.3f}  "
            + " ".join(f"{k}={'ok' if v else 'MISSED'}" for k, v in r["checks"].items())
            + (" (no-delegate fallback)" if r["delegate_fallback"] else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
