"""One MQTT connection with jittered exponential reconnect, used by both sides.

paho-mqtt's own reconnect doubles its delay without jitter, so a restarted
broker would see the whole fleet reconnect in lock-step. Here paho's automatic
reconnect is off and :class:`Link` runs its own loop: connect, run the network
loop until the connection drops, wait a jittered backoff, repeat. Subscriptions
are remembered and renewed after every reconnect.

Only MQTT 3.1.1 is used: the embedded broker (amqtt) refuses MQTT 5.
"""

from __future__ import annotations

import logging
import random
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlparse

import paho.mqtt.client as mqtt

from .protocol.constants import DEFAULT_KEEPALIVE_S, QOS_CONTROL

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool = False

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """``mqtt://HOST[:PORT]`` (plain, default 1883) or ``mqtts://HOST[:PORT]`` (TLS, default 8883)."""
    if "://" not in url:
        url = "mqtt://" + url
    parsed = urlparse(url)
    if parsed.scheme not in ("mqtt", "tcp", "mqtts", "ssl"):
        raise ValueError(f"unsupported broker URL scheme {parsed.scheme!r} in {url!r}; use mqtt:// or mqtts://")
    tls = parsed.scheme in ("mqtts", "ssl")
    if not parsed.hostname:
        raise ValueError(f"broker URL {url!r} has no host")
    try:
        port = parsed.port or (8883 if tls else 1883)
    except ValueError:
        raise ValueError(f"broker URL {url!r} has an invalid port") from None
    return BrokerAddress(parsed.hostname, port, tls)


class Backoff:
    """Exponential backoff with 'equal jitter': half the delay fixed, half random."""

    def __init__(self, min_s: float = 0.5, max_s: float = 30.0, rng: random.Random | None = None):
        if min_s <= 0 or max_s < min_s:
            raise ValueError("need 0 < min_s <= max_s")
        self.min_s, self.max_s = min_s, max_s
        self.attempt = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        cap = min(self.max_s, self.min_s * (2 ** self.attempt))
        self.attempt += 1
        return cap / 2 + self._rng.uniform(0, cap / 2)

    def reset(self) -> None:
        self.attempt = 0


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    retain: bool = True
    qos: int = QOS_CONTROL


class Link:
    """A supervised MQTT 3.1.1 connection.

    ``on_connect`` runs after every (re)connect, after subscriptions are renewed;
    ``on_message(topic, payload, retained)`` runs on the network thread and must
    not block. ``retained`` is true only for a stored message replayed because we
    just subscribed (MQTT 3.1.1 clears the flag on live forwards), so it tells old
    state from live traffic.
    """

    def __init__(
        self,
        broker_url: str,
        client_id: str,
        *,
        on_message: Callable[[str, bytes, bool], None],
        on_connect: Callable[[], None] | None = None,
        will: Will | None = None,
        keepalive_s: int = DEFAULT_KEEPALIVE_S,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
        max_inflight: int = 100,
        name: str = "link",
        tls_files: tuple[str, str, str] | None = None,
    ):
        self.address = parse_broker_url(broker_url)
        self._on_message_cb = on_message
        self._on_connect_cb = on_connect
        self.keepalive_s = keepalive_s
        self.backoff = Backoff(reconnect_min_s, reconnect_max_s)
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._subs: dict[str, int] = {}
        self._subs_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._name = name
        self.connect_count = 0
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=True,
            reconnect_on_failure=False,
        )
        self.client.max_inflight_messages_set(max_inflight)
        self.client.max_queued_messages_set(0)
        if self.address.tls:
            # mutual TLS with the fleet's CA (edgeprune pki), else the system CAs and no client certificate
            ca, cert, key = tls_files or (None, None, None)
            self.client.tls_set(ca_certs=ca or None, certfile=cert or None, keyfile=key or None)
        if will is not None:
            self.client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        self.client.on_connect = self._handle_connect
        self.client.on_disconnect = self._handle_disconnect
        self.client.on_message = self._handle_message

    # -- lifecycle -----------------------------------------------------
    def start(self, wait_s: float | None = None) -> bool:
        """Start the network thread (once: a second thread on the same client would connect twice
        under one client id, and the broker would keep kicking one for the other); optionally wait
        until connected. Returns connected state."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name=f"mqtt-{self._name}", daemon=True)
            self._thread.start()
        if wait_s is not None:
            return self.connected.wait(wait_s)
        return self.connected.is_set()

    def stop(self, final: list[tuple[str, bytes, bool]] = (), timeout_s: float = 3.0) -> None:
        """Publish ``final`` (topic, payload, retain) messages, then disconnect cleanly."""
        if self.connected.is_set():
            infos = [self.client.publish(t, p, qos=QOS_CONTROL, retain=r) for t, p, r in final]
            for info in infos:
                try:
                    info.wait_for_publish(timeout_s)
                except (RuntimeError, ValueError):
                    pass
        self._stop.set()
        self.client.disconnect()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.client.connect(self.address.host, self.address.port, keepalive=self.keepalive_s)
            except (OSError, ValueError) as exc:
                delay = self.backoff.next_delay()
                log.info("%s: cannot reach broker %s (%s); retrying in %.1f s", self._name, self.address.url, exc, delay)
                self._stop.wait(delay)
                continue
            self.client.loop_forever()  # returns when the connection is lost (reconnect_on_failure=False)
            self.connected.clear()
            if self._stop.is_set():
                break
            delay = self.backoff.next_delay()
            log.info("%s: connection lost; reconnecting in %.1f s", self._name, delay)
            self._stop.wait(delay)

    # -- callbacks -----------------------------------------------------
    def _handle_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        if reason_code.is_failure:
            log.warning("%s: broker refused connection: %s", self._name, reason_code)
            return
        self.backoff.reset()
        self.connect_count += 1
        sock = client.socket()
        if isinstance(sock, socket.socket):
            # Small QoS-1 messages otherwise wait ~40 ms on Nagle + delayed ACK at every hop.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._subs_lock:
            subs = list(self._subs.items())
        for topic, qos in subs:
            client.subscribe(topic, qos)
        self.connected.set()
        if self._on_connect_cb is not None:
            try:
                self._on_connect_cb()
            except Exception:  # a bug in a callback must not kill the network thread
                log.exception("%s: on_connect callback failed", self._name)

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties=None) -> None:
        self.connected.clear()

    def _handle_message(self, client, userdata, message) -> None:
        try:
            self._on_message_cb(message.topic, message.payload, bool(message.retain))
        except Exception:
            log.exception("%s: message handler failed on %s", self._name, message.topic)

    # -- operations ----------------------------------------------------
    def publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = QOS_CONTROL) -> mqtt.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=qos, retain=retain)

    def subscribe(self, topic: str, qos: int = QOS_CONTROL) -> None:
        with self._subs_lock:
            self._subs[topic] = qos
        if self.connected.is_set():
            self.client.subscribe(topic, qos)

    def unsubscribe(self, topic: str) -> None:
        with self._subs_lock:
            self._subs.pop(topic, None)
        if self.connected.is_set():
            self.client.unsubscribe(topic)
