"""The agent's side of training: owns the TensorFlow worker process.

The worker is spawned on ``train_begin`` (a fresh interpreter: nothing of the
agent's memory is shared), kept warm across rounds, and ended on ``train_end``,
when the agent stops, or by itself after ``worker_idle_s``. If it died or idled
out between rounds of the same run, the next round re-begins it transparently.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from typing import Any

from .common.childproc import Child, ChildGone, ChildTimeout
from .protocol.errors import ErrorCode, ProtocolError

log = logging.getLogger("edge_agent.trainer")
BEGIN_TIMEOUT_S = 600.0  # TensorFlow import + model build on a slow Pi
ROUND_TIMEOUT_S = 24 * 3600.0


def _worker_main(*args: Any) -> None:
    """The worker's entry point, by way of this module: importing :mod:`.worker` here, in the
    agent, would load numpy into the idle agent for good (~11 MB)."""
    from .worker import main

    main(*args)


class Trainer:
    def __init__(self, settings: dict[str, Any]):
        self.settings = settings
        self._child: Child | None = None
        self._lock = threading.Lock()
        self.run_id: str | None = None
        self._begin_msg: dict[str, Any] | None = None
        self.begin_info: dict[str, Any] | None = None

    @property
    def alive(self) -> bool:
        return self._child is not None and self._child.alive

    @property
    def pid(self) -> int | None:
        return self._child.pid if self.alive else None

    def _spawn(self) -> None:
        worker_settings = {
            k: self.settings.get(k)
            for k in ("data", "data_shard", "data_partition", "data_alpha", "data_seed", "data_label_column")
        }
        self._child = Child(
            _worker_main,
            (worker_settings, float(self.settings["worker_idle_s"]), int(self.settings["train_threads"])),
            "edgeprune-train-worker",
        )
        log.info("training worker started (pid %s)", self._child.pid)

    def _request(self, msg: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """One request to the worker (the caller holds the lock); worker failures become error replies."""
        assert self._child is not None
        try:
            reply = self._child.request(msg, timeout_s)
        except ChildTimeout:
            self._close_locked(kill=True)
            raise ProtocolError(
                ErrorCode.TIMEOUT, f"training worker did not answer within {timeout_s:.0f} s; killed"
            ) from None
        except ChildGone as exc:
            if exc.before_send:
                raise ProtocolError(ErrorCode.INTERNAL, f"training worker is gone (exit code {exc.exitcode})") from None
            self._child = None
            raise ProtocolError(
                ErrorCode.INTERNAL, f"training worker died (exit code {exc.exitcode}); the agent is " "still up"
            ) from None
        if not reply.get("ok"):
            raise ProtocolError(ErrorCode.coerce(reply.get("code")), reply.get("message", "worker error"))
        return reply

    def prepare(self, run_id: str) -> bool:
        """Start the worker now (TensorFlow import, data loading) so it overlaps the
        coordinator's own set-up; ``begin`` then finds it warm. True if one was started."""
        with self._lock:
            if self.alive and self.run_id == run_id:
                return False
            if self.alive:
                self._close_locked()
            self._spawn()
            self.run_id = run_id
            return True

    def begin(self, run_id: str, msg: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            if self.alive and self.run_id != run_id:
                self._close_locked()
            if not self.alive:
                self._spawn()
            self._begin_msg = {"op": "begin", **msg}
            self.run_id = run_id
            t0 = time.perf_counter()
            info = self._request(self._begin_msg, BEGIN_TIMEOUT_S)
            info["begin_s"] = round(time.perf_counter() - t0, 3)
            info["worker_pid"] = self._child.pid if self._child else None
            info.pop("ok", None)
            self.begin_info = info
            return info

    def round(self, run_id: str, msg: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            if self.run_id != run_id or self._begin_msg is None:
                raise ProtocolError(ErrorCode.BAD_ARGS, f"run {run_id} has not begun on this device (send train_begin)")
            restarted = False
            if not self.alive:  # idled out or crashed between rounds: start again, same run
                self._spawn()
                self._request(self._begin_msg, BEGIN_TIMEOUT_S)
                restarted = True
            reply = self._request({"op": "round", **msg}, ROUND_TIMEOUT_S)
            reply["metrics"]["worker_restarted"] = restarted
            return reply

    def kill_now(self) -> None:
        """Kill the worker without waiting for a round in progress (agent shutdown)."""
        child = self._child
        if child is not None:
            child.kill()

    def close(self, kill: bool = False) -> None:
        with self._lock:
            self._close_locked(kill)

    def _close_locked(self, kill: bool = False) -> None:
        child, self._child = self._child, None
        self.run_id = None
        self._begin_msg = None
        if child is None:
            return
        child.close(kill)
        log.info("training worker stopped (exit code %s)", child.exitcode)
        _stop_resource_tracker()


def _stop_resource_tracker() -> None:
    """Spawning the worker also started multiprocessing's resource-tracker process (~13 MB), which
    would outlive the worker for the agent's whole life; stop it while no spawned child is alive
    (the next spawn starts it again). Private API: if it moves, the tracker just stays."""
    if multiprocessing.active_children():
        return
    try:
        from multiprocessing import resource_tracker

        resource_tracker._resource_tracker._stop()
    except (AttributeError, OSError, RuntimeError) as exc:  # ChildProcessError is an OSError
        log.debug("resource tracker left running: %s", exc)
