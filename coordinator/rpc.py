"""Requests in flight to the devices, and how long a device that went away is waited for.

Every command gets a request id and a future; the device's final reply (a result or an
error: errors are replies too) resolves it, progress replies go to a callback. A device
that goes offline is not given up at once: a restarted agent re-sends its finished
results from its outbox, so its requests fail only after a grace period (or, when it
comes back as a new process, after a short resettle time).

Threads: the session's MQTT thread resolves requests (:meth:`Requests.resolve`) and
reports presence changes (:meth:`Requests.device_offline` / :meth:`Requests.device_back`);
callers' threads add and forget requests; one ``threading.Timer`` per away device fails
its requests when the grace runs out. One lock guards the pending requests; the timers
dict is touched by the MQTT thread and the timers themselves.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable

from edge_agent.protocol.errors import ErrorCode
from edge_agent.protocol.messages import Reply, error_dict

log = logging.getLogger("coordinator.rpc")

OFFLINE_GRACE_S = 15.0  # a device that went offline may come back and re-send finished results
RESETTLE_S = 3.0  # after it comes back: time for its outbox to arrive before older requests fail


def new_id(prefix: str = "") -> str:
    return prefix + secrets.token_hex(8)


def error_reply(request_id: str, device_id: str, code: ErrorCode, message: str) -> Reply:
    return Reply(id=request_id, device_id=device_id, kind="error", ts=time.time(), error=error_dict(code, message))


@dataclass
class _Pending:
    device_id: str
    cmd: str
    future: Future
    on_progress: Callable[[Reply], None] | None
    sent: float


class Requests:
    """The pending requests of one session. ``on_lost(device_id, code, message)`` is told when a
    device's requests fail for its absence (the session also ends that device's blob pulls)."""

    def __init__(
        self, offline_grace_s: float, on_lost: Callable[[str, ErrorCode, str], None], gone: Callable[[str], bool]
    ):
        self.offline_grace_s = offline_grace_s
        self._on_lost, self._gone = on_lost, gone
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self._offline_since: dict[str, float] = {}
        self._grace_timers: dict[str, threading.Timer] = {}

    def add(self, device_id: str, cmd: str, on_progress: Callable[[Reply], None] | None) -> tuple[str, Future]:
        request_id = new_id("r")
        future: Future = Future()
        with self._lock:
            self._pending[request_id] = _Pending(device_id, cmd, future, on_progress, time.monotonic())
        return request_id, future

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._pending.pop(request_id, None)

    def resolve(self, reply: Reply) -> bool:
        """Hand ``reply`` to its request; False when no request of ours is waiting for it (a late reply)."""
        with self._lock:
            pending = self._pending.get(reply.id) if reply.id else None
            if pending is not None and reply.kind in ("result", "error"):
                del self._pending[reply.id]
        if pending is None:
            return False
        if reply.device_id != pending.device_id:
            log.warning("reply %s came from %s, expected %s; ignored", reply.id, reply.device_id, pending.device_id)
            return True
        if reply.kind in ("result", "error"):
            if not pending.future.done():
                pending.future.set_result(reply)
        elif pending.on_progress is not None:
            try:
                pending.on_progress(reply)
            except Exception:
                log.exception("progress callback failed")
        return True

    def fail_one(self, request_id: str | None, device_id: str, code: ErrorCode, message: str) -> None:
        """The request this (unacceptable) reply answers fails with the reason."""
        with self._lock:
            pending = self._pending.pop(request_id, None) if request_id else None
        if pending is not None and pending.device_id == device_id and not pending.future.done():
            pending.future.set_result(error_reply(request_id, device_id, code, message))  # type: ignore[arg-type]

    def fail_device(self, device_id: str, code: ErrorCode, message: str, before: float | None = None) -> None:
        """Every request to ``device_id`` (sent before ``before``, monotonic) fails with ``message``."""
        with self._lock:
            failed = [
                (rid, p)
                for rid, p in self._pending.items()
                if p.device_id == device_id and (before is None or p.sent < before)
            ]
            for rid, _ in failed:
                del self._pending[rid]
        for rid, p in failed:
            if not p.future.done():
                p.future.set_result(error_reply(rid, device_id, code, f"{p.cmd}: {message}"))
        self._on_lost(device_id, code, message)

    # -- devices that went away ------------------------------------------------
    def device_offline(self, device_id: str) -> None:
        """Not failed at once: a restarted agent re-sends finished results from its outbox."""
        self._offline_since.setdefault(device_id, time.monotonic())
        self._arm(device_id, self.offline_grace_s)

    def device_back(self, device_id: str, same_process: bool) -> None:
        if device_id not in self._offline_since:
            return
        if same_process:  # the same agent process (same start time): the network broke, not the device
            timer = self._grace_timers.pop(device_id, None)
            if timer is not None:
                timer.cancel()
            self._offline_since.pop(device_id, None)
        else:  # a new process: give its outbox a moment, then fail what it cannot answer any more
            self._arm(device_id, RESETTLE_S)

    def close(self) -> None:
        for timer in list(self._grace_timers.values()):
            timer.cancel()

    def _arm(self, device_id: str, delay_s: float) -> None:
        old = self._grace_timers.pop(device_id, None)
        if old is not None:
            old.cancel()
        timer = threading.Timer(delay_s, self._expire, [device_id])
        timer.daemon = True
        self._grace_timers[device_id] = timer
        timer.start()

    def _expire(self, device_id: str) -> None:
        """Requests sent before the device went away and still unanswered are lost: fail them now."""
        since = self._offline_since.pop(device_id, None)
        self._grace_timers.pop(device_id, None)
        if since is None:
            return
        self.fail_device(
            device_id,
            ErrorCode.TIMEOUT,
            "device went offline" if self._gone(device_id) else "device restarted and the request was lost with it",
            before=since,
        )
