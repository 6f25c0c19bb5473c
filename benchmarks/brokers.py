"""Rounds on every broker edgeprune supports, measured the same way in one run.

For each broker (a single Mosquitto as the baseline, a 3-node Aedes cluster sharing
one Redis, a laptop Mosquitto bridged to a site Mosquitto, a 3-node RabbitMQ cluster
with password authentication), from ./scripts/cluster on loopback ports: 12 simulated
devices (the real agent: own MQTT connection, presence, commands, chunked transfers,
outbox; a synthetic trainer, no TensorFlow) spread over the nodes, the coordinator on
node A, digits_cnn at 50% sparsity (1.03 MB broadcast per round), 3 rounds. Reported:
round wall time (mean of rounds 2-3), messages the coordinator sent and received per
round, the blob_want requests and re-sent chunks a broker needed (retained chunks it
did not deliver), every update counted once. On the clusters a second run kills node A
(the coordinator's and four devices' node) 1 s into round 1: the time until the
coordinator is connected to another node, and whether both rounds still complete with
all 12 devices.

    python benchmarks/brokers.py [--kinds mosquitto aedes bridge rabbitmq] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import ROOT, broker_mod, machine

from tests.helpers.clusters import cluster_unavailable, running_cluster  # noqa: E402

DEVICES = 12
ROUNDS = 3


def _placement(kind: str, urls: list[str]) -> list[str]:
    """The broker list each simulator process connects with: one process per node, failover to the others."""
    if kind == "bridge":
        return [urls[1]]  # every device at the site; the coordinator on the laptop broker
    return [",".join(urls[i:] + urls[:i]) for i in range(len(urls))]


def _simulators(lists: list[str], work: Path, delay: float, cluster) -> list[subprocess.Popen]:
    per = DEVICES // len(lists)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = []
    for i, brokers in enumerate(lists):
        cmd = [
            sys.executable,
            "-m",
            "edge_agent.simulate",
            "--broker",
            brokers,
            "--fleet",
            "bk",
            "--first",
            str(i * per),
            "--count",
            str(per),
            "--delay",
            str(delay),
            "--state-root",
            str(work / f"sim{i}"),
            "--heartbeat-s",
            "2",
            "--keepalive-s",
            "5",
        ]
        if cluster is not None and cluster.username:
            cmd += ["--username", cluster.username]
            env["EDGEPRUNE_PASSWORD"] = cluster.password
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT))
    for p in procs:
        line = p.stdout.readline()
        if not line:
            raise RuntimeError(f"a simulator exited with {p.wait()}")
    return procs


def _run(
    kind: str,
    coordinator_urls: str,
    lists: list[str],
    work: Path,
    cluster,
    *,
    rounds: int,
    delay: float,
    kill_at_s: float | None = None,
) -> dict:
    from coordinator.progress import Reporter
    from coordinator.session import Session
    from coordinator.store import Store
    from coordinator.train import TrainConfig, train

    procs = _simulators(lists, work, delay, cluster)
    s = Session(
        coordinator_urls,
        "bk",
        Store(work / "home"),
        long_running=True,
        offline_grace_s=60,
        username=cluster.username if cluster else None,
        password=cluster.password if cluster else None,
        keepalive_s=5,
    ).start(20)
    try:
        if not s.wait_for(lambda rows: sum(r["state"] == "online" for r in rows) >= DEVICES, 60):
            raise RuntimeError(f"only {len(s.online())}/{DEVICES} devices online on {kind}")
        out: dict = {}
        cfg = TrainConfig(
            rounds=rounds,
            sparsity=0.5,
            schedule="constant",
            eval_data=None,
            input_shape=(8, 8, 1),
            num_classes=10,
            round_timeout_s=300,
            seed=1,
        )
        before = (s.stats.messages_in, s.stats.messages_out)
        worker = threading.Thread(target=lambda: out.update(train(cfg, s, s.store, Reporter(quiet=True))))
        t0 = time.monotonic()
        worker.start()
        failover_s = None
        if kill_at_s is not None:
            while not any(v.status and v.status.task == "train_round" for v in list(s.views.values())):
                time.sleep(0.05)
            time.sleep(kill_at_s)
            connects = s.link.connect_count
            t_kill = time.monotonic()
            cluster.kill("A")
            while not (s.link.connected.is_set() and s.link.connect_count > connects):
                time.sleep(0.02)
            failover_s = time.monotonic() - t_kill
        worker.join()
        wall = time.monotonic() - t0
        rows = s.store.rounds(out["run_id"])
        ok = [(c["round"], c["device_id"]) for c in s.store.client_rounds(out["run_id"]) if c["ok"]]
        steady = [r["wall_s"] for r in rows[1:]] or [r["wall_s"] for r in rows]
        return {
            "state": out.get("state"),
            "rounds_done": len(rows),
            "clients_ok": [r["clients_ok"] for r in rows],
            "counted_once": len(ok) == len(set(ok)),
            "round_wall_s": round(sum(steady) / len(steady), 3),
            "train_wall_s": round(wall, 2),
            "messages_in_per_round": round((s.stats.messages_in - before[0]) / rounds),
            "messages_out_per_round": round((s.stats.messages_out - before[1]) / rounds),
            "blob_wants": s.stats.wants_in,
            "resent_chunks": s.stats.resent_chunks,
            "coordinator_failover_s": round(failover_s, 2) if failover_s is not None else None,
            "coordinator_broker_after": s.link.address.url,
        }
    finally:
        s.close()
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()


def measure(kind: str, work: Path) -> list[dict]:
    rows = []
    nodes = {"mosquitto": 1, "bridge": 2}.get(kind, 3)
    if kind == "mosquitto":
        b = broker_mod.start("mosquitto", "127.0.0.1", 0, work / "mq", log_file=work / "mq.log")
        try:
            r = _run(kind, b.url, [b.url] * 3, work / "run", None, rounds=ROUNDS, delay=1.0)
        finally:
            b.stop()
        rows.append({"configuration": "mosquitto (single node)", "broker": kind, "nodes": 1, **r})
    else:
        rows += _measure_cluster(kind, nodes, work)
    for row in rows:
        row["target"] = {"all_rounds_complete_with_every_device": True, "counted_once": True}
        row["target_met"] = (
            row["state"] == "done" and all(c == DEVICES for c in row["clients_ok"]) and row["counted_once"]
        )
    return rows


def _measure_cluster(kind: str, nodes: int, work: Path) -> list[dict]:
    rows = []
    with running_cluster(kind, nodes, work / "cluster") as cl:
        lists = _placement(kind, cl.urls)
        coordinator = cl.urls[0] if kind == "bridge" else f"{cl.urls[0]},{cl.urls[1]}"
        r = _run(kind, coordinator, lists, work / "run", cl, rounds=ROUNDS, delay=1.0)
        rows.append({"configuration": f"{kind} ({nodes} nodes)", "broker": kind, "nodes": nodes, **r})
    if kind in ("aedes", "rabbitmq"):
        with running_cluster(kind, nodes, work / "cluster2") as cl:
            lists = _placement(kind, cl.urls)
            r = _run(kind, f"{cl.urls[0]},{cl.urls[1]}", lists, work / "run2", cl, rounds=2, delay=4.0, kill_at_s=1.0)
            rows.append(
                {
                    "configuration": f"{kind} ({nodes} nodes), node A killed in round 1",
                    "broker": kind,
                    "nodes": nodes,
                    **r,
                }
            )
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kinds", nargs="+", default=["mosquitto", "aedes", "bridge", "rabbitmq"])
    p.add_argument("--json", action="store_true", help="print one JSON object per configuration")
    a = p.parse_args()
    rows = []
    for kind in a.kinds:
        reason = (
            cluster_unavailable(kind)
            if kind != "mosquitto"
            else (None if broker_mod.mosquitto_path() else "mosquitto not installed")
        )
        if reason:
            rows.append({"configuration": kind, "broker": kind, "skipped": reason})
            continue
        if not a.json:
            print(f"{kind}: running...", file=sys.stderr, flush=True)
        try:
            rows += measure(kind, Path(tempfile.mkdtemp(prefix=f"edgeprune-brokers-{kind}-")))
        except Exception as exc:  # a broker that fails is a result, not the end of the benchmark
            rows.append(
                {"configuration": kind, "broker": kind, "error": f"{type(exc).__name__}: {exc}", "target_met": False}
            )
    rows.append({"configuration": "machine", **machine()})
    if a.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print(
            f"{'configuration':<46} {'round':>7} {'msgs in/out per round':>22} {'wants':>6} {'resent':>7} "
            f"{'failover':>9}  result"
        )
        for r in rows:
            if "skipped" in r or "error" in r:
                print(f"{r['configuration']:<46} {r.get('skipped') or r.get('error')}")
            elif "round_wall_s" in r:
                fo = f"{r['coordinator_failover_s']:.2f}s" if r["coordinator_failover_s"] is not None else "-"
                print(
                    f"{r['configuration']:<46} {r['round_wall_s']:>6.2f}s {r['messages_in_per_round']:>10}/"
                    f"{r['messages_out_per_round']:<11} {r['blob_wants']:>6} {r['resent_chunks']:>7} {fo:>9}  "
                    f"{r['state']}, clients {r['clients_ok']}, {'met' if r['target_met'] else 'MISSED'}"
                )
    return 0 if all(r.get("target_met", True) for r in rows if "skipped" not in r) else 1


if __name__ == "__main__":
    sys.exit(main())
