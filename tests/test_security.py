"""The secure fleet against a real Mosquitto: TLS, per-device certificates, the ACL matrix.

Negative cells use MQTT's per-connection ordering instead of sleeps: a client
publishes the forbidden messages and then one it is allowed to send; once the
allowed one has arrived, a forbidden one that the broker let through would
already have arrived too.
"""

from __future__ import annotations

import queue
import ssl
import threading

import paho.mqtt.client as mqtt
import pytest

from coordinator import broker as broker_mod
from coordinator import pki
from edge_agent.protocol import topics

FLEET = "sec"
pytestmark = pytest.mark.skipif(broker_mod.mosquitto_path() is None, reason="mosquitto not installed")


def t(device: str, channel: str) -> str:
    return topics.device(FLEET, device, channel)


class Client:
    """A raw MQTT 3.1.1 client with one identity; records what it receives."""

    def __init__(self, port: int, ident: pki.Identity | None, ca: str | None = None, tls: bool = True):
        self.got: queue.Queue = queue.Queue()
        self.connected = threading.Event()
        self.refused: str | None = None
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        if tls:
            self.c.tls_set(
                ca_certs=ca or (str(ident.ca) if ident else None),
                certfile=str(ident.cert) if ident else None,
                keyfile=str(ident.key) if ident else None,
            )
        self.c.on_connect = lambda c, u, f, rc, p=None: (
            self.connected.set() if rc == 0 else setattr(self, "refused", str(rc))
        )
        self.c.on_message = lambda c, u, m: self.got.put((m.topic, m.payload))
        try:
            self.c.connect("127.0.0.1", port, keepalive=10)
        except (ssl.SSLError, OSError) as exc:
            self.refused = f"{type(exc).__name__}: {exc}"
            return
        self.c.loop_start()
        self.connected.wait(5)

    def sub(self, *filters: str) -> None:
        done = threading.Event()
        self.c.on_subscribe = lambda *a: done.set()
        self.c.subscribe([(f, 1) for f in filters])
        assert done.wait(5)

    def pub(self, topic: str, payload: bytes) -> None:
        self.c.publish(topic, payload, qos=1).wait_for_publish(5)

    def until(self, payload: bytes, timeout: float = 5.0) -> list[tuple[str, bytes]]:
        """Everything received up to and including ``payload``."""
        seen = []
        while True:
            item = self.got.get(timeout=timeout)
            seen.append(item)
            if item[1] == payload:
                return seen

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    pki.init(home)
    ids = {"coord": pki.identity(home), "A": pki.issue(home, "dev-A"), "B": pki.issue(home, "dev-B")}
    rogue_home = tmp_path_factory.mktemp("rogue")
    pki.init(rogue_home)
    ids["rogue"] = pki.issue(rogue_home, "dev-A")  # right name, wrong CA
    work = tmp_path_factory.mktemp("broker")
    b = broker_mod.start("mosquitto", "127.0.0.1", 0, work, log_file=work / "log", pki_dir=pki.pki_dir(home))
    clients = {name: Client(b.port, ids[name]) for name in ("coord", "A", "B")}
    for name, c in clients.items():
        assert c.connected.is_set(), f"{name} could not connect: {c.refused}"
    yield b, ids, clients
    for c in clients.values():
        c.close()
    b.stop()


def test_key_files_are_private(fleet):
    _, ids, _ = fleet
    for ident in ids.values():
        assert ident.key.stat().st_mode & 0o777 == 0o600
    assert (ident.ca.parent / "ca.key").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("who", ["anonymous", "wrong_ca", "plain_tcp"])
def test_strangers_are_refused(fleet, who):
    b, ids, _ = fleet
    if who == "anonymous":
        c = Client(b.port, None, ca=str(ids["coord"].ca))
    elif who == "wrong_ca":
        c = Client(b.port, ids["rogue"], ca=str(ids["coord"].ca))
    else:
        c = Client(b.port, None, tls=False)
    try:
        assert not c.connected.is_set()
    finally:
        c.close()


def test_coordinator_commands_reach_their_device_only(fleet):
    _, _, cl = fleet
    cl["A"].sub(t("dev-A", "cmd"), t("dev-B", "cmd"))  # A also tries to read B's commands
    cl["B"].sub(t("dev-B", "cmd"))
    cl["coord"].pub(t("dev-B", "cmd"), b"for-B")
    cl["coord"].pub(t("dev-A", "cmd"), b"for-A")
    assert [p for _, p in cl["B"].until(b"for-B")] == [b"for-B"]  # coordinator -> B: delivered
    assert [p for _, p in cl["A"].until(b"for-A")] == [b"for-A"]  # A never saw B's command


def test_device_replies_and_updates_are_private(fleet):
    _, _, cl = fleet
    cl["A"].sub(t("dev-B", "reply"), t("dev-B", "data"), t("dev-B", "status"), t("dev-A", "cmd"))
    cl["coord"].sub(topics.device_filter(FLEET, "reply"), topics.device_filter(FLEET, "data"))
    cl["B"].pub(t("dev-B", "reply"), b"B-reply")
    cl["B"].pub(t("dev-B", "data"), b"B-update")
    got = [p for _, p in cl["coord"].until(b"B-update")]
    assert got == [b"B-reply", b"B-update"]  # the coordinator gets them
    cl["coord"].pub(t("dev-A", "cmd"), b"marker")
    assert [p for _, p in cl["A"].until(b"marker")] == [b"marker"]  # A read none of B's


def test_a_device_cannot_speak_for_others(fleet):
    _, _, cl = fleet
    cl["coord"].sub(topics.device_filter(FLEET, "status"), topics.device_filter(FLEET, "reply"))
    cl["B"].sub(t("dev-B", "cmd"), topics.coordinator_status(FLEET), topics.blob_filter(FLEET, "0" * 64))
    forged = [
        (t("dev-B", "status"), b"A-as-B-status"),  # as another device
        (t("dev-B", "reply"), b"A-as-B-reply"),
        (t("dev-B", "cmd"), b"A-commands-B"),  # as the coordinator
        (topics.coordinator_status(FLEET), b"A-as-coordinator"),
        (topics.blob_chunk(FLEET, "0" * 64, 0), b"A-sends-a-model"),
    ]
    for topic, payload in forged:
        cl["A"].pub(topic, payload)
    cl["A"].pub(t("dev-A", "status"), b"A-own-status")  # allowed, and sent last
    got = [p for _, p in cl["coord"].until(b"A-own-status")]
    assert got == [b"A-own-status"]
    cl["coord"].pub(t("dev-B", "cmd"), b"real-cmd")
    assert [p for _, p in cl["B"].until(b"real-cmd")] == [b"real-cmd"]


def test_wildcard_subscription_sees_only_what_the_acl_allows(fleet):
    _, _, cl = fleet
    snoop = Client(fleet[0].port, fleet[1]["A"])
    try:
        snoop.sub("edgeprune/#")
        cl["B"].pub(t("dev-B", "reply"), b"B-secret")
        cl["coord"].pub(topics.blob_chunk(FLEET, "1" * 64, 0), b"broadcast")
        cl["coord"].pub(t("dev-A", "cmd"), b"A-cmd")
        got = [p for _, p in snoop.until(b"A-cmd")]
        assert b"B-secret" not in got and b"broadcast" in got and got[-1] == b"A-cmd"
    finally:
        snoop.close()


def test_agent_and_coordinator_work_over_tls(fleet, agents, tmp_path):
    """The real agent and Session with their certificates: online, ping answered."""
    from coordinator.session import Session

    b, ids, _ = fleet
    a = agents(
        b.url,
        "dev-A",
        FLEET,
        "--tls-ca",
        str(ids["A"].ca),
        "--tls-cert",
        str(ids["A"].cert),
        "--tls-key",
        str(ids["A"].key),
    )
    coord = ids["coord"]
    with Session(b.url, FLEET, tls_files=(str(coord.ca), str(coord.cert), str(coord.key))).start(10) as s:
        assert s.wait_online(1, 20) == ["dev-A"], a.log_text()[-2000:]
        assert s.call("dev-A", "ping", timeout_s=10).ok


# -- signatures and replays (independent of TLS: a plain Mosquitto here) ----------------------------


def _raw(url_port: int):
    got: queue.Queue = queue.Queue()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    c.on_message = lambda cl, u, m: got.put(m.payload)
    c.connect("127.0.0.1", url_port)
    c.loop_start()
    return c, got


def _error_for(got: queue.Queue, request_id: str, timeout: float = 10.0):
    import time as _t

    from edge_agent.protocol import serde
    from edge_agent.protocol.messages import Reply

    end = _t.monotonic() + timeout
    while _t.monotonic() < end:
        try:
            r = serde.decode(Reply, got.get(timeout=0.5))
        except queue.Empty:
            continue
        if r.id == request_id and r.kind in ("error", "result"):
            return r
    raise AssertionError(f"no reply to {request_id}")


def test_signed_commands_replies_and_replays(mosquitto, agents, tmp_path):
    import time as _t

    from coordinator.session import Session
    from edge_agent.protocol import serde, signing
    from edge_agent.protocol.messages import Command

    home = tmp_path / "home"
    pki.init(home)
    dev = pki.issue(home, "dev-S")
    pki.issue(home, "dev-W")
    sign_key, device_keys = pki.signing_keys(home)
    keys = ["--sign-key", str(dev.sign_key), "--coordinator-key", str(dev.coordinator_pub)]
    state = tmp_path / "agent-dev-S"
    a = agents(mosquitto.url, "dev-S", FLEET, *keys)
    wrong = agents(mosquitto.url, "dev-W", FLEET, "--sign-key", str(dev.sign_key))  # signs with dev-S's key
    unsigned = agents(mosquitto.url, "dev-U", FLEET)
    with Session(mosquitto.url, FLEET, sign_key=sign_key, device_keys=device_keys).start(10) as s:
        assert set(s.wait_online(3, 20)) == {"dev-S", "dev-W", "dev-U"}
        assert s.call("dev-S", "ping", timeout_s=10).ok  # signed both ways: works
        for bad in ("dev-W", "dev-U"):  # replies that do not verify
            r = s.call(bad, "ping", timeout_s=10)
            assert r.error_code == "bad_signature", r
        assert s.stats.rejected_reasons.get("bad_signature", 0) >= 2

    raw, got = _raw(mosquitto.port)
    raw.subscribe(topics.device(FLEET, "dev-S", "reply"), qos=1)
    _t.sleep(0.3)
    cmd_topic = topics.device(FLEET, "dev-S", "cmd")
    good = signing.sign(Command(id="r-good", cmd="ping", ts=_t.time(), to="dev-S"), sign_key)
    cases = {
        "r-unsigned": (serde.encode(Command(id="r-unsigned", cmd="ping", ts=_t.time(), to="dev-S")), "bad_signature"),
        "r-tampered": (
            serde.encode(
                signing.sign(Command(id="r-tampered", cmd="ping", ts=_t.time(), to="dev-S"), sign_key)
            ).replace(b'"ping"', b'"bench"'),
            "bad_signature",
        ),
        "r-foreign": (
            serde.encode(
                signing.sign(Command(id="r-foreign", cmd="ping", ts=_t.time(), to="dev-S"), signing.new_key())
            ),
            "bad_signature",
        ),
        "r-old": (
            serde.encode(signing.sign(Command(id="r-old", cmd="ping", ts=_t.time() - 3600, to="dev-S"), sign_key)),
            "replayed",
        ),
        # a genuine command for another device, re-aimed at this one
        "r-aimed": (
            serde.encode(signing.sign(Command(id="r-aimed", cmd="ping", ts=_t.time(), to="dev-W"), sign_key)),
            "rejected",
        ),
    }
    raw.publish(cmd_topic, serde.encode(good), qos=1)
    assert _error_for(got, "r-good").kind == "result"
    raw.publish(cmd_topic, serde.encode(good), qos=1)  # the same signed bytes again
    assert _error_for(got, "r-good").error_code == "replayed"
    for rid, (payload, code) in cases.items():
        raw.publish(cmd_topic, payload, qos=1)
        assert _error_for(got, rid).error_code == code, rid

    # a restart does not reopen the door: used request ids are kept on disk
    a.terminate()
    a2 = agents(mosquitto.url, "dev-S", FLEET, *keys)
    assert (state / "seen_requests").read_text().split().count("r-good") == 1
    deadline = _t.monotonic() + 20
    while _t.monotonic() < deadline:  # wait until the restarted agent is subscribed
        raw.publish(cmd_topic, serde.encode(good), qos=1)
        try:
            r = _error_for(got, "r-good", timeout=1.0)
            break
        except AssertionError:
            continue
    assert r.error_code == "replayed"
    assert a2.alive() and wrong.alive() and unsigned.alive()
    raw.loop_stop()
    raw.disconnect()
