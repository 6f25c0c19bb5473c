"""The agent's recent log lines, kept in memory for ``edgeprune logs DEVICE``.

A logging handler appends each formatted record to a ring bounded in lines and
bytes; the ``logs`` command returns the lines after a sequence number, so
``logs -f`` polls without receiving a line twice. Nothing is written to disk
(systemd's journal or the supervisor's log file already keep the full log).
Thread-safe: records arrive from any thread, reads come from the network thread.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

MAX_LINES = 2000
MAX_BYTES = 512 * 1024
MAX_LINE_CHARS = 2000
REPLY_BYTES = 256 * 1024
"""At most this much log text in one reply (control messages are capped at 1 MiB)."""


class LogRing(logging.Handler):
    def __init__(self, max_lines: int = MAX_LINES, max_bytes: int = MAX_BYTES):
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self._lines: deque[tuple[int, float, str, str]] = deque()
        self._bytes = 0
        self._seq = 0
        self._max_lines, self._max_bytes = max_lines, max_bytes
        self._ring_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)[:MAX_LINE_CHARS]
        except Exception:  # a bad format argument must not break the agent's logging
            return
        with self._ring_lock:
            self._seq += 1
            self._lines.append((self._seq, record.created, record.levelname, text))
            self._bytes += len(text)
            while self._lines and (len(self._lines) > self._max_lines or self._bytes > self._max_bytes):
                self._bytes -= len(self._lines.popleft()[3])

    def since(self, seq: int = 0, max_lines: int = 200) -> dict:
        """Lines with a sequence number above ``seq`` (the newest ``max_lines`` of them, within REPLY_BYTES)."""
        with self._ring_lock:
            lines = [ln for ln in self._lines if ln[0] > seq][-max_lines:]
            first = self._lines[0][0] if self._lines else self._seq + 1
            last = self._seq
        out, size = [], 0
        for ln in reversed(lines):
            size += len(ln[3]) + 40
            if size > REPLY_BYTES:
                break
            out.append(ln)
        out.reverse()
        return {
            "lines": [{"seq": n, "ts": ts, "level": lvl, "text": t} for n, ts, lvl, t in out],
            "next": last,
            "dropped": max(0, first - seq - 1) if seq else 0,
        }
