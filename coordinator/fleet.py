"""What the coordinator knows of each device of one fleet: presence, the zigbee2mqtt way.

A device's retained ``status`` and ``caps`` say what it was when it last spoke; live
messages (heartbeats, replies, chunks) say it is there now. A device is *live* when its
state is online or busy (:func:`is_live`); it can train when :func:`training_blocker`
finds nothing in its way.

Threads: the session's MQTT thread writes the views (:meth:`Presence.update_status`,
:meth:`Presence.update_caps`, :meth:`Presence.heard`); any thread reads them through
:meth:`Presence.device_table` and waits on :meth:`Presence.wait_for`. One lock guards the
dict of views, one condition wakes the waiters.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

from edge_agent.protocol.errors import ErrorCode, ProtocolError
from edge_agent.protocol.messages import Status

from .store import Store

LIVE_STATES = ("online", "busy")
DEVICE_STATES = ("online", "busy", "offline")  # what a device may say of itself


def is_live(row: dict[str, Any]) -> bool:
    """A :meth:`Presence.device_table` row of a device that is there now (online or busy)."""
    return row["state"] in LIVE_STATES


def training_blocker(row: dict[str, Any]) -> str | None:
    """Why a device (a :meth:`Presence.device_table` row) cannot train now; None when it can."""
    if not is_live(row):
        seen = row.get("last_seen")
        return f"{row['state']}" + (f" (last seen {time.strftime('%H:%M:%S', time.localtime(seen))})" if seen else "")
    if row.get("caps") is None:
        return "has not announced its capabilities yet"
    if not row.get("can_train"):
        return "cannot train: TensorFlow + TF-MOT not installed on it (flash --train, or pip install edgeprune[train])"
    if row.get("has_data") is False:
        return "has no training data configured (agent setting data, e.g. --data digits)"
    if row["state"] == "busy":
        return f"busy with {row.get('task') or 'another job'}"
    return None


@dataclass
class DeviceView:
    device_id: str
    status: Status | None = None
    caps: dict | None = None
    last_heard: float | None = None  # monotonic time of the last live message from the device
    last_seen_wall: float | None = None
    process_start: float | None = None  # device clock: status.ts - uptime_s; changes when the agent restarts

    def state(self, now: float, stale_after_beats: int, probe_deadline: float | None) -> str:
        if self.status is None:
            return "unknown"
        if self.status.state == "offline":
            return "offline"
        beat = self.status.heartbeat_s or 10.0
        if self.last_heard is None:
            return "stale" if probe_deadline is not None and now >= probe_deadline else self.status.state
        if now - self.last_heard > stale_after_beats * beat:
            return "stale"
        return self.status.state


def _row(device_id: str, state: str, caps: dict | None, last_seen: float | None, task: str | None) -> dict[str, Any]:
    c = caps or {}
    return {
        "device_id": device_id,
        "state": state,
        "arch": c.get("arch"),
        "runtime": next(iter(c.get("runtimes") or {}), None),
        "runtimes": c.get("runtimes") or {},
        "can_train": c.get("can_train"),
        "has_data": c.get("has_data"),
        "last_seen": last_seen,
        "task": task,
        "caps": caps,
    }


class Presence:
    """The device views of one fleet, and the registry rows they keep up to date."""

    def __init__(self, fleet: str, store: Store | None, stale_after_beats: int):
        self.fleet, self.store, self.stale_after_beats = fleet, store, stale_after_beats
        self.views: dict[str, DeviceView] = {}
        self._lock = threading.Lock()
        self.changed = threading.Condition()
        self.probe_deadline: float | None = None  # after a probe: a device that has not answered is stale

    def view(self, device_id: str) -> DeviceView:
        with self._lock:
            view = self.views.get(device_id)
            if view is None:
                view = self.views[device_id] = DeviceView(device_id)
            return view

    def forget(self, device_id: str) -> None:
        with self._lock:
            self.views.pop(device_id, None)

    def heard(self, device_id: str, retained: bool) -> None:
        if not retained:
            view = self.view(device_id)
            view.last_heard = time.monotonic()
            view.last_seen_wall = time.time()

    def notify(self) -> None:
        with self.changed:
            self.changed.notify_all()

    def update_status(self, device_id: str, status: Status, retained: bool) -> tuple[DeviceView, float | None]:
        """Take a status message; returns the view and the agent's previous process start (to tell a
        reconnect of the same process from a restart)."""
        if status.state not in DEVICE_STATES:
            raise ProtocolError(ErrorCode.BAD_FIELD, f"unknown device state {status.state!r}")
        view = self.view(device_id)
        view.status = status
        previous_start = view.process_start
        if status.state != "offline" and status.uptime_s > 0:  # a Will carries no useful uptime
            view.process_start = status.ts - status.uptime_s
        self.heard(device_id, retained)
        if self.store is not None:
            self.store.upsert_device(
                self.fleet,
                device_id,
                self.state_of(view),
                status=asdict(status),
                seen=view.last_seen_wall if not retained else None,
            )
        return view, previous_start

    def update_caps(self, device_id: str, caps: dict, retained: bool) -> None:
        view = self.view(device_id)
        view.caps = caps
        self.heard(device_id, retained)
        if self.store is not None:
            self.store.upsert_device(self.fleet, device_id, self.state_of(view), caps=caps)
        self.notify()

    def state_of(self, view: DeviceView) -> str:
        return view.state(time.monotonic(), self.stale_after_beats, self.probe_deadline)

    def probe(self, wait_s: float, announce: Callable[[], None]) -> None:
        """``announce()`` (live agents answer it), then wait until every device known from a retained
        status has answered, or ``wait_s``; one that has not is stale from then on."""
        deadline = self.probe_deadline = time.monotonic() + wait_s
        announce()
        with self.changed:
            while time.monotonic() < deadline:
                pending = [
                    v
                    for v in list(self.views.values())
                    if v.status is not None and v.status.state != "offline" and v.last_heard is None
                ]
                if self.views and not pending and time.monotonic() > deadline - wait_s + 0.3:
                    break
                self.changed.wait(min(0.1, max(0.0, deadline - time.monotonic())))
        if self.store is not None:
            for view in list(self.views.values()):
                self.store.upsert_device(self.fleet, view.device_id, self.state_of(view))

    def device_table(self) -> list[dict[str, Any]]:
        with self._lock:
            views = sorted(list(self.views.values()), key=lambda v: v.device_id)
        return [
            _row(v.device_id, self.state_of(v), v.caps, v.last_seen_wall, v.status.task if v.status else None)
            for v in views
        ]

    def fleet_rows(self) -> list[dict[str, Any]]:
        """:meth:`device_table` plus the devices the registry knows that the broker did not show now
        (offline, with when they were last seen)."""
        rows = self.device_table()
        if self.store is None:
            return rows
        known = {r["device_id"]: r for r in rows}
        for old in self.store.devices(self.fleet):
            if old["device_id"] in known:  # heard only through a retained message now: when we last heard it live
                row = known[old["device_id"]]
                row["last_seen"] = row["last_seen"] or old["last_seen"]
                continue
            state = "offline" if old["state"] != "unknown" else "unknown"
            rows.append(_row(old["device_id"], state, old["caps"], old["last_seen"], None))
        return sorted(rows, key=lambda r: r["device_id"])

    def online(self) -> list[str]:
        return [r["device_id"] for r in self.device_table() if is_live(r)]

    def count(self) -> int:
        with self._lock:
            return len(self.views)

    def wait_for(self, predicate: Callable[[list[dict[str, Any]]], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self.changed:
            while True:
                if predicate(self.device_table()):
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.changed.wait(min(remaining, 0.25))

    def wait_online(self, count: int, timeout_s: float) -> list[str]:
        self.wait_for(lambda rows: sum(is_live(r) for r in rows) >= count, timeout_s)
        return self.online()
