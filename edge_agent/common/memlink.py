"""An in-memory broker and a :class:`~.link.Link` stand-in, for ``memory://NAME`` broker URLs.

Agents and sessions in one process that name the same ``memory://NAME`` talk through a
:class:`MemoryBroker` with the MQTT semantics edgeprune relies on: ``+``/``#`` filters,
retained messages (replayed with ``retained=True`` to a new subscription, cleared by an
empty retained payload), Wills published when a link is :meth:`~MemoryLink.kill`-ed
(not on a clean stop), and per-link delivery in publish order. There is no socket, no
QoS-1 re-delivery and no size limit: it exists so the round loop's policy and the fleet
contract get millisecond tests (the same tests also run against Mosquitto and the
embedded broker). It is not a broker for fleets.

Threads: each :class:`MemoryLink` has one delivery thread (``memlink-<name>``), the
only one that calls its ``on_connect`` and ``on_message``, as paho's network thread is
for a :class:`~.link.Link`. Publishing from any thread only appends to the subscribers'
queues, under the broker's lock; callbacks never run on the publisher's thread.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

from ..protocol.constants import QOS_CONTROL
from .link import BrokerAddress, Will

log = logging.getLogger(__name__)


def topic_matches(pattern: str, topic: str) -> bool:
    """MQTT filter matching: ``+`` one level, ``#`` the rest (and the parent level itself)."""
    p, t = pattern.split("/"), topic.split("/")
    for i, part in enumerate(p):
        if part == "#":
            return True
        if i >= len(t) or (part != "+" and part != t[i]):
            return False
    return len(p) == len(t)


class Published:
    """What ``publish`` returns, as paho's info: delivery is immediate, so a message published while
    connected is acknowledged at once, and one published while not connected never is."""

    def __init__(self, delivered: bool):
        self._delivered = delivered
        self.rc = 0 if delivered else 4  # paho's MQTT_ERR_NO_CONN

    def wait_for_publish(self, timeout: float | None = None) -> None:
        return None

    def is_published(self) -> bool:
        return self._delivered


class MemoryBroker:
    """One named in-process broker; :meth:`named` returns the same one for the same name."""

    _brokers: dict[str, MemoryBroker] = {}
    _registry_lock = threading.Lock()

    def __init__(self, name: str):
        self.name = name
        self._lock = threading.Lock()
        self._retained: dict[str, bytes] = {}
        self._links: list[MemoryLink] = []
        self.messages_routed = 0

    @classmethod
    def named(cls, name: str) -> MemoryBroker:
        with cls._registry_lock:
            if name not in cls._brokers:
                cls._brokers[name] = cls(name)
            return cls._brokers[name]

    @classmethod
    def drop(cls, name: str) -> None:
        """Forget a broker (its retained messages) once its test is over."""
        with cls._registry_lock:
            cls._brokers.pop(name, None)

    def attach(self, link: MemoryLink) -> None:
        with self._lock:
            self._links.append(link)

    def detach(self, link: MemoryLink, will: Will | None) -> None:
        with self._lock:
            if link in self._links:
                self._links.remove(link)
        if will is not None:
            self.publish(will.topic, will.payload, will.retain)

    def subscribe(self, link: MemoryLink, pattern: str) -> None:
        with self._lock:
            for topic, payload in self._retained.items():
                if topic_matches(pattern, topic):
                    link.deliver(topic, payload, True)

    def publish(self, topic: str, payload: bytes, retain: bool) -> None:
        with self._lock:
            if retain:
                if payload:
                    self._retained[topic] = payload
                else:
                    self._retained.pop(topic, None)
            for link in self._links:
                if link.wants(topic):
                    link.deliver(topic, payload, False)
                    self.messages_routed += 1


class MemoryLink:
    """The :class:`~.link.Link` interface over a :class:`MemoryBroker` (see the module docstring)."""

    def __init__(
        self,
        broker_url: str | Sequence[str],
        client_id: str,
        *,
        on_message: Callable[[str, bytes, bool], None],
        on_connect: Callable[[], None] | None = None,
        will: Will | None = None,
        name: str = "link",
        **_options: Any,  # keepalive, reconnect, TLS, credentials: nothing to do in memory
    ):
        from .link import parse_broker_urls

        self.addresses = parse_broker_urls(broker_url)
        if len(self.addresses) != 1 or not self.addresses[0].memory:
            raise ValueError("a memory:// link takes exactly one memory:// URL")
        self.broker = MemoryBroker.named(self.addresses[0].host)
        self.client_id = client_id
        self._on_message_cb, self._on_connect_cb, self._will, self._name = on_message, on_connect, will, name
        self.connected = threading.Event()
        self.connect_count = 0
        self.failovers = 0
        self._subs: set[str] = set()
        self._subs_lock = threading.Lock()
        self._inbox: queue.Queue[tuple[str, bytes, bool] | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> BrokerAddress:
        return self.addresses[0]

    @property
    def urls(self) -> str:
        return self.address.url

    def probe(self, timeout_s: float = 3.0) -> dict[str, str | None]:
        return {self.address.url: None}

    def start(self, wait_s: float | None = None) -> bool:
        if self._thread is None:
            self._thread = threading.Thread(target=self._deliver_loop, name=f"memlink-{self._name}", daemon=True)
            self._thread.start()
            self._inbox.put(("", b"", False))  # the connect event, first on the delivery thread
        if wait_s is not None:
            return self.connected.wait(wait_s)
        return self.connected.is_set()

    def stop(self, final: Sequence[tuple[str, bytes, bool]] = (), timeout_s: float = 3.0) -> None:
        """Publish ``final`` messages, then detach cleanly (no Will)."""
        for topic, payload, retain in final:
            self.publish(topic, payload, retain=retain)
        self._end(will=None, timeout_s=timeout_s)

    def kill(self) -> None:
        """Vanish as a crashed device does: the broker publishes the Will."""
        self._end(will=self._will, timeout_s=3.0)

    def _end(self, will: Will | None, timeout_s: float) -> None:
        if not self.connected.is_set():
            return
        self.connected.clear()
        self.broker.detach(self, will)
        self._inbox.put(None)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def _deliver_loop(self) -> None:
        while True:
            item = self._inbox.get()
            if item is None:
                return
            topic, payload, retained = item
            if not topic:  # connect: attach, renew the subscriptions (retained replays), then the callback
                self.broker.attach(self)
                self.connect_count += 1
                self.connected.set()
                with self._subs_lock:
                    subs = list(self._subs)
                for pattern in subs:
                    self.broker.subscribe(self, pattern)
                if self._on_connect_cb is not None:
                    self._guard(self._on_connect_cb)
                continue
            self._guard(self._on_message_cb, topic, payload, retained)

    def _guard(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:  # as on paho's thread: a bug in a handler must not stop delivery
            log.exception("%s: callback failed", self._name)

    # -- what the broker calls (under its lock: only queue) ----------------
    def wants(self, topic: str) -> bool:
        with self._subs_lock:
            return any(topic_matches(p, topic) for p in self._subs)

    def deliver(self, topic: str, payload: bytes, retained: bool) -> None:
        self._inbox.put((topic, bytes(payload), retained))

    # -- operations (any thread) -------------------------------------------
    def publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = QOS_CONTROL) -> Published:
        if not self.connected.is_set():
            return Published(False)
        self.broker.publish(topic, bytes(payload), retain)
        return Published(True)

    def subscribe(self, topic: str, qos: int = QOS_CONTROL) -> None:
        with self._subs_lock:
            self._subs.add(topic)
        if self.connected.is_set():
            self.broker.subscribe(self, topic)

    def unsubscribe(self, topic: str) -> None:
        with self._subs_lock:
            self._subs.discard(topic)
