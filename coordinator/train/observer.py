"""How the loop reports: a small interface the terminal Reporter (and tests) implement."""

from __future__ import annotations

from typing import Any, Protocol


class Observer(Protocol):
    def say(self, msg: str) -> None: ...
    def warn(self, msg: str) -> None: ...
    def round_header(self) -> None: ...
    def round_progress(self, rnd: int, done: int, total: int) -> None: ...
    def round_done(self, row: dict[str, Any]) -> None: ...


class Silent:
    """An observer that keeps nothing (library use, tests)."""

    def say(self, msg: str) -> None:
        pass

    def warn(self, msg: str) -> None:
        pass

    def round_header(self) -> None:
        pass

    def round_progress(self, rnd: int, done: int, total: int) -> None:
        pass

    def round_done(self, row: dict[str, Any]) -> None:
        pass
