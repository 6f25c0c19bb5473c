"""The simulated fleet: synthetic updates that pass the coordinator's checks, and a real round over
`edgeprune simulate` agents with a TensorFlow-free coordinator."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from coordinator.masks import check_mask
from coordinator.strategy import MaskedFedAvg, TensorInfo
from edge_agent.protocol import codec
from edge_agent.simulate import SyntheticTrainer, UpdateCache, synthetic_update

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _model(rng, masks=True):
    shapes = [(3, 3, 1, 8), (8,), (72, 10), (10,)]
    weights = [rng.normal(size=s).astype(np.float32) for s in shapes]
    ms = [np.ones(s, bool) if len(s) > 1 and masks else None for s in shapes]
    names = ["conv/kernel", "conv/bias", "dense/kernel", "dense/bias"]
    blob = codec.encode(
        weights,
        names=names,
        masks=ms if masks else None,
        kind="model",
        values="fp32",
        compression="zstd" if masks else "none",
        meta={},
    )
    return names, shapes, weights, ms, blob


def test_synthetic_update_meets_targets_and_shapes():
    rng = np.random.default_rng(0)
    names, shapes, weights, ms, blob = _model(rng)
    targets = {"conv/kernel": 0.5, "dense/kernel": 0.75}
    data = synthetic_update(
        {"model": blob, "targets": targets, "update_format": "int4", "round": 3, "run_id": "r1", "seed": 7}
    )
    upd = codec.decode(data, reference=weights, reference_masks=ms)
    assert upd.meta == {"run_id": "r1", "round": 3}
    assert [t.shape for t in upd.tensors] == shapes
    for name, m in zip(names, upd.masks):
        if name in targets:
            assert check_mask(m, "unstructured", targets[name]) is None
            assert abs((1 - m.mean()) - targets[name]) < 0.02
        else:
            assert m is None
    infos = [TensorInfo(n, "unstructured" if m is not None else None) for n, m in zip(names, ms)]
    MaskedFedAvg(infos, shapes).validate(upd.tensors, upd.masks, [targets.get(n, 0.0) for n in names])
    assert not np.allclose(upd.tensors[1], weights[1])  # it did change the weights


def test_dense_synthetic_update_is_plain_fp32():
    rng = np.random.default_rng(1)
    names, shapes, weights, _, blob = _model(rng, masks=False)
    upd = codec.decode(synthetic_update({"model": blob, "update_format": "fp32", "round": 1, "run_id": "r"}))
    assert all(m is None for m in upd.masks) and [t.shape for t in upd.tensors] == shapes


def test_synthetic_trainer_waits_and_refuses_unknown_runs():
    rng = np.random.default_rng(2)
    *_, blob = _model(rng)
    t = SyntheticTrainer(0.3, 42, UpdateCache())
    t.begin("run1", {})
    t0 = time.perf_counter()
    out = t.round("run1", {"model": blob, "round": 1, "update_format": "int8"})
    assert time.perf_counter() - t0 >= 0.3
    assert out["metrics"]["num_samples"] == 42 and out["metrics"]["update_bytes"] == len(out["update"])
    from edge_agent.protocol.errors import ProtocolError

    with pytest.raises(ProtocolError, match="has not begun"):
        t.round("other", {"model": blob})


@pytest.mark.slow
@pytest.mark.tf
def test_round_over_simulated_fleet(mosquitto, tmp_path):
    """30 simulated agents in 2 processes: all online, one round aggregates all 30 updates, and the
    coordinator process stays small (its TensorFlow is in the model worker, gone before the round)."""
    n = 30
    sim = subprocess.Popen(
        [
            str(BIN / "edgeprune"),
            "simulate",
            "--broker",
            mosquitto.url,
            "--fleet",
            "sim",
            "--devices",
            str(n),
            "--processes",
            "2",
            "--delay",
            "0.2",
            "--json",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        ready = json.loads(sim.stdout.readline())
        assert ready["connected"] == n and ready["processes"] == 2
        out = subprocess.run(
            [
                str(BIN / "edgeprune"),
                "train",
                "--broker",
                mosquitto.url,
                "--fleet",
                "sim",
                "--home",
                str(tmp_path / "coord"),
                "--rounds",
                "2",
                "--sparsity",
                "0.5",
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
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=ROOT,
        )
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        summary = json.loads(out.stdout)
        assert summary["state"] == "done" and len(summary["clients"]) == n
        rounds = summary["rounds"]
        assert [r["clients_ok"] for r in rounds] == [n, n]
        assert rounds[-1]["sparsity"] == pytest.approx(0.5, abs=0.01)
        assert rounds[0]["aggregator_bytes"] == rounds[1]["aggregator_bytes"] > 0
        # TensorFlow alone is ~560 MB resident; the round loop's process must not have it
        assert summary["peak_rss_bytes"]["coordinator"] < 250 * 2**20, summary["peak_rss_bytes"]
        assert summary["peak_rss_bytes"]["model_worker"] > 300 * 2**20  # ... because it is over there
        assert (tmp_path / "coord" / "runs" / summary["run_id"] / "model.keras").exists()
    finally:
        sim.terminate()
        assert sim.wait(60) == 0


def test_simulate_usage_errors(tmp_path):
    out = subprocess.run(
        [str(BIN / "edgeprune"), "simulate", "--devices", "0", "--json"], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 2 and json.loads(out.stdout)["error"]["code"] == "usage"
    out = subprocess.run(
        [str(BIN / "edgeprune"), "simulate", "--devices", "3", "--broker", "mqtt://127.0.0.1:1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 1 and "cannot reach the broker" in out.stderr


@pytest.mark.slow
@pytest.mark.tf
def test_simulated_devices_that_really_train(mosquitto, tmp_path):
    """6 simulated devices, real TF-MOT training in one warm worker, on a 3,000-image subset of
    Fashion-MNIST (Dirichlet shards): above chance after 2 rounds, the target sparsity reached."""
    import os
    import subprocess
    import sys

    from edge_agent.ml import data

    from .test_datasets import write_idx

    try:
        x, y = data.read_fashion_mnist("train")
        tx, ty = data.read_fashion_mnist("test")
    except data.DataNotInstalled as exc:
        pytest.skip(str(exc))
    small = tmp_path / "fmnist"
    small.mkdir()
    names = data.FASHION_MNIST_FILES
    write_idx(small / names["train"][0], x[:3000])
    write_idx(small / names["train"][1], y[:3000].astype(np.uint8))
    write_idx(small / names["test"][0], tx[:1000])
    write_idx(small / names["test"][1], ty[:1000].astype(np.uint8))
    env = {**os.environ, data.FASHION_MNIST_DIR_ENV: str(small)}
    sim = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "coordinator",
            "simulate",
            "--broker",
            mosquitto.url,
            "--fleet",
            "tfsim",
            "--devices",
            "6",
            "--trainer",
            "tf",
            "--workers",
            "1",
            "--data",
            "fashion-mnist",
            "--partition",
            "dirichlet:0.5",
            "--json",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert json.loads(sim.stdout.readline())["connected"] == 6
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "coordinator",
                "train",
                "--broker",
                mosquitto.url,
                "--fleet",
                "tfsim",
                "--model",
                "fmnist_cnn",
                "--eval-data",
                "fashion-mnist",
                "--rounds",
                "2",
                "--sparsity",
                "0.5",
                "--schedule",
                "constant",
                "--local-epochs",
                "2",
                "--json",
                "--home",
                str(tmp_path / "home"),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=900,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        run = json.loads(out.stdout)
        assert [r["clients_ok"] for r in run["rounds"]] == [6, 6]
        assert run["final_accuracy"] > 0.3, run["final_accuracy"]  # chance is 0.1
        assert abs(run["final_sparsity"] - 0.5) < 0.01
        assert run["rounds"][-1]["up_ratio_vs_dense_fp32"] > 2
    finally:
        sim.terminate()
        sim.wait(60)
