"""The fleet on clustered brokers, for real: a 3-node Aedes cluster sharing one Redis, a laptop broker
bridged to a site broker (Mosquitto), and a 3-node RabbitMQ cluster with password authentication.

The coordinator sits on one node and the agents on the others, so every command, reply, presence
message and blob chunk crosses the cluster. On Aedes the coordinator's node is killed in the middle
of a training round: coordinator and agents fail over and the round completes with every update
counted once. Brokers come from ./scripts/cluster (the tool users run), on free loopback ports.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from coordinator.progress import Reporter
from coordinator.session import Session
from coordinator.store import Store
from coordinator.train import TrainConfig, train
from edge_agent.protocol import serde, topics

from .conftest import raw_client, wait_until
from .helpers.clusters import cluster_unavailable, running_cluster

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def _skip_unless(kind: str) -> None:
    reason = cluster_unavailable(kind)
    if reason:
        pytest.skip(f"{kind} cluster: {reason}")


def _creds(cluster) -> tuple[list[str], dict]:
    if not cluster.username:
        return [], {}
    secret_env = {"EDGEPRUNE_USERNAME": cluster.username, "EDGEPRUNE_PASSWORD": cluster.password}
    return [], secret_env


def _session(url: str, tmp_path, cluster, **kw) -> Session:
    return Session(
        url,
        "cl",
        Store(tmp_path / "home"),
        long_running=True,
        offline_grace_s=60,
        username=cluster.username,
        password=cluster.password,
        **kw,
    ).start(20)


def _contract(s: Session, agents_by_id: dict, cluster, coordinator_url: str) -> None:
    """Presence, commands, garbage, blob broadcast and a Will, across nodes."""
    ids = sorted(agents_by_id)
    assert s.wait_for(
        lambda rows: sum(r["state"] == "online" and r["caps"] is not None for r in rows) >= len(ids), 60
    ), {d: a.log_text()[-1500:] for d, a in agents_by_id.items()}
    for dev in ids:
        reply = s.call(dev, "ping", timeout_s=10)
        assert reply.ok, (dev, reply.error)
    # garbage on a device's command topic, from another node: a typed error reply, the agent lives on
    c = raw_client(coordinator_url) if not cluster.username else None
    if c is not None:
        got = []
        s_replies = s._on_reply

        def spy(reply):
            got.append(reply)
            s_replies(reply)

        s._on_reply = spy
        c.publish(topics.device("cl", ids[0], "cmd"), b"\xff not json", qos=1).wait_for_publish(5)
        assert wait_until(lambda: any(r.kind == "error" and r.error_code == "malformed" for r in got), 10)
        s._on_reply = s_replies
        c.disconnect()
    assert s.call(ids[0], "ping", timeout_s=10).ok
    # a broadcast blob reaches devices on every other node (retained or, where the broker replays none, asked for)
    blob = os.urandom(600_000)
    ref = s.publish_blob(blob)
    for dev in ids:
        reply = s.call(dev, "blob_fetch", serde.encode_args(ref), timeout_s=60)
        assert reply.ok, (dev, reply.error)
    # kill -9 of a device: the Will (or, where a broker does not deliver it, the missed heartbeats) says so
    victim = agents_by_id[ids[-1]]
    victim.kill9()
    assert wait_until(lambda: s.state_of(s.views[ids[-1]]) in ("offline", "stale"), 30)


def _round_checks(s: Session, result: dict, devices: int, rounds: int) -> None:
    assert result.get("state") == "done", result
    rows = s.store.rounds(result["run_id"])
    assert [r["round"] for r in rows] == list(range(1, rounds + 1))
    assert all(r["clients_ok"] == devices and r["failures"] == 0 for r in rows), [r["failure_reasons"] for r in rows]
    ok = [(c["round"], c["device_id"]) for c in s.store.client_rounds(result["run_id"]) if c["ok"]]
    assert len(ok) == len(set(ok)) == devices * rounds  # each (device, round) once


def _start_agents(agents, urls_by_id: dict[str, str], env: dict, train: bool) -> dict:
    out = {}
    for i, (dev, url) in enumerate(sorted(urls_by_id.items())):
        extra = ["--data", "digits", "--data-shard", f"{i}/{len(urls_by_id)}", "--train-threads", "1"] if train else []
        out[dev] = agents(url, dev, "cl", *extra, env=env)
    return out


def test_aedes_cluster_fleet_and_a_round_that_survives_losing_a_node(tmp_path, agents):
    _skip_unless("aedes")
    with running_cluster("aedes", 3, tmp_path / "cluster") as cl:
        a, b, c = cl.urls
        # agents on B and C, one more on A; everyone lists the other nodes to fail over to
        members = {"pb": f"{b},{c}", "pc": f"{c},{b}", "pa": f"{a},{b},{c}"}
        procs = _start_agents(agents, members, {}, train=True)
        s = _session(f"{a},{b}", tmp_path, cl)
        try:
            assert s.wait_for(lambda rows: sum(r["state"] == "online" for r in rows) == 3, 60)
            result: dict = {}
            worker = threading.Thread(
                target=lambda: result.update(
                    train(
                        TrainConfig(
                            rounds=2, sparsity=0.5, local_epochs=3, seed=3, round_timeout_s=240, eval_data="digits"
                        ),
                        s,
                        s.store,
                        Reporter(quiet=True),
                    )
                ),
                daemon=True,
            )
            worker.start()
            assert wait_until(
                lambda: all(s.views[d].status and s.views[d].status.task == "train_round" for d in members), 180
            ), {d: p.log_text()[-1500:] for d, p in procs.items()}
            t_kill = time.monotonic()
            cl.kill("A")  # the coordinator's node, mid-round, with a device on it too
            assert wait_until(lambda: s.link.connected.is_set() and s.link.address.url == b, 30)
            failover_s = time.monotonic() - t_kill
            worker.join(600)
            _round_checks(s, result, devices=3, rounds=2)
            print(
                f"\naedes: coordinator back on node B {failover_s:.1f} s after node A was killed; "
                f"agent on A failovers: see its log"
            )
            assert "connection lost to " + a in procs["pa"].log_text() or "cannot reach " + a in procs["pa"].log_text()
            cl.restart("A")
            _contract(s, {d: procs[d] for d in ("pb", "pc")}, cl, b)
        finally:
            s.close()


def test_bridged_site_broker(tmp_path, agents):
    """A site broker (where the devices are) bridged to the laptop's broker."""
    _skip_unless("bridge")
    with running_cluster("bridge", 2, tmp_path / "bridge") as cl:
        laptop, site = cl.urls
        procs = _start_agents(agents, {"s1": site, "s2": site}, {}, train=True)
        s = _session(laptop, tmp_path, cl)
        try:
            assert s.wait_for(lambda rows: sum(r["state"] == "online" for r in rows) == 2, 60)
            result = train(
                TrainConfig(rounds=1, sparsity=0.5, local_epochs=2, seed=4, round_timeout_s=240),
                s,
                s.store,
                Reporter(quiet=True),
            )
            _round_checks(s, result, devices=2, rounds=1)
            _contract(s, procs, cl, laptop)
        finally:
            s.close()


def test_rabbitmq_cluster_with_passwords(tmp_path, agents):
    """RabbitMQ keeps retained messages per node and never gives them to wildcard subscriptions: the
    broadcast works through blob_want, presence through heartbeats and the announce handshake."""
    _skip_unless("rabbitmq")
    with running_cluster("rabbitmq", 3, tmp_path / "rabbit") as cl:
        a, b, c = cl.urls
        env = {"EDGEPRUNE_USERNAME": cl.username, "EDGEPRUNE_PASSWORD": cl.password}
        procs = _start_agents(agents, {"rb": b, "rc": c}, env, train=True)
        s = _session(a, tmp_path, cl)
        try:
            assert s.wait_for(lambda rows: sum(r["state"] == "online" for r in rows) == 2, 90), {
                d: p.log_text()[-1500:] for d, p in procs.items()
            }
            result = train(
                TrainConfig(rounds=1, sparsity=0.5, local_epochs=2, seed=4, round_timeout_s=240),
                s,
                s.store,
                Reporter(quiet=True),
            )
            _round_checks(s, result, devices=2, rounds=1)
            assert any("asking for" in p.log_text() for p in procs.values())  # the broadcast needed blob_want
            _contract(s, procs, cl, a)
        finally:
            s.close()
