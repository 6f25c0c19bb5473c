"""Terminal and JSON output shared by every CLI command.

Human output uses rich tables when rich is installed (the coordinator extra)
and plain aligned text otherwise. Machine output is JSON on stdout; every
failure in ``--json`` mode has the one shape ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import json
import os
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


def table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]], keep: Sequence[int] = (0,)) -> None:
    """A table on stdout. Columns in ``keep`` (ids, artifact names) are never cut; the others wrap.

    On a terminal (or with COLUMNS set) rich draws it at that width; piped, it is plain aligned
    text at its natural width, for grep and less. Cells are plain text: device-supplied strings
    (error messages, tensor names) are never read as markup.
    """
    cells = [["-" if v is None else str(v) for v in row] for row in rows]
    try:
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text
    except ImportError:
        Console = None
    if Console is None or (not sys.stdout.isatty() and not os.environ.get("COLUMNS")):
        if title:
            print(title)
        widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
        print("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip())
        for r in cells:
            print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
        return
    t = Table(title=title, title_justify="left")
    for i, c in enumerate(columns):
        if i in keep:
            t.add_column(c, no_wrap=True, min_width=max([len(c)] + [len(r[i]) for r in cells]))
        else:
            t.add_column(c, overflow="fold")
    for r in cells:
        t.add_row(*[Text(v) for v in r])
    Console(highlight=False).print(t)
