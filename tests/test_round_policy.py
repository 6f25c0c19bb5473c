"""The round loop's policy, over the in-memory transport: each run takes well under a second.

Real agents (:class:`~edge_agent.simulate.SimulatedAgent`: presence, commands, blob
transfer, outbox, acks) and a real Session talk through ``memory://``; the devices'
training is the simulator's synthetic update and the coordinator's Keras model is built in
this process (:class:`~coordinator.model_worker.InProcessModelWorker`). What is tested is
the coordinator's decisions: min clients, deadlines, failures, a device that vanishes,
robust aggregation and its defences, structured steps and resume.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from coordinator.global_model import GlobalModel
from coordinator.model_worker import InProcessModelWorker
from coordinator.train import TrainConfig, train
from coordinator.train.observer import Silent
from edge_agent.protocol import codec

from .helpers.memfleet import Behaviour, memory_fleet

MLP = {"model": "mlp", "input_shape": (64,), "num_classes": 10, "eval_data": None, "local_epochs": 1}


@pytest.fixture(autouse=True)
def keras_in_process(monkeypatch):
    monkeypatch.setattr(GlobalModel, "worker_class", InProcessModelWorker)


def _run(fleet, online: int, grace_s: float = 15.0, **cfg):
    s = fleet.connect(online, offline_grace_s=grace_s)
    out = train(TrainConfig(**{**MLP, "rounds": 2, "sparsity": 0.5, **cfg}), s, s.store, Silent())
    return out, s.store.rounds(out["run_id"])


def test_failures_cost_the_round_their_update_not_the_round(tmp_path):
    with memory_fleet(tmp_path) as f:
        for d in ("a", "b", "c"):
            f.add(d)
        f.add("broken", Behaviour(fail=True, from_round=2))
        out, rows = _run(f, 4, rounds=3, min_clients=2)
    assert out["state"] == "done" and out["rounds_done"] == 3
    assert [r["clients_ok"] for r in rows] == [4, 3, 3]
    assert all(r["applied"] for r in rows)
    assert "simulated training failure" in rows[1]["failure_reasons"]["broken"]


def test_fewer_updates_than_min_clients_apply_nothing_and_the_run_says_so(tmp_path):
    with memory_fleet(tmp_path) as f:
        f.add("a")
        f.add("b", Behaviour(fail=True))
        f.add("c", Behaviour(fail=True))
        out, rows = _run(f, 3, min_clients=2)
    assert [r["applied"] for r in rows] == [False, False] and all(r["clients_ok"] == 1 for r in rows)
    assert out["state"] == "failed" and out["error"]["code"] == "no_round_applied"


def test_a_client_past_the_deadline_is_a_failure_and_the_round_does_not_wait(tmp_path):
    with memory_fleet(tmp_path) as f:
        f.add("a")
        f.add("b")
        f.add("slow", Behaviour(stall_s=4.0))
        t0 = time.monotonic()
        out, rows = _run(f, 3, rounds=1, round_timeout_s=1.0)
        took = time.monotonic() - t0
    assert out["state"] == "done" and rows[0]["clients_ok"] == 2 and rows[0]["applied"]
    assert "no update within --round-timeout 1 s" in rows[0]["failure_reasons"]["slow"]
    assert took < 4.0, took  # it closed the round at its deadline, not when the slow client answered


def test_a_device_that_vanishes_mid_round_is_dropped_and_the_run_goes_on(tmp_path):
    with memory_fleet(tmp_path) as f:
        f.add("a")
        f.add("b")
        f.add("gone", Behaviour(vanish=True, from_round=2))
        out, rows = _run(f, 3, grace_s=0.5, rounds=3, round_timeout_s=30)
    assert out["state"] == "done" and [r["clients_ok"] for r in rows] == [3, 2, 2]
    assert "gone" in rows[1]["failure_reasons"] and rows[2]["clients_selected"] == 2


def _global(out) -> list[np.ndarray]:
    with open(f"{out['run_dir']}/final.ept", "rb") as f:
        return codec.decode(f.read()).tensors


@pytest.mark.parametrize("aggregation, moved", [("fedavg", True), ("median", False), ("trimmed-mean", False)])
def test_robust_aggregation_ignores_one_poisoned_update(tmp_path, aggregation, moved):
    with memory_fleet(tmp_path) as f:
        for d in ("a", "b", "c", "d"):
            f.add(d)
        f.add("poison", Behaviour(shift=0.5))
        out, rows = _run(f, 5, rounds=1, sparsity=0.0, aggregation=aggregation, trim=0.2)
    assert out["state"] == "done" and rows[0]["clients_ok"] == 5
    mean_weight = float(np.mean([t.mean() for t in _global(out)]))
    # honest updates move weights by zero-mean noise; one of five shifted by 0.5 drags a mean by 0.1
    assert (abs(mean_weight) > 0.05) == moved, (aggregation, mean_weight)


def test_the_norm_defence_rejects_an_update_that_moves_the_model_too_far(tmp_path):
    with memory_fleet(tmp_path) as f:
        f.add("a")
        f.add("b")
        f.add("poison", Behaviour(shift=50.0))
        out, rows = _run(f, 3, rounds=1, sparsity=0.0, max_norm_ratio=10.0)
    assert rows[0]["clients_ok"] == 2 and "the model's norm" in rows[0]["failure_reasons"]["poison"]


def test_a_structured_step_shrinks_the_model_between_rounds(tmp_path):
    with memory_fleet(tmp_path) as f:
        f.add("a")
        f.add("b")
        out, rows = _run(f, 2, rounds=3, sparsity=0.0, structured=0.5, structured_every=1, importance="l1")
    assert out["state"] == "done"
    assert rows[-1]["params"] < rows[0]["params"] and rows[-1]["units_removed"], rows[-1]


def test_resume_continues_after_the_last_recorded_round(tmp_path):
    with memory_fleet(tmp_path) as f:
        f.add("a")
        f.add("b")
        first, _ = _run(f, 2, rounds=2)
        s = f.session
        cfg = TrainConfig(**{**MLP, "rounds": 4, "sparsity": 0.5})
        out = train(cfg, s, s.store, Silent(), resume=first["run_id"])
        rows = s.store.rounds(first["run_id"])
    assert out["run_id"] == first["run_id"] and out["state"] == "done"
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
