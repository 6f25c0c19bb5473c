"""A spawned child process served over a pipe, one request at a time.

Every process that holds a heavy runtime uses it: the agent's training worker
(:mod:`edge_agent.trainer` / :mod:`edge_agent.worker`), the simulator's pool workers
(:mod:`edge_agent.simtrain`), the bench children (:mod:`edge_agent.bench`, one per
artifact) and the coordinator's model worker (:mod:`coordinator.model_worker`). A fresh
interpreter (``spawn``) shares none of the parent's memory, so the parent stays small
and gets everything back when the child ends. Requests and replies are dicts;
``{"op": "end"}`` asks the child to exit. :class:`Child` is the parent's side (the one
thread that owns it sends and receives); :func:`serve` is the child's loop.
"""

from __future__ import annotations

import multiprocessing
import time
from typing import Any, Callable


class ChildGone(Exception):
    """The child could not take the request, or died before answering (``exitcode`` says how)."""

    def __init__(self, exitcode: int | None, before_send: bool):
        super().__init__(f"exit code {exitcode}")
        self.exitcode, self.before_send = exitcode, before_send


class ChildTimeout(Exception):
    """No answer within the time given; the child has been killed."""


def _entry(target: Callable[..., None], conn, *args: Any) -> None:
    """The child ignores Ctrl-C: the terminal sends SIGINT to the whole process group, and the parent
    decides (it ends the child with ``end`` or a kill); a child traceback would only hide its message."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    target(conn, *args)


def error_reply(exc: BaseException) -> dict[str, Any]:
    """What :func:`serve` answers when a request fails: the exception's ``code`` if it has one."""
    code = getattr(exc, "code", None)
    if isinstance(code, str):  # a WorkerError's code, or a ProtocolError's (a str enum): sent as plain text
        return {"ok": False, "code": str(getattr(code, "value", code)), "message": getattr(exc, "message", str(exc))}
    import traceback

    traceback.print_exc()  # not one of ours: the child's stderr (the agent's log) gets the whole story
    return {"ok": False, "code": "internal", "message": f"{type(exc).__name__}: {exc}"}


def serve(
    conn,
    handle: Callable[[dict[str, Any]], dict[str, Any] | tuple[dict[str, Any], Callable[[], None]]],
    *,
    idle_s: float | None = None,
    on_end: Callable[[], None] = lambda: None,
    on_error: Callable[[BaseException], dict[str, Any]] = error_reply,
) -> None:
    """The child's side: answer each request with ``handle(msg)`` until ``{"op": "end"}``, the parent's
    exit, or ``idle_s`` without a request (the memory goes back). ``handle`` may return
    ``(reply, then)``: ``then()`` runs after the reply is sent (warm-up work the parent need not wait
    for). A failing request is answered with ``on_error(exc)`` and the child keeps serving."""
    import os

    parent = os.getppid()
    while True:
        if not conn.poll(idle_s if idle_s is not None else 5.0):
            if idle_s is not None or os.getppid() != parent:
                return
            continue
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # the parent went away
        if os.getppid() != parent:
            return
        if isinstance(msg, dict) and msg.get("op") == "end":
            on_end()
            conn.send({"ok": True})
            return
        then = None
        try:
            reply = handle(msg)
            if isinstance(reply, tuple):
                reply, then = reply
        except Exception as exc:  # one bad request is not the end of the child
            reply = on_error(exc)
        conn.send(reply)
        if then is not None:
            try:
                then()
            except Exception:  # nobody waits for it; the next request will show what is wrong
                import traceback

                traceback.print_exc()


class Child:
    def __init__(self, target: Callable[..., None], args: tuple, name: str):
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        self._proc = ctx.Process(target=_entry, args=(target, child, *args), name=name, daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent

    @property
    def alive(self) -> bool:
        return self._proc.is_alive()

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    @property
    def exitcode(self) -> int | None:
        return self._proc.exitcode

    def request(self, msg: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Send ``msg`` and wait for the reply (ChildGone if it dies first, ChildTimeout after ``timeout_s``)."""
        try:
            self._conn.send(msg)
        except (BrokenPipeError, OSError):
            raise ChildGone(self._proc.exitcode, before_send=True) from None
        deadline = time.monotonic() + timeout_s
        while True:
            if self._conn.poll(0.2):
                try:
                    return self._conn.recv()
                except (EOFError, OSError):
                    break
            if not self._proc.is_alive():
                break
            if time.monotonic() > deadline:
                self.close(kill=True)
                raise ChildTimeout()
        self._proc.join(1)
        raise ChildGone(self._proc.exitcode, before_send=False)

    def kill(self) -> None:
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)

    def close(self, kill: bool = False) -> None:
        """Ask it to end (up to 10 s), then kill it if it is still there."""
        if not kill and self._proc.is_alive():
            try:
                self._conn.send({"op": "end"})
            except (BrokenPipeError, OSError):
                pass
            self._proc.join(10)
        self.kill()
