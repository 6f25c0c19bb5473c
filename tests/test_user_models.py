"""Models beyond classification: a user's compiled regression model keeps its own loss and metrics,
is trained across two real agents and evaluated with them; the loss falls."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.tf]


def _regression_data(path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = (x @ np.array([0.5, -1.0, 2.0, 0.25], np.float32) + 0.1 * rng.normal(size=n)).astype(np.float32)
    np.savez(path, x=x, y=y)


def test_a_regression_model_trains_with_its_own_loss(mosquitto, agents, tmp_path):
    from edge_agent.ml.tfenv import load

    keras = load().keras
    model = keras.Sequential(
        [
            keras.layers.Input(shape=(4,)),
            keras.layers.Dense(16, activation="relu", name="h"),
            keras.layers.Dense(1, name="out"),
        ]
    )
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    model_path = tmp_path / "regressor.keras"
    model.save(model_path)
    for i in range(2):
        _regression_data(tmp_path / f"d{i}.npz", 400, i)
        agents(mosquitto.url, f"r{i}", "reg", "--data", str(tmp_path / f"d{i}.npz"), "--train-threads", "1")
    _regression_data(tmp_path / "eval.npz", 300, 9)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "coordinator",
            "train",
            "--broker",
            mosquitto.url,
            "--fleet",
            "reg",
            "--model",
            str(model_path),
            "--eval-data",
            str(tmp_path / "eval.npz"),
            "--rounds",
            "3",
            "--sparsity",
            "0",
            "--local-epochs",
            "3",
            "--lr",
            "0.01",
            "--wait-for",
            "2",
            "--json",
            "--home",
            str(tmp_path / "home"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-2000:]
    run = json.loads(out.stdout)
    losses = [r["loss"] for r in run["rounds"]]
    assert run["rounds"][0]["accuracy"] is None  # no accuracy for a regression
    assert losses[-1] < losses[0] * 0.7, losses  # mse, the model's own loss, falls
    assert run["initial_loss"] is None or losses[-1] < run["initial_loss"]
    assert all(r.get("metrics", {}).get("mean_absolute_error") is not None for r in run["rounds"]), run["rounds"][0]
