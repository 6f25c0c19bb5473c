"""End to end: real Mosquitto, real agent processes, real TF-MOT training on digits."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from coordinator import tblog
from coordinator.progress import Reporter
from coordinator.train import TrainConfig, train
from edge_agent.protocol import codec, serde, topics
from edge_agent.protocol.messages import Reply
from tests.conftest import raw_client, wait_until
from tests.helpers import events

pytestmark = [pytest.mark.slow, pytest.mark.tf]
ROOT = Path(__file__).resolve().parent.parent


def start_fleet(agents, url, n, fleet="fl"):
    return [
        agents(
            url,
            f"pi{i}",
            fleet,
            "--data",
            "digits",
            "--data-shard",
            f"{i}/{n}",
            "--train-threads",
            "1",
            "--heartbeat-s",
            "1",
            "--keepalive-s",
            "5",
        )
        for i in range(n)
    ]


def test_federated_pruning_end_to_end(mosquitto, agents, session_factory, tmp_path):
    procs = start_fleet(agents, mosquitto.url, 3)
    s = session_factory(mosquitto.url, "fl", long_running=True)
    assert s.wait_for(lambda rows: sum(r["state"] == "online" and r["caps"] is not None for r in rows) == 3, 30)

    cfg = TrainConfig(rounds=3, sparsity=0.8, local_epochs=2, seed=1)
    summary = train(cfg, s, s.store, Reporter(quiet=True))
    assert summary["state"] == "done" and summary["rounds_done"] == 3
    assert summary["clients"] == ["pi0", "pi1", "pi2"]
    rounds = s.store.rounds(summary["run_id"])
    assert [r["clients_ok"] for r in rounds] == [3, 3, 3]
    # the schedule reached its target and the model learned
    assert rounds[-1]["sparsity"] == pytest.approx(0.8, abs=0.002)
    assert rounds[0]["sparsity"] < rounds[-1]["sparsity"]
    assert summary["final_accuracy"] > 0.7 > summary["initial_accuracy"]
    # only sparse updates crossed: int8 deltas + relative masks, far below dense fp32
    assert rounds[-1]["bytes_up_per_client"] < summary["dense_fp32_bytes"] / 12
    clients = s.store.client_rounds(summary["run_id"])
    assert len(clients) == 9 and all(c["ok"] and c["bytes_up"] > 0 and c["bytes_down"] > 0 for c in clients)
    m = clients[-1]["metrics"]
    for key in ("train_loss", "train_accuracy", "num_samples", "wall_s", "cpu_s", "peak_rss_bytes"):
        assert key in m, key
    assert m["peak_rss_bytes"] > 100e6  # the TF worker, not the agent
    # the stored global model: pruned weights exactly zero, sparsity as reported
    final = codec.decode((Path(summary["run_dir"]) / "final.ept").read_bytes())
    for t, mask in zip(final.tensors, final.masks):
        if mask is not None:
            assert np.all(t[~mask] == 0)
    assert (Path(summary["run_dir"]) / "model.keras").exists()
    # TensorBoard: everything the run produced, read back with TensorBoard's event reader
    tb = Path(summary["run_dir"]) / "tensorboard"
    tags = events.read(tb)
    steps = [1, 2, 3]
    for name in ("eval/accuracy", "eval/loss", "sparsity/prunable", "bytes/up_per_client", "bytes/down_cumulative"):
        assert tags[name] == ("scalars", steps), name
    for name in ("phase_s/aggregate", "phase_s/round", "clients/ok", "structure/params", "structure/flops"):
        assert tags[name] == ("scalars", steps), name
    pruned = [t["name"] for t in s.store.run(summary["run_id"])["config"]["tensors"] if t["pruned"]]
    assert pruned
    for name in pruned:
        assert tags[tblog.tag("sparsity", name)] == ("scalars", steps)
        assert tags[tblog.tag("sparsity_target", name)] == ("scalars", steps)
        assert tags[tblog.tag("weights", name)] == ("histograms", steps)
        stored = [r["sparsity_per_tensor"][name] for r in rounds]
        assert events.values(tb, tblog.tag("sparsity", name)) == pytest.approx(stored, abs=1e-6)
    assert events.values(tb, "bytes/up_cumulative") == pytest.approx(np.cumsum([r["bytes_up_total"] for r in rounds]))
    assert tags["config"][0] == "text" and tags["__graph__"] and any(p == "hparams" for p, _ in tags.values())
    for layer in summary["architecture"]:
        assert tags[tblog.tag("structure", "units", layer)] == ("scalars", steps)
    devices = events.read(tb / tblog.DEVICES_RUN)
    for dev in ("pi0", "pi1", "pi2"):
        for name in ("samples", "local_loss", "local_accuracy", "update_bytes", "train_s", "failed"):
            assert devices[f"{dev}/{name}"] == ("scalars", steps), (dev, name)
    assert events.values(tb / tblog.DEVICES_RUN, "pi1/failed") == [0.0, 0.0, 0.0]
    # workers end with the run; agents stay up
    for p in procs:
        assert wait_until(lambda: not s.call(p.device_id, "train_status", timeout_s=5).result["worker_alive"], 15)
        assert p.alive()
    # the CLI shows the run
    out = subprocess.run(
        [sys.executable, "-m", "coordinator", "show", summary["run_id"][:15], "--json", "--home", str(s.store.home)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    shown = json.loads(out.stdout)
    assert shown["run_id"] == summary["run_id"] and len(shown["rounds"]) == 3

    # dense FedAvg baseline in the same tool: plain fp32 updates
    dense = train(TrainConfig(rounds=1, sparsity=0.0, local_epochs=1, seed=1), s, s.store, Reporter(quiet=True))
    row = s.store.rounds(dense["run_id"])[0]
    assert row["sparsity"] == 0.0
    assert dense["dense_fp32_bytes"] <= row["bytes_up_per_client"] < dense["dense_fp32_bytes"] + 4096


def test_round_survives_bad_and_vanishing_clients(mosquitto, agents, session_factory):
    good = start_fleet(agents, mosquitto.url, 2)
    agents(mosquitto.url, "nodata", "fl")  # cannot train: no data configured
    for mode in ("nan", "dense", "shape"):
        agents(mosquitto.url, f"evil-{mode}", "fl", env={"EVIL_MODE": mode}, module="tests.helpers.evil_agent")
    s = session_factory(mosquitto.url, "fl", long_running=True)
    assert s.wait_for(lambda rows: sum(r["state"] == "online" for r in rows) == 6, 30), s.device_table()

    result = {}
    cfg = TrainConfig(rounds=2, sparsity=0.5, schedule="constant", local_epochs=3, seed=2, round_timeout_s=120)
    t = threading.Thread(target=lambda: result.update(train(cfg, s, s.store, Reporter(quiet=True))))
    t.start()
    # kill pi1 in the middle of round 2's training
    assert wait_until(lambda: s.store.runs() and len(s.store.rounds(s.store.runs()[0]["run_id"])) == 1, 240)
    assert wait_until(lambda: any(r["device_id"] == "pi1" and r["task"] == "train_round" for r in s.device_table()), 60)
    good[1].kill9()
    t.join(300)
    assert not t.is_alive()
    assert result["state"] == "done" and result["rounds_done"] == 2
    assert "nodata" not in result["clients"]
    rounds = s.store.rounds(result["run_id"])
    assert rounds[0]["clients_ok"] == 2 and rounds[1]["clients_ok"] == 1  # only the good ones, then pi0 alone
    assert all(r["applied"] for r in rounds)
    reasons = rounds[0]["failure_reasons"]
    assert "NaN" in reasons["evil-nan"]
    assert "below the round's target" in reasons["evil-dense"]
    assert "tensors" in reasons["evil-shape"]
    assert "offline" in rounds[1]["failure_reasons"]["pi1"]
    assert rounds[1]["sparsity"] == pytest.approx(0.5, abs=0.002)
    assert good[0].alive()
    # TensorBoard's devices run: who failed when (1) and who trained (0, with its local loss)
    board = Path(result["run_dir"]) / "tensorboard" / tblog.DEVICES_RUN
    assert events.values(board, "evil-nan/failed") == [1.0, 1.0]
    assert events.values(board, "pi1/failed") == [0.0, 1.0]
    assert events.values(board, "pi0/failed") == [0.0, 0.0] and len(events.values(board, "pi0/local_loss")) == 2


def test_resume_after_coordinator_kill9(mosquitto, agents, tmp_path):
    """kill -9 the coordinator during round 3 of 4; `train --resume` finishes with rounds 1-4 each recorded
    once, continuing from the saved round-2 model (same weights, not a restart)."""
    import signal

    from coordinator.store import Store

    start_fleet(agents, mosquitto.url, 2, fleet="rs")
    home = tmp_path / "home"
    base = [
        sys.executable,
        "-m",
        "coordinator",
        "train",
        "--broker",
        mosquitto.url,
        "--fleet",
        "rs",
        "--home",
        str(home),
        "--json",
    ]
    coord = subprocess.Popen(
        base + ["--rounds", "4", "--sparsity", "0.5", "--local-epochs", "1", "--wait-for", "2", "--seed", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    store = Store(home)
    run = wait_until(lambda: (store.runs("train") or [None])[0], 120)
    assert run, coord.stderr.read().decode()[-2000:] if coord.poll() is not None else "no run"
    run_id = run["run_id"]
    assert wait_until(lambda: len(store.rounds(run_id)) >= 2, 240), "rounds 1-2 did not finish"
    coord.send_signal(signal.SIGKILL)
    coord.wait(10)
    before = store.rounds(run_id)
    done = [r["round"] for r in before]
    assert done[:2] == [1, 2] and len(done) < 4
    saved = codec.decode((home / "runs" / run_id / f"round-{done[-1]:04d}.ept").read_bytes())

    out = subprocess.run(base + ["--resume", run_id[:15]], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    assert summary["run_id"] == run_id and summary["state"] == "done"
    rounds = store.rounds(run_id)
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]  # none lost
    assert [r["started"] for r in rounds[: len(before)]] == [r["started"] for r in before]  # none repeated
    assert all(r["clients_ok"] == 2 for r in rounds)
    assert rounds[-1]["sparsity"] == pytest.approx(0.5, abs=0.002)
    first_resumed = done[-1] + 1
    clients = [c for c in store.client_rounds(run_id) if c["round"] == first_resumed]
    assert len(clients) == 2 and all(c["ok"] for c in clients)
    assert saved.meta.get("tag") == f"round-{done[-1]:04d}"


def test_finished_update_survives_broker_outage_and_agent_restart(mosquitto, agents, tmp_path):
    """pi1 finishes its round while the broker is down, then is killed (its reply never left). After the
    broker and pi1 restart, pi1 re-sends the result from its outbox, the round counts it once, and the
    acknowledgement empties the outbox."""
    from coordinator import broker as broker_mod
    from coordinator.session import Session
    from coordinator.store import Store

    procs = start_fleet(agents, mosquitto.url, 2, fleet="ob")
    outbox = tmp_path / "agent-pi1" / "outbox"
    s = Session(mosquitto.url, "ob", Store(tmp_path / "home"), long_running=True, offline_grace_s=60).start(10)
    assert s.wait_for(lambda rows: sum(r["state"] == "online" and r["caps"] is not None for r in rows) == 2, 30)
    result: dict = {}
    worker = threading.Thread(
        target=lambda: result.update(
            train(
                TrainConfig(rounds=1, sparsity=0.5, local_epochs=6, seed=2, round_timeout_s=240),
                s,
                s.store,
                Reporter(quiet=True),
            )
        ),
        daemon=True,
    )
    phases: list = []  # pi1's progress; "training" comes once it has fetched everything it needs
    watcher = raw_client(
        mosquitto.url, lambda c, u, m: phases.append((serde.decode(Reply, m.payload).result or {}).get("phase"))
    )
    watcher.subscribe(topics.device("ob", "pi1", "reply"), 1)
    worker.start()
    assert wait_until(lambda: "training" in phases, 120), phases
    watcher.loop_stop()
    mosquitto.stop()  # the broker goes away while pi1 trains
    assert wait_until(lambda: list(outbox.glob("*.json")), 120), "pi1 did not finish its round"
    procs[1].kill9()  # ... and pi1 dies before anyone heard its result
    restarted = broker_mod.start(
        "mosquitto", "127.0.0.1", mosquitto.port, tmp_path / "broker2", log_file=tmp_path / "broker2.log"
    )
    try:
        agents(
            mosquitto.url,
            "pi1",
            "ob",
            "--data",
            "digits",
            "--data-shard",
            "1/2",
            "--train-threads",
            "1",
            "--heartbeat-s",
            "1",
            "--keepalive-s",
            "5",
        )
        worker.join(300)
        assert result.get("state") == "done", result
        row = s.store.rounds(result["run_id"])[0]
        assert row["clients_ok"] == 2 and row["failures"] == 0, row["failure_reasons"]
        ok = [c["device_id"] for c in s.store.client_rounds(result["run_id"]) if c["ok"]]
        assert sorted(ok) == ["pi0", "pi1"]  # each (device, round) once
        assert wait_until(lambda: not list(outbox.glob("*.json")), 20)  # acknowledged, dropped
    finally:
        s.close()
        restarted.stop()


def test_structured_pruning_across_the_fleet(mosquitto, agents, session_factory):
    """--structured 0.5: the fleet's activation statistics rank units, the model shrinks in two steps
    (rounds 1 and 2) with a round of recovery training after, agents continue on the new architecture, and weight
    pruning sparsifies what remains."""
    start_fleet(agents, mosquitto.url, 2, fleet="st")
    s = session_factory(mosquitto.url, "st", long_running=True)
    assert s.wait_for(lambda rows: sum(r["state"] == "online" and r["caps"] is not None for r in rows) == 2, 30)
    cfg = TrainConfig(
        rounds=3, sparsity=0.5, local_epochs=2, seed=3, structured=0.5, structured_every=1, schedule="constant"
    )
    summary = train(cfg, s, s.store, Reporter(quiet=True))
    assert summary["state"] == "done", summary
    rounds = s.store.rounds(summary["run_id"])
    assert [r["clients_ok"] for r in rounds] == [2, 2, 2]
    archs = [r["architecture"] for r in rounds]
    assert archs[0] == {"conv1": 24, "conv2": 48, "fc1": 192, "logits": 10}  # step 1: 25% of units gone
    assert archs[1] == archs[2] == {"conv1": 16, "conv2": 32, "fc1": 128, "logits": 10}  # step 2: 50%; then recovery
    assert rounds[0]["params"] > rounds[1]["params"] and rounds[1]["flops"] < rounds[0]["flops"]
    assert rounds[-1]["units_removed"] == pytest.approx(0.5 * (32 + 64 + 256) / (32 + 64 + 256 + 10), abs=1e-3)
    assert rounds[-1]["sparsity"] == pytest.approx(0.5, abs=0.01)  # weight pruning on what remains
    assert summary["final_accuracy"] > 0.8, summary
    final = codec.decode((Path(summary["run_dir"]) / "final.ept").read_bytes())  # resume points carry the architecture
    assert json.loads(final.meta["arch"])["config"]["layers"][1]["config"]["filters"] == 16
    assert final.tensors[0].shape == (3, 3, 1, 16)
