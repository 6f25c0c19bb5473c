"""The coordinator's MQTT session: one connection for fleet presence (:mod:`.fleet`), commands and
replies (:mod:`.rpc`) and blob transfer (:mod:`edge_agent.common.transfer`).

One connection carries everything. Presence comes from the devices' retained
status/caps plus live heartbeats; commands go out with request ids and come
back as :class:`Reply` objects (errors are replies too, never exceptions), and
blobs move in chunks: broadcast down as retained chunks every selected device
can fetch once (and re-sent as ordinary messages to a device that says it
missed some: brokers such as RabbitMQ replay no retained messages to wildcard
subscriptions), pulled up one device at a time with bounded concurrency so the
coordinator's memory does not grow with the fleet.

Threads: the MQTT network thread (paho's, inside :class:`~edge_agent.common.link.Link`,
the only writer of the socket) runs ``_on_message`` and must not block: it updates the
presence views and resolves requests; callers' threads submit commands and wait on futures
and pulls; grace timers (:mod:`.rpc`) fail the requests of devices that stay away; one
``blob-resend`` thread answers ``blob_want`` messages so a slow re-send never holds up the
network thread. Every publish only queues: paho's thread alone writes the socket.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from edge_agent.common import transfer
from edge_agent.common.blobs import sha256_hex, split
from edge_agent.common.link import Will, open_link
from edge_agent.protocol import serde, signing, topics
from edge_agent.protocol.args import Ack, BlobGet, BlobRef
from edge_agent.protocol.constants import (
    CHUNK_IDLE_S,
    DEFAULT_CHUNK_BYTES,
    DEFAULT_STALE_AFTER_BEATS,
    RESEND_MIN_S,
    WANT_DOWN_SINCE,
)
from edge_agent.protocol.errors import ErrorCode, ProtocolError
from edge_agent.protocol.messages import BlobWant, Capabilities, Command, CoordinatorStatus, Reply, Status

from .fleet import DeviceView, Presence
from .rpc import OFFLINE_GRACE_S, Requests, error_reply, new_id
from .store import Store

log = logging.getLogger("coordinator.session")


@dataclass
class Stats:
    messages_out: int = 0
    bytes_out: int = 0
    messages_in: int = 0
    bytes_in: int = 0
    rejected_in: int = 0
    late_replies: int = 0
    wants_in: int = 0  # blob_want messages: devices that missed broadcast chunks
    resent_chunks: int = 0  # broadcast chunks re-sent as ordinary messages in answer
    rejected_reasons: dict[str, int] = field(default_factory=dict)


class Session:
    """A coordinator connection to one fleet.

    ``long_running`` sessions (train, bench) publish a retained ``online``
    coordinator status with a Will; one-shot sessions (devices, ping) send a
    non-retained probe and leave the retained status alone.
    """

    def __init__(
        self,
        broker_url: str,
        fleet: str,
        store: Store | None = None,
        *,
        long_running: bool = False,
        stale_after_beats: int = DEFAULT_STALE_AFTER_BEATS,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        max_concurrent_uploads: int = 8,
        keepalive_s: int = 15,
        tls_files: tuple[str, str, str] | None = None,
        sign_key=None,
        device_keys: Callable[[str], Any] | None = None,
        offline_grace_s: float = OFFLINE_GRACE_S,
        username: str | None = None,
        password: str | None = None,
        force_plain_password: bool = False,
    ):
        self.fleet = topics.validate_id(fleet, "fleet")
        self.store = store
        self.long_running = long_running
        self.chunk_bytes = chunk_bytes
        self.coordinator_id = new_id("c")
        self.stats = Stats()
        self.presence = Presence(self.fleet, store, stale_after_beats)
        self.requests = Requests(offline_grace_s, self._end_pulls, self._gone)
        self.receiver = transfer.Receiver()
        self._pulls: dict[str, set[transfer.Pull]] = {}  # device -> pulls in progress (failed if it goes away)
        self._fetch_slots = threading.Semaphore(max_concurrent_uploads)
        self._published: dict[str, bytes] = {}  # sha -> data of broadcast blobs: re-sent on request, cleared at close
        self._offered: set[str] = set()  # of those, the ones never broadcast (offer_blob): sent only on request
        self._resent: dict[tuple, float] = {}  # (sha, chunk, frame version, device or None) -> when last re-sent
        self._resender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blob-resend")
        self._t_status = topics.coordinator_status(fleet)
        will = Will(self._t_status, self._coordinator_msg("offline")) if long_running else None
        self.sign_key = sign_key
        self.device_keys = device_keys
        self._other_fleets: dict[str, set[str]] = {}
        self.link = open_link(
            broker_url,
            client_id=f"ep-{self.fleet}-{self.coordinator_id}",
            on_message=self._on_message,
            on_connect=self._on_connect,
            will=will,
            keepalive_s=keepalive_s,
            name="coordinator",
            tls_files=tls_files,
            username=username,
            password=password,
            force_plain_password=force_plain_password,
        )
        for channel in ("status", "caps", "reply", "data", "want"):
            self.link.subscribe(topics.device_filter(fleet, channel))

    # -- lifecycle -------------------------------------------------------
    def start(self, timeout_s: float = 10.0) -> "Session":
        problems = self.link.probe(min(3.0, timeout_s))
        if all(problems.values()):  # no broker reachable at all: say why now, not after the timeout
            raise ConnectionError(
                "cannot reach the MQTT broker: "
                + "; ".join(f"{url}: {why}" for url, why in problems.items())
                + " (start one with `edgeprune broker`)"
            )
        if not self.link.start(wait_s=timeout_s):
            self.link.stop()
            raise ConnectionError(
                f"the MQTT broker at {self.link.urls} did not accept the connection within "
                f"{timeout_s:.0f} s (wrong credentials or TLS files? the broker's log says why)"
            )
        return self

    def close(self) -> None:
        self.requests.close()
        for sha in list(self._published):
            self.clear_blob(sha)
        final = [(self._t_status, self._coordinator_msg("offline"), True)] if self.long_running else []
        self._resender.shutdown(wait=False, cancel_futures=True)
        self.link.stop(final=final)

    def __enter__(self) -> "Session":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _coordinator_msg(self, state: str) -> bytes:
        return serde.encode(CoordinatorStatus(coordinator_id=self.coordinator_id, state=state, ts=time.time()))

    def _on_connect(self) -> None:
        self.announce()

    def announce(self) -> None:
        """Tell agents we are here; each live agent answers by re-publishing status and caps."""
        self._publish(self._t_status, self._coordinator_msg("online"), retain=self.long_running)

    def _publish(self, topic: str, payload: bytes, retain: bool = False):
        self.stats.messages_out += 1
        self.stats.bytes_out += len(payload)
        return self.link.publish(topic, payload, retain=retain)

    # -- incoming --------------------------------------------------------
    def _reject(self, topic: str, exc: ProtocolError) -> None:
        self.stats.rejected_in += 1
        self.stats.rejected_reasons[exc.code.value] = self.stats.rejected_reasons.get(exc.code.value, 0) + 1
        log.warning("ignoring message on %s: %s", topic, exc)

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        self.stats.messages_in += 1
        self.stats.bytes_in += len(payload)
        try:
            parsed = topics.parse(topic)
            if parsed.fleet != self.fleet:  # only while fleets_seen() listens
                if parsed.kind == "device" and parsed.device_id:
                    self._other_fleets.setdefault(parsed.fleet, set()).add(parsed.device_id)
                return
            if parsed.kind != "device":
                return
            device_id = parsed.device_id
            assert device_id is not None
            if parsed.channel == "data":
                self._on_data(device_id, serde.decode_frame(payload))
                return
            if parsed.channel == "want":
                want = serde.decode(BlobWant, payload)
                self._check_sender(device_id, want.device_id)
                self.presence.heard(device_id, False)
                self._on_want(want)
                return
            if not payload:
                return  # a retained message being cleared
            if parsed.channel == "status":
                self._on_status(device_id, serde.decode(Status, payload), retained)
            elif parsed.channel == "caps":
                caps = serde.decode(Capabilities, payload)
                self._check_sender(device_id, caps.device_id)
                self._on_caps(device_id, asdict(caps), retained)
            elif parsed.channel == "reply":
                reply = serde.decode(Reply, payload)
                self._check_sender(device_id, reply.device_id)
                if self.device_keys is not None:
                    self._verify_reply(reply)
                self.presence.heard(device_id, retained)
                self._on_reply(reply)
        except ProtocolError as exc:
            self._reject(topic, exc)

    def _verify_reply(self, reply: Reply) -> None:
        """Unsigned or badly signed: logged, counted, and the request it answers fails with that reason."""
        key = self.device_keys(reply.device_id)
        try:
            if key is None:
                raise ProtocolError(ErrorCode.BAD_SIGNATURE, f"no signing key known for device {reply.device_id}")
            signing.verify(reply, key, f"reply from {reply.device_id}")
        except ProtocolError as exc:
            self.requests.fail_one(reply.id, reply.device_id, exc.code, exc.message)
            raise

    @staticmethod
    def _check_sender(topic_id: str, claimed: str) -> None:
        if topic_id != claimed:
            raise ProtocolError(ErrorCode.BAD_FIELD, f"device_id {claimed!r} does not match topic id {topic_id!r}")

    def _on_status(self, device_id: str, status: Status, retained: bool) -> None:
        self._check_sender(device_id, status.device_id)
        view, previous_start = self.presence.update_status(device_id, status, retained)
        if not retained:
            if status.state == "offline":
                self.requests.device_offline(device_id)
            else:
                same = (
                    previous_start is not None
                    and view.process_start is not None
                    and abs(view.process_start - previous_start) < 2.0
                )
                self.requests.device_back(device_id, same_process=same)
        self.presence.notify()

    def _on_caps(self, device_id: str, caps: dict, retained: bool) -> None:
        self.presence.update_caps(device_id, caps, retained)

    def _on_reply(self, reply: Reply) -> None:
        if self.requests.resolve(reply):
            return
        if reply.kind == "error":
            log.warning("error reply from %s for request %s: %s", reply.device_id, reply.id, reply.error_message)
        elif reply.kind == "result":
            self.stats.late_replies += 1
            log.info(
                "late result from %s for request %s (its round or call is over): ignored", reply.device_id, reply.id
            )
            if reply.id:  # nobody will use it: let the device drop it from its outbox
                self.acknowledge(reply)

    def _on_data(self, device_id: str, frame) -> None:
        self.presence.heard(device_id, False)
        self.receiver.feed(frame, device_id)  # dropped unless a pull of ours asked for it

    def _on_want(self, want: BlobWant) -> None:
        data = self._published.get(want.sha256)
        if data is None:
            log.info(
                "%s asked for blob %s, which this coordinator is not broadcasting", want.device_id, want.sha256[:12]
            )
            return
        self.stats.wants_in += 1
        version = self.protocol_of(want.device_id)
        # 1.3 devices take the chunks on their own topic: a fleet's worth of wants (a broker slow to replay
        # retained chunks to a thousand devices) costs each asker its chunks, not every device every chunk
        alone = want.device_id if serde.version_at_least(version, WANT_DOWN_SINCE) else None
        self._resender.submit(self._resend, want.sha256, data, want.chunks, serde.frame_version_for(version), alone)

    def protocol_of(self, device_id: str) -> str | None:
        """The protocol version in a device's capabilities (None: not known)."""
        view = self.views.get(device_id)
        caps = view.caps if view is not None else None
        return caps.get("protocol_version") if caps else None

    def frame_version_of(self, device_id: str) -> int:
        """The chunk frame version a device reads, from the protocol version in its capabilities."""
        return serde.frame_version_for(self.protocol_of(device_id))

    def broadcast_frame_version(self) -> int:
        """Broadcast chunks in the newest frame version every device seen in the fleet reads. A device
        that cannot read them (one older than all the others, joining later) asks with a ``blob_want``
        and gets the chunks again in its own version."""
        versions = [
            serde.frame_version_for(r["caps"].get("protocol_version")) for r in self.device_table() if r["caps"]
        ]
        return min(versions, default=serde.FRAME_VERSION)

    def _resend(
        self, sha: str, data: bytes, chunks: list[int] | None, frame_version: int, device: str | None = None
    ) -> None:
        """Publish the wanted chunks as ordinary messages, on ``device``'s own ``down`` topic (or, for an
        older device, on the broadcast's topic, which every device fetching it receives); a chunk re-sent
        to the same place less than RESEND_MIN_S ago is skipped."""
        now = time.monotonic()
        wanted = set(chunks) if chunks is not None else None
        frames = [
            f
            for f in split(data, self.chunk_bytes, sha256=sha)
            if (wanted is None or f.index in wanted)
            and now - self._resent.get((sha, f.index, frame_version, device), -1e9) >= RESEND_MIN_S
        ]
        for f in frames:
            self._resent[(sha, f.index, frame_version, device)] = now
        down = topics.device(self.fleet, device, "down") if device is not None else None
        try:
            transfer.send_frames(
                self.link,
                frames,
                (lambda f: down) if down is not None else (lambda f: topics.blob_chunk(self.fleet, sha, f.index)),
                frame_version=frame_version,
            )
            self.stats.messages_out += len(frames)
            self.stats.resent_chunks += len(frames)
            self.stats.bytes_out += sum(len(f.data) for f in frames)
        except ProtocolError as exc:
            log.warning("re-sending blob %s: %s", sha[:12], exc)

    # -- presence (coordinator/fleet.py) ----------------------------------
    @property
    def views(self) -> dict[str, DeviceView]:
        return self.presence.views

    def state_of(self, view: DeviceView) -> str:
        return self.presence.state_of(view)

    def discover(self, wait_s: float = 2.0) -> list[dict[str, Any]]:
        """Probe the fleet and return every device with its state once live ones have answered."""
        self.presence.probe(wait_s, self.announce)
        return self.device_table()

    def device_table(self) -> list[dict[str, Any]]:
        return self.presence.device_table()

    def fleets_seen(self, wait_s: float = 1.5) -> dict[str, int]:
        """Every fleet with devices on this broker (retained statuses, or devices answering within
        ``wait_s``), with how many: what to suggest when the fleet asked for is empty or mistyped."""
        flt = f"{topics.PREFIX}/+/device/+/status"
        self._other_fleets.clear()
        self.link.subscribe(flt)
        try:
            time.sleep(wait_s)
        finally:
            self.link.unsubscribe(flt)
        seen = {f: len(d) for f, d in self._other_fleets.items()}
        if self.presence.count():
            seen[self.fleet] = self.presence.count()
        return dict(sorted(seen.items()))

    def fleet_rows(self) -> list[dict[str, Any]]:
        return self.presence.fleet_rows()

    def online(self) -> list[str]:
        return self.presence.online()

    def wait_for(self, predicate: Callable[[list[dict[str, Any]]], bool], timeout_s: float) -> bool:
        return self.presence.wait_for(predicate, timeout_s)

    def wait_online(self, count: int, timeout_s: float) -> list[str]:
        return self.presence.wait_online(count, timeout_s)

    # -- commands --------------------------------------------------------
    def submit(
        self,
        device_id: str,
        cmd: str,
        args: Any = None,
        on_progress: Callable[[Reply], None] | None = None,
        timeout_s: float | None = None,
    ) -> tuple[str, Future]:
        """Send a command; the future resolves to the final :class:`Reply` (result or error).

        ``args`` is the command's argument dataclass (:mod:`edge_agent.protocol.args`); a raw dict
        is sent as it is (tests of what an agent does with bad arguments)."""
        topics.validate_id(device_id, "device id")
        if args is not None and not isinstance(args, dict):
            if args.TYPE != cmd:
                raise ValueError(f"{type(args).__name__} arguments sent with command {cmd!r}")
            args = serde.encode_args(args)
        request_id, future = self.requests.add(device_id, cmd, on_progress)
        msg = Command(id=request_id, cmd=cmd, ts=time.time(), args=args or {}, timeout_s=timeout_s, to=device_id)
        if self.sign_key is not None:
            msg = signing.sign(msg, self.sign_key)
        self._publish(topics.device(self.fleet, device_id, "cmd"), serde.encode(msg))
        return request_id, future

    def acknowledge(self, reply: Reply) -> None:
        """Tell the device its durable result is processed: it may drop it from its outbox."""
        if reply.id is not None:
            self.submit(reply.device_id, "ack", Ack([reply.id]))

    def forget(self, request_id: str) -> None:
        self.requests.forget(request_id)

    def call(
        self,
        device_id: str,
        cmd: str,
        args: Any = None,
        timeout_s: float = 10.0,
        on_progress: Callable[[Reply], None] | None = None,
    ) -> Reply:
        """Send a command and wait for its final reply; a timeout comes back as an error reply."""
        request_id, future = self.submit(device_id, cmd, args, on_progress, timeout_s)
        try:
            return future.result(timeout_s)
        except TimeoutError:
            self.forget(request_id)
            return error_reply(request_id, device_id, ErrorCode.TIMEOUT, f"no reply to {cmd} within {timeout_s:.1f} s")

    def _gone(self, device_id: str) -> bool:
        view = self.presence.views.get(device_id)
        return view is None or view.status is None or view.status.state == "offline"

    def _end_pulls(self, device_id: str, code: ErrorCode, message: str) -> None:
        """A device's requests failed for its absence: so do the pulls of its blobs."""
        for pull in list(self._pulls.get(device_id, ())):
            pull.expire(f"blob {pull.sha256[:12]}: {message}", code)

    # -- blobs -----------------------------------------------------------
    def publish_blob(self, data: bytes) -> BlobRef:
        """Broadcast a blob as retained chunks; any device can fetch it (once) by hash."""
        sha = sha256_hex(data)
        frames = split(data, self.chunk_bytes, sha256=sha)
        count = -(-len(data) // self.chunk_bytes) or 1
        if sha not in self._published or sha in self._offered:
            self._offered.discard(sha)
            self._published[sha] = data  # before the first chunk: a device may ask for what it missed at once
            try:
                transfer.send_frames(
                    self.link,
                    frames,
                    lambda f: topics.blob_chunk(self.fleet, sha, f.index),
                    retain=True,
                    frame_version=self.broadcast_frame_version(),
                )
            except ProtocolError:
                self._published.pop(sha, None)
                raise
            self.stats.messages_out += count
            self.stats.bytes_out += len(data)
        return BlobRef(sha, len(data), count)

    def offer_blob(self, data: bytes) -> BlobRef:
        """Keep a blob ready without broadcasting it: a device that asks (``blob_want``) gets its chunks as
        ordinary messages. For what few devices will fetch (the exact model beside a delta)."""
        sha = sha256_hex(data)
        if sha not in self._published:
            self._published[sha] = data
            self._offered.add(sha)
        return BlobRef(sha, len(data), -(-len(data) // self.chunk_bytes) or 1)

    def clear_blob(self, sha256: str) -> None:
        """Remove a broadcast blob's retained chunks from the broker (an offered one: only forget it)."""
        data = self._published.pop(sha256, None)
        if sha256 in self._offered:
            self._offered.discard(sha256)
            return
        count = (-(-len(data) // self.chunk_bytes) or 1) if data is not None else 0
        infos = [self._publish(topics.blob_chunk(self.fleet, sha256, i), b"", retain=True) for i in range(count)]
        for info in infos:
            info.wait_for_publish(10)

    def clear_device(self, device_id: str) -> None:
        """Forget a removed device: clear its retained status and caps, drop it from the registry."""
        topics.validate_id(device_id, "device id")
        infos = [self._publish(topics.device(self.fleet, device_id, ch), b"", retain=True) for ch in ("status", "caps")]
        for info in infos:
            info.wait_for_publish(10)
        self.presence.forget(device_id)
        if self.store is not None:
            self.store.delete_device(self.fleet, device_id)

    def fetch_blob(
        self, device_id: str, sha256: str, timeout_s: float = 60.0, expected_bytes: int | None = None
    ) -> bytes:
        """Pull a blob (an update, a result) from a device. At most N pulls run at once.

        ``expected_bytes`` (from the device's result) bounds the pull. Chunks that stop
        coming are asked for again (only those); a blob that fails its hash is pulled
        once more before the failure counts.
        """
        topics.validate_sha256(sha256)
        deadline = time.monotonic() + timeout_s
        with self._fetch_slots:
            for attempt in (1, 2):
                try:
                    return self._pull(device_id, sha256, max(0.1, deadline - time.monotonic()), expected_bytes)
                except ProtocolError as exc:
                    if exc.code != ErrorCode.INTEGRITY or attempt == 2 or time.monotonic() >= deadline:
                        raise
                    log.warning("%s from %s: %s; pulling it once more", sha256[:12], device_id, exc.message)
        raise AssertionError("unreachable")

    def _pull(self, device_id: str, sha256: str, timeout_s: float, expected_bytes: int | None) -> bytes:
        pull = self.receiver.open(sha256, device_id, expected_bytes=expected_bytes, deadline_s=timeout_s)
        self._pulls.setdefault(device_id, set()).add(pull)
        requests: list[tuple[str, Future]] = []

        def ask(chunks: list[int] | None) -> None:
            if chunks is not None:
                log.info("blob %s from %s: asking again for %d missing chunks", sha256[:12], device_id, len(chunks))
            rid, fut = self.submit(device_id, "blob_get", BlobGet(sha256, chunks, serde.FRAME_VERSION))
            self.receiver.expect(pull, rid)
            requests.append((rid, fut))
            fut.add_done_callback(lambda f: self._pull_answered(pull, f.result()))

        def sent_all() -> bool:  # the device's last blob_get finished: every chunk reached the broker
            return bool(requests) and requests[-1][1].done() and requests[-1][1].result().ok

        try:
            ask(None)
            return transfer.wait(pull, timeout_s, ask, first_ask_s=CHUNK_IDLE_S, sent_all=sent_all)
        finally:
            for rid, _ in requests:
                self.forget(rid)
            self.receiver.close(pull)
            self._pulls.get(device_id, set()).discard(pull)

    @staticmethod
    def _pull_answered(pull: transfer.Pull, reply: Reply) -> None:
        """A blob_get the device could not serve ends the pull, unless it only timed out publishing
        (its broker connection dropped): then the missing chunks are asked for again."""
        if not reply.ok and reply.error_code != ErrorCode.TIMEOUT.value:
            pull.expire(
                f"blob {pull.sha256[:12]} from {pull.source}: {reply.error_message}", ErrorCode.coerce(reply.error_code)
            )
