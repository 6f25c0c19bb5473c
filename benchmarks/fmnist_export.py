"""Export and on-device benchmark of fmnist_cnn: what ships to a device after a realistic run.

Trains fmnist_cnn (1,663,370 parameters) centrally on the 60,000 Fashion-MNIST training
images with TF-MOT: dense, 80% unstructured, 80% in 1x16 blocks, and a 50%-structured
model (half the units of conv1, conv2 and fc1 removed from the dense model by weight L1
norm, then fine-tuned). Exports dense fp32, sparse, sparse-int8 and fp16 TFLite (the
structured model as dense fp32 and sparse-int8), measures each artifact's accuracy with
LiteRT on the 10,000 test images, and benchmarks every artifact on a local agent and, when
this machine can run it (root, `scripts/pi-emulator prepare` done, aarch64 wheels cached by
./scripts/test), on an emulated Raspberry Pi (arm64 Debian under qemu-user, flashed with
`edgeprune flash`). Emulated latencies are qemu's, not a Pi's: they are labelled so, and
only their ratios to the same model's dense artifact mean anything.

    python benchmarks/fmnist_export.py [--json] [--epochs 2] [--runs 300] [--pi-runs 20] [--no-pi]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import BIN, ROOT, bench_artifacts, local_fleet, machine
from export_bench import kernel_sparsity, tflite_accuracy, train_pruned
from structured_pruning import shrink_l1

EMULATOR = ROOT / "scripts" / "pi-emulator"
EMU_DIR = Path(os.environ.get("EDGEPRUNE_PI_DIR", "/var/cache/edgeprune/pi-rootfs"))
CALIBRATION_IMAGES = 1000  # int8 ranges from training images, never from the test images that score them
CONFIGS = [  # (label, sparsity, granularity, structured fraction)
    ("dense", 0.0, "unstructured", 0.0),
    ("80% unstructured", 0.8, "unstructured", 0.0),
    ("80% 1x16 blocks", 0.8, "block", 0.0),
    ("50% structured", 0.0, "unstructured", 0.5),
]


def pi_unavailable() -> str | None:
    """Why the emulated Pi cannot run here (None: it can)."""
    from coordinator import bundle

    if os.geteuid() != 0:
        return "needs root (chroot, binfmt_misc)"
    if not (EMU_DIR / ".complete").exists():
        return f"no root filesystem in {EMU_DIR} (sudo scripts/pi-emulator prepare)"
    if not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
        return "binfmt_misc has no qemu-aarch64 entry (scripts/pi-emulator prepare registers it)"
    if not any(bundle.wheel_cache(bundle.Platform.parse("aarch64", "3.11")).glob("ai_edge_litert-*.whl")):
        return "no aarch64 wheels cached (./scripts/test downloads them)"
    return None


@contextlib.contextmanager
def emulated_pi(broker_url: str, fleet: str, work: Path, say):
    """Start the emulated Pi, flash an agent into it as device ``emu-pi``; unflash and stop afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = subprocess.run(["bash", str(EMULATOR), "start", "--port", str(port)], capture_output=True, text=True)
    if start.returncode != 0:
        raise RuntimeError(f"pi-emulator start failed: {start.stderr[-2000:]}")
    ssh = ["--identity", str(EMU_DIR / "id_ed25519"), "--ssh-option", f"UserKnownHostsFile={work / 'known_hosts'}"]
    cli = [str(BIN / "edgeprune")]
    target = f"ssh://pi@127.0.0.1:{port}"
    common = ["--broker", broker_url, "--fleet", fleet, "--home", str(work / "flash-home"), "--json"]
    try:
        say("== flashing the emulated Pi (arm64 under qemu-user; minutes) ...")
        out = subprocess.run(
            [*cli, "flash", target, *ssh, "--device-id", "emu-pi", "--offline", *common],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if out.returncode != 0:
            raise RuntimeError(f"edgeprune flash failed ({out.returncode}): {out.stdout[-2000:]} {out.stderr[-2000:]}")
        yield json.loads(out.stdout)
    finally:
        subprocess.run([*cli, "unflash", target, *ssh, "--device-id", "emu-pi", *common], capture_output=True)
        subprocess.run(["bash", str(EMULATOR), "stop"], capture_output=True)


def build_models(epochs: int, seed: int, say) -> list[dict]:
    """Train every configuration; returns [{label, model, trained_mask_sparsity, keras_accuracy, ...}]."""
    from edge_agent.ml import data, models

    split = data.fashion_mnist("train"), data.fashion_mnist("test")
    built, dense = [], None
    for label, sparsity, gran, fraction in CONFIGS:
        say(f"== fmnist_cnn {label}: training {epochs} epochs on {len(split[0]):,} images ...")
        t0 = time.monotonic()
        if fraction:
            model = shrink_l1(dense, fraction)
            models.compile_model(model, 1e-3)
            model.fit(split[0].x, split[0].y, epochs=1, batch_size=32, verbose=0)  # recovery after the cut
            acc = float(model.evaluate(split[1].x, split[1].y, verbose=0)[1])
            mask = kernel_sparsity(model)
        else:
            model, mask, acc = train_pruned(sparsity, gran, epochs, seed, "fmnist_cnn", split, lr=1e-3)
        if label == "dense":
            dense = model
        built.append(
            {
                "label": label,
                "structured": fraction,
                "model": model,
                "params": int(model.count_params()),
                "trained_mask_sparsity": mask,
                "keras_accuracy": acc,
                "train_s": round(time.monotonic() - t0, 1),
            }
        )
    return built


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=2, help="central training epochs per model (default 2)")
    p.add_argument("--runs", type=int, default=300, help="benchmark runs per artifact on the local agent")
    p.add_argument("--pi-runs", type=int, default=20, help="benchmark runs per artifact on the emulated Pi")
    p.add_argument("--no-pi", action="store_true", help="skip the emulated Pi")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object per artifact")
    a = p.parse_args()

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    from coordinator import export
    from coordinator.session import Session
    from coordinator.store import Store
    from edge_agent.ml import data

    t_start = time.monotonic()
    test = data.fashion_mnist("test")
    train = data.fashion_mnist("train")
    calibration = data.Dataset(train.x[:CALIBRATION_IMAGES], train.y[:CALIBRATION_IMAGES], "calibration")
    work = Path(tempfile.mkdtemp(prefix="edgeprune-fmnist-export-"))
    built = build_models(a.epochs, a.seed, say)
    arts = []
    for b in built:
        tag = "fmnist-" + b["label"].replace("% ", "-").replace(" ", "-")
        formats = ["dense", "sparse-int8"] if b["structured"] else list(export.FORMATS)
        for rec in export.export(b["model"], formats, work / tag, calibration=calibration, prefix=tag):
            rec["accuracy"] = tflite_accuracy(rec["path"], test)
            arts.append({**rec, "config": b["label"]})
        say(f"   exported {len(formats)} variants of {b['label']}")
    why_no_pi = "--no-pi" if a.no_pi else pi_unavailable()
    on_pi: dict[str, dict] = {}
    with local_fleet(1, "fx", ["--heartbeat-s", "5"]) as (broker, fleet_dir):
        store = Store(fleet_dir / "home")
        session = Session(broker.url, "fx", store, long_running=True).start()
        try:
            session.wait_online(1, 60)
            say(f"== benchmarking {len(arts)} artifacts on a local agent ({a.runs} runs each) ...")
            local = bench_artifacts(session, store, arts, "dev000", a.runs, warmup=max(3, a.runs // 20), budget_s=3600)
            if why_no_pi is None:
                with emulated_pi(broker.url, "fx", work, say):
                    session.wait_for(lambda rows: any(r["device_id"] == "emu-pi" for r in rows), 60)
                    say(f"== benchmarking on the emulated Pi ({a.pi_runs} runs each; qemu is slow) ...")
                    on_pi = bench_artifacts(
                        session, store, arts, "emu-pi", a.pi_runs, warmup=max(3, a.pi_runs // 20), budget_s=3600
                    )
        finally:
            session.close()
    shutil.rmtree(work, ignore_errors=True)

    by_cfg = {b["label"]: b for b in built}
    dense_bytes = next(x["bytes"] for x in arts if x["config"] == "dense" and x["format"] == "dense")
    rows = []
    for x in arts:
        b, r = by_cfg[x["config"]], local[x["name"]]
        base = next(y for y in arts if y["config"] == x["config"] and y["format"] == "dense")
        ref = arts[0]  # the dense model's dense fp32 artifact
        row = {
            "configuration": x["config"],
            "variant": x["format"],
            "params": b["params"],
            "keras_accuracy": round(b["keras_accuracy"], 4),
            "tflite_accuracy": round(x["accuracy"], 4),
            "bytes": x["bytes"],
            "size_ratio_vs_dense_fp32": round(dense_bytes / x["bytes"], 2),
            "readback_sparsity": x["sparsity"],
            "trained_mask_sparsity": round(b["trained_mask_sparsity"], 4),
            "local": _device_row(r, local[base["name"]], local[ref["name"]]),
        }
        if on_pi:
            row["emulated_pi"] = {
                **_device_row(on_pi[x["name"]], on_pi[base["name"]], on_pi[ref["name"]]),
                "label": "emulated (qemu-user)",
            }
        rows.append(row)
    total = round((time.monotonic() - t_start) / 60, 1)
    meta = {"configuration": "run", "epochs": a.epochs, "runs": a.runs, "pi_runs": a.pi_runs, "total_minutes": total}
    meta["emulated_pi"] = "ran" if on_pi else f"not run: {why_no_pi}"
    if a.json:
        for r in [*rows, meta, {"configuration": "machine", **machine()}]:
            print(json.dumps(r))
        return 0
    print(f"fmnist_export: machine {machine()}; LiteRT, 1 thread; accuracy on the 10,000 test images")
    head = f"{'configuration':<18}{'variant':<12}{'bytes':>10}{'vs fp32':>8}{'sparsity':>9}{'acc':>7}"
    print(
        head
        + f"{'p50 ms':>8}{'p99 ms':>8}{'vs dense':>9}{'peak MB':>8}"
        + ("  emulated Pi p50 / vs dense" if on_pi else "")
    )
    for r in rows:
        loc, pi = r["local"], r.get("emulated_pi")
        print(
            f"{r['configuration']:<18}{r['variant']:<12}{r['bytes']:>10,}{r['size_ratio_vs_dense_fp32']:>7.1f}x"
            f"{r['readback_sparsity']:>9.1%}{r['tflite_accuracy'] * 100:>6.2f}%{loc['p50_ms']:>8.3f}{loc['p99_ms']:>8.3f}"
            f"{loc['p50_vs_dense_model']:>8.2f}x{loc['peak_rss_mb']:>8.1f}"
            + (f"  {pi['p50_ms']:.2f} ms / {pi['p50_vs_dense_model']:.2f}x" if pi else "")
        )
    print(f"total {total} min; emulated Pi: {meta['emulated_pi']}")
    return 0


def _device_row(r: dict, same_model_dense: dict, dense_model: dict) -> dict:
    """One artifact on one device; p50 ratios to the same model's dense fp32 artifact and to the dense model's."""
    if r.get("status") != "ok":
        return {"status": r.get("status"), "error": r.get("error")}
    p50 = r["latency_ms"]["p50"]
    return {
        "p50_ms": p50,
        "p99_ms": r["latency_ms"]["p99"],
        "p50_vs_dense": round(p50 / same_model_dense["latency_ms"]["p50"], 3),
        "p50_vs_dense_model": round(p50 / dense_model["latency_ms"]["p50"], 3),
        "peak_rss_mb": round(r["memory"]["rss_peak_bytes"] / 2**20, 1),
        "load_s": r["load_s"],
        "runtime": r["runtime"]["name"],
        "delegate_fallback": bool(r.get("fallback")),
    }


if __name__ == "__main__":
    sys.exit(main())
