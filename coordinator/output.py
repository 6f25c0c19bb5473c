"""Terminal and JSON output shared by every CLI command.

Human output uses rich tables when rich is installed (the coordinator extra)
and plain aligned text otherwise. Machine output is JSON on stdout; every
failure in ``--json`` mode has the one shape ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Sequence


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")
    sys.stdout.flush()


def error_obj(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def fail(message: str, *, code: str = "error", as_json: bool = False, status: int = 1) -> int:
    if as_json:
        print_json(error_obj(code, message))
    else:
        print(f"edgeprune: {message}", file=sys.stderr)
    return status


def ago(ts: float | None) -> str:
    if ts is None:
        return "never"
    delta = max(0.0, time.time() - ts)
    if delta < 60:
        return f"{delta:.0f}s ago"
    if delta < 3600:
        return f"{delta / 60:.0f}m ago"
    return f"{delta / 3600:.1f}h ago"


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} GB"


def table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [["-" if v is None else str(v) for v in row] for row in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain text fallback
        if title:
            print(title)
        widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
        print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
        for r in cells:
            print("  ".join(v.ljust(w) for v, w in zip(r, widths)))
        return
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c)
    for r in cells:
        t.add_row(*r)
    Console(width=None if sys.stdout.isatty() else 200).print(t)
