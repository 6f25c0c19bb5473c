"""The agent daemon: presence, heartbeats, and commands from the coordinator.

Threads:

- the MQTT network thread (:class:`~edge_agent.common.link.Link`) decodes every
  message, answers quick commands inline and never blocks;
- one *job* thread runs long commands (training rounds, benchmarks) one at a
  time; while it works the device reports ``busy``;
- a small *io* pool serves blob uploads, so the coordinator can collect a
  finished update while the next job runs;
- a heartbeat thread re-publishes the retained status.

None of them writes the socket: :class:`~edge_agent.common.link.Link` leaves that to
paho's network thread, and publishing only queues. Blob chunks are received
through :mod:`.transfer` (fed on the network thread, waited on by the caller).

Every command gets a reply, an error reply if need be: the agent never goes
silent and never dies of bad input.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__, caps
from .common import transfer
from .common.blobs import BlobStore, split
from .common.link import Will, open_link
from .heldmodels import HeldModels
from .protocol import serde, topics
from .protocol.args import Ack, BlobFetch, BlobGet, Logs, NoArgs, Sleep
from .protocol.constants import BROADCAST_PATIENCE_S, BROADCAST_WAIT_S, MAX_WANTED_CHUNKS
from .protocol.errors import ErrorCode, ProtocolError
from .protocol.messages import BlobWant, Command, CoordinatorStatus, Reply, Status, error_dict

log = logging.getLogger("edge_agent")

Handler = Callable[["Agent", Command, Any], dict[str, Any]]


@dataclass(frozen=True)
class CommandSpec:
    fn: Handler
    mode: str  # "inline" (network thread), "io" (io pool) or "job" (the one job thread; device busy)
    help: str
    durable: bool = False  # the result goes to the on-disk outbox until the coordinator acknowledges it
    args: type = NoArgs  # the command's argument dataclass (protocol.args), decoded before the handler runs


COMMANDS: dict[str, CommandSpec] = {}


def command(name: str, mode: str = "inline", help: str = "", durable: bool = False, args: type = NoArgs):
    """Register a command handler ``fn(agent, cmd, args)``, ``args`` decoded as the ``args`` class.

    Handlers return a result dict or raise ProtocolError."""

    def deco(fn: Handler) -> Handler:
        doc = help or next(iter((fn.__doc__ or "").strip().splitlines()), "")
        COMMANDS[name] = CommandSpec(fn, mode, doc, durable, args)
        return fn

    return deco


OUTBOX_MAX_AGE_S = 7 * 86400  # unacknowledged results older than this are dropped


class Agent:
    KEEP_LOGS = True  # recent log lines for `edgeprune logs` (simulated agents, hundreds per process, do not)
    REPLY_CACHE = 256  # replies kept to answer duplicate (QoS 1 re-delivered) commands
    SEEN_KEEP = 100_000  # signed request ids remembered on disk against replays

    def __init__(self, settings: dict[str, Any]):
        self.settings = settings
        self.fleet: str = settings["fleet"]
        self.device_id: str = settings["device_id"]
        self.state_dir = Path(settings["state_dir"])
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.blobs = BlobStore(self.state_dir / "blobs")
        self.held = HeldModels(self.state_dir / "models", settings["model_cache"], settings["model_cache_bytes"])
        self.outbox = self.state_dir / "outbox"  # finished results not yet acknowledged (survive restarts)
        self.outbox.mkdir(exist_ok=True)
        self.started = time.time()
        self._seq = 0
        self._task: str | None = None
        self._status_lock = threading.Lock()
        self._jobs: queue.Queue[Command | None] = queue.Queue()
        self._job_lock = threading.Lock()
        self._job_active: str | None = None  # the one job running or about to run
        self._io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="agent-io")
        self._replies: OrderedDict[str, Reply | None] = OrderedDict()
        self._replies_lock = threading.Lock()
        self.receiver = transfer.Receiver()
        self.log_ring = None
        self._stop = threading.Event()
        self.trainer = None  # edge_agent.trainer.Trainer, created on the first training command
        # secure fleet: replies signed with the device key; commands must carry the coordinator's signature,
        # be fresh, and use a request id never seen before (kept on disk, so a restart does not reopen replays)
        self._sign_key = self._verify_key = None
        self._seen_ids: set[str] = set()
        self._seen_file = self.state_dir / "seen_requests"
        if settings.get("sign_key") or settings.get("coordinator_key"):
            from .protocol import signing

            if settings.get("sign_key"):
                self._sign_key = signing.load_private(settings["sign_key"])
            if settings.get("coordinator_key"):
                self._verify_key = signing.load_public(settings["coordinator_key"])
                if self._seen_file.exists():
                    self._seen_ids = set(self._seen_file.read_text().split()[-self.SEEN_KEEP :])
        self.t = {
            "status": topics.device(self.fleet, self.device_id, "status"),
            "caps": topics.device(self.fleet, self.device_id, "caps"),
            "cmd": topics.device(self.fleet, self.device_id, "cmd"),
            "reply": topics.device(self.fleet, self.device_id, "reply"),
            "data": topics.device(self.fleet, self.device_id, "data"),
            "want": topics.device(self.fleet, self.device_id, "want"),
            "down": topics.device(self.fleet, self.device_id, "down"),
            "coordinator": topics.coordinator_status(self.fleet),
        }
        self._blob_prefix = f"{topics.PREFIX}/{self.fleet}/blob/"
        will = Will(self.t["status"], serde.encode(self._status_msg("offline")))
        self.link = open_link(
            settings["broker"],
            client_id=f"ep-{self.fleet}-{self.device_id}",
            on_message=self._on_message,
            on_connect=self._on_connect,
            will=will,
            keepalive_s=settings["keepalive_s"],
            reconnect_min_s=settings["reconnect_min_s"],
            reconnect_max_s=settings["reconnect_max_s"],
            name=f"agent-{self.device_id}",
            tls_files=(settings["tls_ca"], settings["tls_cert"], settings["tls_key"]),
            username=settings.get("username") or None,
            password=settings.get("password") or None,
            force_plain_password=bool(settings.get("plain_password")),
        )
        self.link.subscribe(self.t["cmd"])
        self.link.subscribe(self.t["down"])
        # Set (to the link's failover count) once the broker replayed a broadcast's retained chunks to us: it
        # does (RabbitMQ never does), so a broadcast slow to come is slow, not missing, and we wait for it
        # BROADCAST_PATIENCE_S before asking for it again; another broker after a failover must show it anew.
        self.replays_retained: int | None = None
        self.link.subscribe(self.t["coordinator"])

    # -- lifecycle -------------------------------------------------------
    def start(self) -> None:
        if self.KEEP_LOGS and self.log_ring is None:
            from .logring import LogRing

            self.log_ring = LogRing()
            logging.getLogger().addHandler(self.log_ring)
        threading.Thread(target=self._job_loop, name="agent-job", daemon=True).start()
        threading.Thread(target=self._heartbeat_loop, name="agent-heartbeat", daemon=True).start()
        self.link.start()
        log.info("agent %s (fleet %s) starting, broker %s", self.device_id, self.fleet, self.link.urls)

    def stop(self) -> None:
        """Graceful stop: publish ``offline`` ourselves (the broker drops the Will on a clean disconnect)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._jobs.put(None)
        if self.trainer is not None:
            self.trainer.kill_now()
        self.link.stop(final=[(self.t["status"], serde.encode(self._status_msg("offline")), True)])
        self._io.shutdown(wait=False, cancel_futures=True)
        log.info("agent %s stopped", self.device_id)
        if self.log_ring is not None:
            logging.getLogger().removeHandler(self.log_ring)

    def wait(self) -> None:
        while not self._stop.wait(1.0):
            pass

    # -- presence --------------------------------------------------------
    def _status_msg(self, state: str | None = None) -> Status:
        with self._status_lock:
            self._seq += 1
            return Status(
                device_id=self.device_id,
                state=state or ("busy" if self._task else "online"),
                ts=time.time(),
                seq=self._seq,
                heartbeat_s=self.settings["heartbeat_s"],
                uptime_s=round(time.time() - self.started, 3),
                task=self._task,
                agent_version=__version__,
            )

    def publish_status(self) -> None:
        if self.link.connected.is_set() and not self._stop.is_set():
            self.link.publish(self.t["status"], serde.encode(self._status_msg()), retain=True)

    def _on_connect(self) -> None:
        self._announce()
        self._outbox_replay()

    def _outbox_replay(self) -> None:
        """Send again every finished result the coordinator has not acknowledged (lost on a restart or
        while the broker was away). The coordinator counts each (device, round) once."""
        now = time.time()
        for path in sorted(self.outbox.glob("*.json")):
            try:
                if now - path.stat().st_mtime > OUTBOX_MAX_AGE_S:
                    path.unlink()
                    continue
                reply = serde.decode(Reply, path.read_bytes())
            except (OSError, ProtocolError) as exc:
                log.warning("dropping unreadable outbox entry %s: %s", path.name, exc)
                path.unlink(missing_ok=True)
                continue
            log.info("re-sending unacknowledged result %s", reply.id)
            self._publish_reply(reply, remember=False)

    def acknowledge(self, request_ids: list[str]) -> int:
        removed = 0
        for rid in request_ids:
            path = self.outbox / f"{topics.validate_id(rid, 'request id')}.json"
            if path.exists():
                path.unlink()
                removed += 1
        return removed

    def _announce(self) -> None:
        """After every (re)connect and when the coordinator comes online: capabilities, then status."""
        self.link.publish(self.t["caps"], serde.encode(self.capabilities()), retain=True)
        self.publish_status()

    def capabilities(self):
        return dataclasses.replace(
            caps.collect(self.device_id, str(self.state_dir), self.settings.get("sysfs_root", "/sys")),
            has_data=bool(self.settings.get("data")),
        )

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.settings["heartbeat_s"]):
            self.publish_status()

    def set_task(self, task: str | None) -> None:
        self._task = task
        self.publish_status()

    # -- incoming --------------------------------------------------------
    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        if topic == self.t["cmd"]:
            self._on_command(payload)
        elif topic == self.t["coordinator"]:
            try:
                msg = serde.decode(CoordinatorStatus, payload)
            except ProtocolError as exc:
                log.warning("ignoring bad coordinator status: %s", exc)
                return
            if msg.state == "online" and not retained:  # a replayed retained one: we announced on connect
                self._announce()
                self._outbox_replay()  # a coordinator that was away missed what we sent meanwhile
        elif topic.startswith(self._blob_prefix) or topic == self.t["down"]:
            if retained and payload:
                self.replays_retained = self.link.failovers  # this broker replays retained chunks to wildcards
            self._on_blob_chunk(topic, payload)
        else:
            # Not addressed to us. amqtt 0.12.1 sends a connecting client the retained
            # messages matching *any* session's subscriptions (broker.py, "pre-existing
            # session's subscriptions" loop), so agents see other devices' status here.
            log.debug("ignoring unsolicited message on %s", topic)

    def _on_command(self, payload: bytes) -> None:
        try:
            cmd = serde.decode(Command, payload, self.settings["max_message_bytes"])
        except ProtocolError as exc:
            log.warning("refusing command: %s", exc)
            self.reply_error(serde.peek_request_id(payload), exc.code, exc.message)
            return
        if self._verify_key is not None and not self._authentic(cmd):
            return
        with self._replies_lock:
            if cmd.id in self._replies:
                cached = self._replies[cmd.id]
                log.info("duplicate command %s (%s)%s", cmd.id, cmd.cmd, "; re-sending reply" if cached else "")
                if cached is not None:
                    self._publish_reply(cached, remember=False)
                return
            self._replies[cmd.id] = None
            while len(self._replies) > self.REPLY_CACHE:
                self._replies.popitem(last=False)
        spec = COMMANDS.get(cmd.cmd)
        if spec is None:
            self.reply_error(
                cmd.id,
                ErrorCode.UNKNOWN_COMMAND,
                f"unknown command {cmd.cmd!r}; this agent knows: {', '.join(sorted(COMMANDS))}",
            )
        elif spec.mode == "inline":
            self._execute(cmd, spec)
        elif spec.mode == "io":
            self._io.submit(self._execute, cmd, spec)
        else:
            with self._job_lock:
                running = self._job_active
                if running is None:
                    self._job_active = cmd.cmd
            if running is not None:
                self.reply_error(cmd.id, ErrorCode.BUSY, f"busy with {running}; try again later")
                return
            self.reply(cmd.id, "accepted", {"cmd": cmd.cmd})
            self._jobs.put(cmd)

    def _authentic(self, cmd: Command) -> bool:
        """Signed by the coordinator, fresh, and not a replay; else an error reply and a log line."""
        from .protocol import signing

        try:
            signing.verify(cmd, self._verify_key, f"command {cmd.cmd}")
            if cmd.to != self.device_id:
                raise ProtocolError(
                    ErrorCode.REJECTED, f"command {cmd.id} is addressed to {cmd.to!r}, not to this device"
                )
            age = time.time() - cmd.ts
            if abs(age) > self.settings["max_command_age_s"]:
                raise ProtocolError(
                    ErrorCode.REPLAYED,
                    f"command {cmd.id} is {age:.0f} s old (limit "
                    f"{self.settings['max_command_age_s']:.0f} s; check the clocks)",
                )
            with self._replies_lock:
                if cmd.id in self._seen_ids:
                    if cmd.id in self._replies and self._replies[cmd.id] is None:
                        return False  # a QoS-1 re-delivery of a command still running: drop it quietly
                    raise ProtocolError(ErrorCode.REPLAYED, f"request id {cmd.id} was already used")
                self._seen_ids.add(cmd.id)
                with open(self._seen_file, "a") as f:
                    f.write(cmd.id + "\n")
        except ProtocolError as exc:
            log.warning("refusing command %s (%s): %s", cmd.id, cmd.cmd, exc)
            self.reply_error(cmd.id, exc.code, exc.message)
            return False
        return True

    def _job_loop(self) -> None:
        while True:
            cmd = self._jobs.get()
            if cmd is None:
                return
            self.set_task(cmd.cmd)
            try:
                self._execute(cmd, COMMANDS[cmd.cmd])
            finally:
                with self._job_lock:
                    self._job_active = None
                self.set_task(None)

    def _execute(self, cmd: Command, spec: CommandSpec) -> None:
        try:
            result = spec.fn(self, cmd, serde.decode_args(spec.args, cmd.cmd, cmd.args))
        except ProtocolError as exc:
            log.warning("command %s (%s) failed: %s", cmd.id, cmd.cmd, exc)
            self.reply_error(cmd.id, exc.code, exc.message)
        except Exception as exc:  # a bug must cost one error reply, not the agent
            log.exception("command %s (%s) crashed", cmd.id, cmd.cmd)
            self.reply_error(cmd.id, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        else:
            self.reply(cmd.id, "result", result, durable=spec.durable)

    # -- outgoing --------------------------------------------------------
    def reply(
        self, request_id: str | None, kind: str, result: dict[str, Any] | None = None, durable: bool = False
    ) -> None:
        reply = Reply(id=request_id, device_id=self.device_id, kind=kind, ts=time.time(), result=result)
        if durable and request_id is not None:  # on disk before it goes out: a crash after this loses nothing
            path = self.outbox / f"{request_id}.json"
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(serde.encode(reply))
            os.replace(tmp, path)
        self._publish_reply(reply, remember=kind == "result")

    def reply_error(self, request_id: str | None, code: ErrorCode, message: str) -> None:
        self._publish_reply(
            Reply(
                id=request_id, device_id=self.device_id, kind="error", ts=time.time(), error=error_dict(code, message)
            ),
            remember=True,
        )

    def _publish_reply(self, reply: Reply, remember: bool) -> None:
        if remember and reply.id is not None:
            with self._replies_lock:
                if reply.id in self._replies:
                    self._replies[reply.id] = reply
        if self._sign_key is not None:
            from .protocol import signing

            reply = signing.sign(reply, self._sign_key)
        self.link.publish(self.t["reply"], serde.encode(reply))

    def progress(self, request_id: str, **info: Any) -> None:
        self.reply(request_id, "progress", info)

    # -- blobs -----------------------------------------------------------
    def upload_blob(
        self, sha256: str, request_id: str | None, chunks: list[int] | None = None, frame_version: int = 1
    ) -> int:
        """Publish a stored blob (or only the listed chunks) as frames on our data topic, paced, in the
        frame version the coordinator reads; return the blob's size. Raises TIMEOUT if the broker stops
        acknowledging."""
        data = self.blobs.get(sha256)
        frames = split(data, self.settings["chunk_bytes"], request_id, sha256)
        if chunks is not None:
            wanted = set(chunks)
            frames = (f for f in frames if f.index in wanted)
        transfer.send_frames(self.link, frames, self.t["data"], frame_version=frame_version)
        return len(data)

    def fetch_blob(
        self, sha256: str, timeout_s: float, expected_bytes: int | None = None, expected_chunks: int | None = None
    ) -> bytes:
        """A blob the coordinator broadcast (retained chunks), from the cache when we have it.

        Chunks that do not arrive within a short wait (a broker that replays no retained
        messages to wildcard subscriptions, a chunk lost on the way) are asked for with a
        ``blob_want``; a blob that fails its hash is fetched once more before giving up.
        """
        topics.validate_sha256(sha256)
        if self.blobs.has(sha256):
            try:
                return self.blobs.get(sha256)
            except ProtocolError:
                pass  # corrupted on disk: removed, fetch again
        flt = topics.blob_filter(self.fleet, sha256)
        deadline = time.monotonic() + timeout_s
        try:
            first: ProtocolError | None = None
            for attempt in (1, 2):
                pull = self.receiver.open(
                    sha256,
                    "broadcast",
                    expected_bytes=expected_bytes,
                    expected_chunks=expected_chunks,
                    deadline_s=timeout_s,
                    broadcast=True,
                )
                try:
                    # Subscribe only once the pull is open: the broker replays the retained chunks at once, and
                    # a chunk that arrives before there is a pull to feed is dropped (it used to be, under load).
                    if attempt == 1:
                        self.link.subscribe(flt)
                    else:  # subscribe again (the broker replays the retained chunks) and ask for all
                        self.link.unsubscribe(flt)
                        self.link.subscribe(flt)
                        self._want(sha256, None)
                    patient = self.replays_retained is not None and self.replays_retained == self.link.failovers
                    data = transfer.wait(
                        pull,
                        max(0.1, deadline - time.monotonic()),
                        lambda missing: self._want(sha256, missing),
                        first_ask_s=BROADCAST_PATIENCE_S if patient else BROADCAST_WAIT_S,
                        idle_s=2 * BROADCAST_WAIT_S,
                        max_idle_s=30.0,
                        progress_ask_s=BROADCAST_PATIENCE_S,
                    )
                    break
                except ProtocolError as exc:
                    if attempt == 1 and exc.code == ErrorCode.INTEGRITY:
                        first = exc
                        log.warning("%s; fetching it once more", exc.message)
                        continue
                    if first is not None:  # the hash failure is the news, whatever the second try did
                        raise ProtocolError(
                            ErrorCode.INTEGRITY, f"{first.message}; fetched once more: " f"{exc.message}"
                        ) from None
                    raise
                finally:
                    self.receiver.close(pull)
            self.blobs.put(data, sha256)
            self.blobs.evict_to(self.settings["blob_cache_bytes"], keep={sha256} | self.unpulled())
            return data
        finally:
            self.link.unsubscribe(flt)

    def _want(self, sha256: str, missing: list[int] | None) -> None:
        """Ask the coordinator for broadcast chunks that did not come (all of them when None)."""
        if missing is not None and len(missing) > MAX_WANTED_CHUNKS:
            missing = missing[:MAX_WANTED_CHUNKS]
        log.info("blob %s: asking for %s chunks", sha256[:12], "all" if missing is None else len(missing))
        self.link.publish(self.t["want"], serde.encode(BlobWant(self.device_id, sha256, time.time(), missing)))

    def unpulled(self) -> set[str]:
        """Blobs named by results still in the outbox: the coordinator has not pulled them yet."""
        shas = set()
        for path in self.outbox.glob("*.json"):
            try:
                update = (serde.decode(Reply, path.read_bytes()).result or {}).get("update") or {}
            except (OSError, ProtocolError):
                continue
            if isinstance(update, dict) and isinstance(update.get("sha256"), str):
                shas.add(update["sha256"])
        return shas

    def _on_blob_chunk(self, topic: str, payload: bytes) -> None:
        try:
            parsed = topics.parse(topic)
            if parsed.kind != "blob" and topic != self.t["down"]:
                raise ProtocolError(ErrorCode.BAD_TOPIC, f"unexpected topic {topic}")
            if not payload:
                return  # a retained chunk being cleared
            frame = serde.decode_frame(payload)
            if parsed.kind == "blob" and (frame.blob_sha256 != parsed.blob_sha256 or frame.index != parsed.chunk_index):
                raise ProtocolError(ErrorCode.BAD_FIELD, f"chunk header does not match topic {topic}")
        except ProtocolError as exc:
            log.warning("ignoring chunk on %s: %s", topic, exc)
            return
        self.receiver.feed(frame, "broadcast")


# -- built-in commands ----------------------------------------------------


@command("ping", help="Answer at once; the coordinator measures the round trip.")
def _ping(agent: Agent, cmd: Command, _: NoArgs) -> dict[str, Any]:
    return {"agent_ts": time.time(), "sent_ts": cmd.ts}


@command("caps", help="Collect and return capabilities (also re-published retained).")
def _caps(agent: Agent, cmd: Command, _: NoArgs) -> dict[str, Any]:
    agent._announce()
    return caps.as_dict(agent.capabilities())


@command("commands", help="List the commands this agent understands.")
def _commands(agent: Agent, cmd: Command, _: NoArgs) -> dict[str, Any]:
    return {"commands": {name: {"mode": spec.mode, "help": spec.help} for name, spec in sorted(COMMANDS.items())}}


@command("ack", mode="inline", args=Ack, help="The coordinator has processed these results: drop them from the outbox.")
def _ack(agent: Agent, cmd: Command, a: Ack) -> dict[str, Any]:
    return {"removed": agent.acknowledge(a.ids)}


@command(
    "blob_get",
    mode="io",
    args=BlobGet,
    help="Upload a stored blob (an update or result), or only the listed `chunks`, as chunks on the data topic.",
)
def _blob_get(agent: Agent, cmd: Command, a: BlobGet) -> dict[str, Any]:
    size = agent.upload_blob(a.sha256, cmd.id, a.chunks, a.frame)
    return {"sha256": a.sha256, "bytes": size, "chunks": len(a.chunks) if a.chunks is not None else "all"}


@command(
    "blob_fetch",
    mode="io",
    args=BlobFetch,
    help="Fetch a broadcast blob into the cache (pre-loading models/artifacts).",
)
def _blob_fetch(agent: Agent, cmd: Command, a: BlobFetch) -> dict[str, Any]:
    cached = agent.blobs.has(a.sha256)
    data = agent.fetch_blob(a.sha256, a.timeout_s, a.bytes, a.chunks)
    return {"sha256": a.sha256, "bytes": len(data), "cached": cached}


@command(
    "logs", args=Logs, help="Recent log lines of this agent after sequence number `since` (at most `lines`, <= 1000)."
)
def _logs(agent: Agent, cmd: Command, a: Logs) -> dict[str, Any]:
    if agent.log_ring is None:
        raise ProtocolError(ErrorCode.UNSUPPORTED, "this agent keeps no log lines (a simulated device)")
    return agent.log_ring.since(a.since, min(a.lines, 1000))


@command(
    "sleep", mode="job", args=Sleep, help="Hold the job slot for `seconds` (for tests of busy state and timeouts)."
)
def _sleep(agent: Agent, cmd: Command, a: Sleep) -> dict[str, Any]:
    time.sleep(a.seconds)
    return {"slept_s": a.seconds}
