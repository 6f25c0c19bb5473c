"""A spawned child process served over a pipe, one request at a time.

Both heavy TensorFlow holders use it: the agent's training worker
(:mod:`.trainer`) and the coordinator's model worker
(:mod:`coordinator.model_worker`). A fresh interpreter (``spawn``) shares none
of the parent's memory, so the parent stays small and gets everything back when
the child ends. Requests and replies are dicts; ``{"op": "end"}`` asks the child
to exit.
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
