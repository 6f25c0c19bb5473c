"""MQTT connections with jittered exponential reconnect and broker failover, used by both sides.

Threads (per :class:`Link`):

- the *supervisor* (``mqtt-<name>``) picks a broker from the list, hands it to
  paho, waits for the connection to end, waits a jittered backoff and starts
  the next connection. It never touches the socket.
- paho's own network thread (``loop_start()``), one per connection, is the only
  thread that reads or writes the socket. Every other thread's ``publish``,
  ``subscribe`` and acknowledgement only queues a packet and wakes it.

The second point is the reason for this design. paho records a network thread
only in ``loop_start()``; a client driven by ``loop_forever()`` on a thread of
our own had none, so every publishing thread wrote the socket itself, and
``_packet_write`` sends part of a packet and puts the rest back without a lock:
a 4-byte PUBACK from one thread landed inside a 107 KB chunk being sent by
another (a corrupted blob on an 8 Mbit link). paho's own reconnect doubles its
delay without jitter, so it stays off (``reconnect_on_failure=False``) and the
supervisor restarts paho's loop for every connection. Subscriptions are
remembered and renewed after every reconnect.

Only MQTT 3.1.1 is used: the embedded broker (amqtt) refuses MQTT 5.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import paho.mqtt.client as mqtt

from ..protocol.constants import DEFAULT_KEEPALIVE_S, QOS_CONTROL

if TYPE_CHECKING:
    from .memlink import MemoryLink

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BrokerAddress:
    host: str  # for memory://NAME, the name
    port: int
    tls: bool = False
    memory: bool = False  # an in-process broker (edge_agent.common.memlink), for tests

    @property
    def url(self) -> str:
        if self.memory:
            return f"memory://{self.host}"
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    @property
    def loopback(self) -> bool:
        if self.memory or self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def parse_broker_url(url: str) -> BrokerAddress:
    """``mqtt://HOST[:PORT]`` (plain, default 1883) or ``mqtts://HOST[:PORT]`` (TLS, default 8883);
    ``memory://NAME`` is an in-process broker for tests."""
    given = url
    if "://" not in url:
        url = "mqtt://" + url
    if url.startswith("memory://"):
        name = url[len("memory://") :]
        if not name or not name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"broker URL {given!r}: memory://NAME takes a name of letters, digits, - and _")
        return BrokerAddress(name, 0, memory=True)
    parsed = urlparse(url)
    if parsed.scheme not in ("mqtt", "tcp", "mqtts", "ssl"):
        raise ValueError(f"unsupported broker URL scheme {parsed.scheme!r} in {given!r}; use mqtt:// or mqtts://")
    tls = parsed.scheme in ("mqtts", "ssl")
    if not parsed.hostname:
        raise ValueError(f"broker URL {given!r} has no host")
    if parsed.username or parsed.password:
        raise ValueError(f"broker URL {given!r} carries credentials; set the user name and password file instead")
    if parsed.path not in ("", "/") or parsed.query or parsed.fragment:
        raise ValueError(f"broker URL {given!r} has a path or query; use mqtt://HOST:PORT")
    try:
        port = parsed.port or (8883 if tls else 1883)
    except ValueError:
        raise ValueError(f"broker URL {given!r} has an invalid port") from None
    return BrokerAddress(parsed.hostname, port, tls)


def parse_broker_urls(urls: str | Sequence[str]) -> list[BrokerAddress]:
    """One URL, a comma-separated list, or a sequence of URLs: the brokers to try, in order."""
    items = urls.split(",") if isinstance(urls, str) else list(urls)
    addresses = [parse_broker_url(u.strip()) for u in items if u.strip()]
    if not addresses:
        raise ValueError("no broker URL given")
    if len({a.tls for a in addresses}) > 1:
        raise ValueError("broker URLs mix mqtt:// and mqtts://; a fleet uses one or the other")
    if any(a.memory for a in addresses) and len(addresses) > 1:
        raise ValueError("a memory:// broker cannot be part of a list")
    return addresses


def open_link(broker_url: str | Sequence[str], client_id: str, **options: Any) -> Link | MemoryLink:
    """A :class:`Link` to the brokers of ``broker_url``, or a :class:`~.memlink.MemoryLink` for ``memory://``."""
    if parse_broker_urls(broker_url)[0].memory:
        from .memlink import MemoryLink

        return MemoryLink(broker_url, client_id, **options)
    return Link(broker_url, client_id, **options)


def check_credentials(addresses: Sequence[BrokerAddress], password: str | None, force_plain: bool) -> None:
    """A password over plain TCP to another machine can be read by anyone on the path: refuse unless forced."""
    exposed = [a.url for a in addresses if password and not a.tls and not a.loopback]
    if exposed and not force_plain:
        raise ValueError(
            f"refusing to send a password over plain TCP to {', '.join(exposed)}: use mqtts:// "
            f"(or force it with the plain-password setting on a network you trust)"
        )


STABLE_CONNECTION_S = 5.0
"""A connection that lasted this long was working: after it drops, retry the same broker first, quickly.
One dropped sooner (refused after CONNACK, a broken cluster node) counts as an unreachable broker."""


class Backoff:
    """Exponential backoff with 'equal jitter': half the delay fixed, half random."""

    def __init__(self, min_s: float = 0.5, max_s: float = 30.0, rng: random.Random | None = None):
        if min_s <= 0 or max_s < min_s:
            raise ValueError("need 0 < min_s <= max_s")
        self.min_s, self.max_s = min_s, max_s
        self.attempt = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        cap = min(self.max_s, self.min_s * (2**self.attempt))
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


class PublishTimeout(TimeoutError):
    """The broker did not acknowledge a QoS-1 publish in time."""


def wait_published(info: mqtt.MQTTMessageInfo, timeout_s: float, what: str = "message") -> None:
    """Wait for the broker's PUBACK; a timeout or a lost connection raises instead of passing silently."""
    try:
        info.wait_for_publish(timeout_s)
    except (RuntimeError, ValueError) as exc:  # paho: queue full / not connected and never will be
        raise PublishTimeout(f"{what} was not published: {exc}") from None
    if not info.is_published():
        raise PublishTimeout(f"{what} not acknowledged by the broker within {timeout_s:.0f} s")


def stop_loop(client: mqtt.Client) -> None:
    """``client.loop_stop()``, safe against paho's own race: its network thread sets ``_thread = None`` as it
    exits, and ``loop_stop`` reads ``_thread`` twice (``is None``, then ``.join()``), so a thread ending in
    between raised AttributeError and killed the supervisor that called it (seen with 1,000 agents on a
    loaded machine: that agent never reconnected). The thread is taken once and joined here."""
    thread = getattr(client, "_thread", None)
    try:
        client.loop_stop()
    except AttributeError:
        pass
    if thread is not None and thread is not threading.current_thread():
        thread.join()


class Link:
    """A supervised MQTT 3.1.1 connection to the first reachable broker of a list.

    ``on_connect`` runs after every (re)connect, after subscriptions are renewed;
    ``on_message(topic, payload, retained)`` runs on the network thread and must
    not block. ``retained`` is true only for a stored message replayed because we
    just subscribed (MQTT 3.1.1 clears the flag on live forwards), so it tells old
    state from live traffic.

    Failover: a connection that could not be made moves on to the next broker of
    the list; a connection that was lost is retried once on the same broker first
    (a restart is more common than a dead node), then the list goes on.
    """

    def __init__(
        self,
        broker_url: str | Sequence[str],
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
        username: str | None = None,
        password: str | None = None,
        force_plain_password: bool = False,
    ):
        self.addresses = parse_broker_urls(broker_url)
        check_credentials(self.addresses, password, force_plain_password)
        self._index = 0
        self._base_client_id = client_id
        self._on_message_cb = on_message
        self._on_connect_cb = on_connect
        self.keepalive_s = keepalive_s
        self.backoff = Backoff(reconnect_min_s, reconnect_max_s)
        self.connected = threading.Event()
        self._ended = threading.Event()  # the current connection (or attempt) is over
        self._stop = threading.Event()
        self._subs: dict[str, int] = {}
        self._subs_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._name = name
        self.connect_count = 0
        self.failovers = 0
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=True,
            reconnect_on_failure=False,
        )
        self.client.max_inflight_messages_set(max_inflight)
        self.client.max_queued_messages_set(0)
        if username:
            self.client.username_pw_set(username, password or None)
        if self.addresses[0].tls:
            # mutual TLS with the fleet's CA (edgeprune pki), else the system CAs and no client certificate
            ca, cert, key = tls_files or (None, None, None)
            self.client.tls_set(ca_certs=ca or None, certfile=cert or None, keyfile=key or None)
        if will is not None:
            self.client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        self.client.on_connect = self._handle_connect
        self.client.on_connect_fail = self._handle_connect_fail
        self.client.on_disconnect = self._handle_disconnect
        self.client.on_message = self._handle_message

    @property
    def address(self) -> BrokerAddress:
        """The broker in use (or being tried)."""
        return self.addresses[self._index]

    @property
    def urls(self) -> str:
        return ",".join(a.url for a in self.addresses)

    def probe(self, timeout_s: float = 3.0) -> dict[str, str | None]:
        """Each broker's reachability by a plain TCP connect: None, or why not ('connection refused',
        'cannot resolve host ...', 'timed out'), so a caller can say so at once instead of retrying."""
        out: dict[str, str | None] = {}
        for a in self.addresses:
            try:
                socket.create_connection((a.host, a.port), timeout=timeout_s).close()
                out[a.url] = None
            except socket.gaierror as exc:
                out[a.url] = f"cannot resolve host {a.host!r} ({exc.strerror or exc})"
            except ConnectionRefusedError:
                out[a.url] = f"connection refused by {a.host}:{a.port} (nothing listens there)"
            except TimeoutError:
                out[a.url] = f"no answer from {a.host}:{a.port} within {timeout_s:.0f} s"
            except OSError as exc:
                out[a.url] = f"{a.host}:{a.port}: {exc.strerror or exc}"
        return out

    # -- lifecycle -----------------------------------------------------
    def start(self, wait_s: float | None = None) -> bool:
        """Start the supervisor (once: a second one on the same client would connect twice under one
        client id, and the broker would keep kicking one for the other); optionally wait until
        connected. Returns connected state."""
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
                    wait_published(info, timeout_s, "final message")
                except PublishTimeout as exc:
                    log.info("%s: %s", self._name, exc)
        self._stop.set()
        self.client.disconnect()  # paho's thread writes DISCONNECT and closes the socket
        self._ended.set()
        if self._thread is not None:
            self._thread.join(timeout_s + 2)

    def _run(self) -> None:
        while not self._stop.is_set():
            address = self.address
            self._ended.clear()
            was_connected = self.connect_count
            # One client id per broker of the list. A clustered broker may keep state under the id on the
            # node that died (RabbitMQ: a durable subscription queue homed there, and every reconnect under
            # that id elsewhere crashes); with clean sessions nothing is lost by a fresh id after failover.
            self.client._client_id = self._client_id_for(self._index)  # paho reads it at each CONNECT
            try:
                self.client.connect_async(address.host, address.port, keepalive=self.keepalive_s)
            except ValueError as exc:  # cannot happen for parsed addresses; never kill the supervisor
                log.error("%s: cannot use broker %s: %s", self._name, address.url, exc)
                self._stop.wait(self.backoff.next_delay())
                continue
            self.client.loop_start()
            while not self._ended.wait(1.0):
                if getattr(self.client, "_thread", True) is None:  # paho's thread died of something unexpected
                    break
            stop_loop(self.client)  # joins paho's thread: from here on nothing writes the old socket
            self.connected.clear()
            if self._stop.is_set():
                break
            lost = self.connect_count > was_connected
            stable = lost and time.monotonic() - self._connected_at >= STABLE_CONNECTION_S
            if stable:
                self.backoff.reset()  # it worked for a while: reconnect fast, and the same broker first
            else:  # unreachable, refused, or dropped us at once: the next broker of the list
                self._next_broker()
            delay = self.backoff.next_delay()
            log.info(
                "%s: %s %s; trying %s in %.1f s",
                self._name,
                "connection lost to" if lost else "cannot reach",
                address.url,
                self.address.url,
                delay,
            )
            self._stop.wait(delay)

    _connected_at = 0.0

    def _client_id_for(self, index: int) -> bytes:
        return (self._base_client_id if index == 0 else f"{self._base_client_id}-b{index}").encode()

    def _next_broker(self) -> None:
        if len(self.addresses) > 1:
            self._index = (self._index + 1) % len(self.addresses)
            self.failovers += 1

    # -- callbacks (paho's network thread) -----------------------------
    def _handle_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        if reason_code.is_failure:
            log.warning("%s: broker %s refused the connection: %s", self._name, self.address.url, reason_code)
            self._ended.set()
            return
        self._connected_at = time.monotonic()
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

    def _handle_connect_fail(self, client, userdata) -> None:
        # paho would retry by itself (no jitter, same broker): end this attempt; the supervisor decides
        client.disconnect()
        self._ended.set()

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties=None) -> None:
        self.connected.clear()
        self._ended.set()

    def _handle_message(self, client, userdata, message) -> None:
        try:
            self._on_message_cb(message.topic, message.payload, bool(message.retain))
        except Exception:
            log.exception("%s: message handler failed on %s", self._name, message.topic)

    # -- operations (any thread: they only queue for paho's thread) -----
    def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, qos: int = QOS_CONTROL
    ) -> mqtt.MQTTMessageInfo:
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
