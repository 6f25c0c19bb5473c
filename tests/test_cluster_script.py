"""scripts/cluster: the clustered brokers it starts really act as one broker (Aedes + Redis) or as a bridged
laptop/site pair (Mosquitto), and kill/status/restart/stop do what failover tests rely on."""

from __future__ import annotations

import select
import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from tests.conftest import wait_until
from tests.helpers.clusters import cluster_command, cluster_unavailable, running_cluster

pytestmark = pytest.mark.cluster

# (publishing node, receiving node) pairs, per kind: across the cluster, and both ways across the bridge
ROUTES = {
    "aedes": {"nodes": 3, "live": [("C", "B")], "retained": [("A", "C")], "will": [("C", "A")]},
    "bridge": {
        "nodes": 2,
        "live": [("A", "B"), ("B", "A")],
        "retained": [("A", "B"), ("B", "A")],
        "will": [("B", "A")],
    },
}


def _skip_unless_available(kind: str) -> None:
    reason = cluster_unavailable(kind)
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module", params=sorted(ROUTES))
def cluster(request, tmp_path_factory):
    """One cluster per kind for the tests below that leave it running (kill restarts what it kills)."""
    _skip_unless_available(request.param)
    with running_cluster(request.param, ROUTES[request.param]["nodes"], tmp_path_factory.mktemp(request.param)) as c:
        yield c


class Client:
    """A paho MQTT 3.1.1 client that records what it receives."""

    def __init__(self, url: str, name: str, clean: bool = True):
        host, port = url.split("//")[1].split(":")
        self.messages: list[mqtt.MQTTMessage] = []
        self.subscribed = threading.Event()
        self.c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"{name}-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv311,
            clean_session=clean,
        )
        self.c.on_message = lambda _c, _u, m: self.messages.append(m)
        self.c.on_subscribe = lambda *_a: self.subscribed.set()
        self.c.connect(host, int(port), keepalive=10)
        self.c.loop_start()

    def subscribe(self, topic: str) -> None:
        self.subscribed.clear()
        self.c.subscribe(topic, qos=1)
        assert self.subscribed.wait(10), f"no SUBACK for {topic}"

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def received(self, topic: str) -> list[mqtt.MQTTMessage]:
        return [m for m in self.messages if m.topic == topic]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def _topic(what: str) -> str:
    return f"edgeprune/test-cluster/{what}/{uuid.uuid4().hex[:8]}"


def test_qos1_message_crosses_nodes(cluster):
    for src, dst in ROUTES[cluster.kind]["live"]:
        topic = _topic("live")
        sub, pub = Client(cluster.url(dst), "sub"), Client(cluster.url(src), "pub")
        try:
            sub.subscribe(topic)
            pub.publish(topic, b"hello")
            assert wait_until(lambda: sub.received(topic), 10), f"{src} -> {dst}: nothing arrived"
            (msg,) = sub.received(topic)
            assert (msg.payload, msg.qos) == (b"hello", 1)
        finally:
            sub.close()
            pub.close()


def test_retained_message_reaches_a_later_subscriber_on_another_node(cluster):
    for src, dst in ROUTES[cluster.kind]["retained"]:
        topic = _topic("retained")
        pub = Client(cluster.url(src), "pub")
        pub.publish(topic, b"kept", retain=True)
        pub.close()

        def later_subscriber_gets_it():
            # a bridge forwards the message a moment after the publish: until then a subscriber on the other
            # side gets nothing (or, subscribed in time, a live copy without the retain flag), so try afresh
            late = Client(cluster.url(dst), "late")
            try:
                late.subscribe(topic)
                return wait_until(lambda: [m for m in late.received(topic) if m.retain], 0.5)
            finally:
                late.close()

        (msg,) = wait_until(later_subscriber_gets_it, 10) or [None]
        assert msg is not None, f"{src} -> {dst}: retained message not delivered"
        assert msg.payload == b"kept"


def test_will_of_a_killed_client_crosses_nodes(cluster):
    for src, dst in ROUTES[cluster.kind]["will"]:
        topic = _topic("will")
        host, port = cluster.url(src).split("//")[1].split(":")
        watcher = Client(cluster.url(dst), "watcher")
        watcher.subscribe(topic)
        victim = subprocess.Popen(
            [
                sys.executable,
                "-c",
                textwrap.dedent(f"""
            import sys, time
            import paho.mqtt.client as mqtt
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="victim", protocol=mqtt.MQTTv311)
            c.will_set({topic!r}, b"gone", qos=1)
            c.on_connect = lambda *a: print("connected", flush=True)
            c.connect({host!r}, {port}, keepalive=10)
            c.loop_forever()
            """),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert select.select([victim.stdout], [], [], 15)[0], "the victim client did not connect"
            assert victim.stdout.readline().strip() == "connected"
            assert not watcher.received(topic)
            victim.kill()  # no DISCONNECT: the broker must publish the Will
            victim.wait(10)
            assert wait_until(lambda: watcher.received(topic), 10), f"{src} -> {dst}: no Will"
            assert watcher.received(topic)[0].payload == b"gone"
        finally:
            if victim.poll() is None:
                victim.kill()
            victim.stdout.close()
            watcher.close()


def _pid_running(pid: int) -> bool:
    """Whether pid is a live process (a zombie, dead but not yet reaped by init, is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _crosses(src_url: str, dst_url: str, payload: bytes) -> bool:
    topic = _topic("crossing")
    sub, pub = Client(dst_url, "sub"), Client(src_url, "pub")
    try:
        sub.subscribe(topic)
        pub.publish(topic, payload)
        return bool(wait_until(lambda: sub.received(topic), 10))
    finally:
        sub.close()
        pub.close()


def test_kill_shows_the_node_dead_and_restart_brings_it_back(cluster):
    before = {n["name"]: n for n in cluster.status()["nodes"]}
    cluster.kill("A")
    assert not _pid_running(before["A"]["pid"])
    status = {n["name"]: n for n in cluster.status()["nodes"]}
    assert status["A"]["alive"] is False
    assert all(n["alive"] for name, n in status.items() if name != "A")
    if cluster.kind == "aedes":
        assert _crosses(cluster.url("C"), cluster.url("B"), b"still here"), "B and C no longer form a cluster"
    else:  # the site queues for the laptop while it is away (cleansession false)
        queued = _topic("queued")
        site = Client(cluster.url("B"), "site")
        site.publish(queued, b"while away", retain=True)
        site.close()

    cluster.restart("A")
    after = {n["name"]: n for n in cluster.status()["nodes"]}
    assert after["A"]["alive"] and after["A"]["url"] == before["A"]["url"]
    assert after["A"]["pid"] != before["A"]["pid"]
    assert _crosses(cluster.url("A"), cluster.url("B"), b"back"), "restarted node A does not reach B"
    if cluster.kind == "bridge":
        laptop = Client(cluster.url("A"), "laptop")
        laptop.subscribe(queued)
        assert wait_until(lambda: laptop.received(queued), 10), "the site did not deliver what it queued"
        laptop.close()


@pytest.mark.parametrize("kind", sorted(ROUTES))
def test_stop_leaves_no_process_behind(kind, tmp_path):
    _skip_unless_available(kind)
    with running_cluster(kind, ROUTES[kind]["nodes"], tmp_path) as c:
        state = c.status()
        pids = [n["pid"] for n in state["nodes"]] + [
            v["pid"] for v in state.values() if isinstance(v, dict) and "pid" in v
        ]
        assert len(pids) == ROUTES[kind]["nodes"] + (1 if kind == "aedes" else 0)  # aedes: + redis-server
        assert all(_pid_running(p) for p in pids)
        stopped = c.stop()
        assert sorted(stopped["stopped_pids"]) == sorted(pids)
        assert not [p for p in pids if _pid_running(p)]
        assert not (tmp_path / "state.json").exists()
    assert cluster_command("stop", "--dir", str(tmp_path))["stopped_pids"] == []  # idempotent
    with pytest.raises(RuntimeError, match="no_cluster"):
        cluster_command("status", "--dir", str(tmp_path))
