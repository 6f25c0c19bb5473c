"""Progress for long jobs: a table row per round, a live client counter within a round.

Writes to stderr so ``--json`` output on stdout stays clean; quiet in JSON mode.
"""

from __future__ import annotations

import sys
from typing import Any

from . import views


class Reporter:
    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self._console = None
        self._status = None
        if not quiet:
            try:
                from rich.console import Console

                self._console = Console(stderr=True, highlight=False, soft_wrap=True)
            except ImportError:
                pass

    def say(self, msg: str) -> None:
        """Plain text: messages carry device-supplied text (errors, tensor names), so no markup."""
        if self.quiet:
            return
        if self._console:
            self._console.print(msg, markup=False)
        else:
            print(msg, file=sys.stderr, flush=True)

    def warn(self, msg: str) -> None:
        if self.quiet:
            return
        if self._console:
            from rich.text import Text

            self._console.print(Text.assemble(("warning: ", "yellow"), msg))
        else:
            print(f"warning: {msg}", file=sys.stderr, flush=True)

    def round_header(self) -> None:
        self.say(views.line_header(views.ROUNDS))

    def round_progress(self, rnd: int, done: int, total: int) -> None:
        if self.quiet or self._console is None or not self._console.is_terminal:
            return
        text = f"round {rnd}: {done}/{total} clients done"
        if self._status is None:
            self._status = self._console.status(text)
            self._status.start()
        else:
            self._status.update(text)

    def round_done(self, row: dict[str, Any]) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None
        self.say(
            views.line(views.ROUNDS, {**row, "applied": True})
            + (f"  [{row['failures']} failed]" if row.get("failures") else "")
            + ("  NOT APPLIED" if row.get("applied") is False else "")
        )
        for dev, why in (row.get("failure_reasons") or {}).items():
            self.warn(f"round {row['round']}: {dev}: {why}")
