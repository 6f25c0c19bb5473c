"""The tables a user reads, defined once: training rounds, exported artifacts, on-device benchmarks.

Each view is a list of :class:`Column` (a header and how one stored row becomes its cell).
The terminal (``output.table``; the live line of ``progress.Reporter``), the HTML report
(``report.write_html``) and ``show``/``export``/``bench`` all render the same view, so a
figure cannot read one way in the terminal and another in the report. ``--json`` prints
the stored rows themselves: the views only format.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .output import human_bytes


@dataclass(frozen=True)
class Column:
    header: str
    cell: Callable[[dict[str, Any]], Any]  # None renders as "-"
    width: int = 0  # in the fixed-width live line (progress.Reporter), right-aligned; 0: not shown there
    keep: bool = False  # never cut on a narrow terminal (ids, names)
    brief: bool = True  # shown in the terminal too; False: only in the HTML report, which has the room


def _pct(value: float | None, digits: int = 2) -> str | None:
    return None if value is None else f"{value * 100:.{digits}f}%"


def _round_label(r: dict[str, Any]) -> str:
    return f"{r['round']}" + ("" if r.get("applied", True) else " (not applied)")


ROUNDS: list[Column] = [
    Column("round", _round_label, 5, keep=True),
    Column("clients", lambda r: f"{r['clients_ok']}/{r['clients_selected']}", 8),
    Column("accuracy", lambda r: _pct(r.get("accuracy")), 8),
    Column("loss", lambda r: None if r.get("loss") is None else f"{r['loss']:.4f}", 7),
    Column("sparsity", lambda r: _pct(r["sparsity"]), 8),
    Column("up/client", lambda r: human_bytes(r.get("bytes_up_per_client")), 10),
    Column("down/client", lambda r: human_bytes(r.get("bytes_down_per_client")), 11),
    Column(
        "up vs fp32", lambda r: f"{r['up_ratio_vs_dense_fp32']:.1f}x" if r.get("up_ratio_vs_dense_fp32") else None, 10
    ),
    Column("wall", lambda r: f"{r['wall_s']:.1f}s", 7),
    Column(
        "failures",
        lambda r: "; ".join(f"{k}: {v}" for k, v in (r.get("failure_reasons") or {}).items()) or None,
        brief=False,  # the terminal lists them in a table of their own
    ),
]


def artifacts(trained_sparsity: float | None = None, *, sha_chars: int = 12) -> list[Column]:
    """Exported variants; ``vs dense fp32`` needs the dense artifact's bytes (see :func:`with_dense`)."""
    cols = [
        Column("variant", lambda a: a["format"], keep=True),
        Column("bytes", lambda a: f"{a['bytes']:,}"),
        Column("gzip", lambda a: f"{a['gzip_bytes']:,}"),
        Column("vs dense fp32", lambda a: f"{a['_dense'] / a['bytes']:.1f}x" if a.get("_dense") else None),
        Column("sparsity read back", lambda a: _pct(a["sparsity"])),
        Column("accuracy (.tflite)", lambda a: _pct(a.get("accuracy"))),
        Column("scored on", lambda a: a.get("accuracy_on"), brief=False),
    ]
    if trained_sparsity is not None:
        cols.append(Column("trained sparsity", lambda a: _pct(trained_sparsity)))
    if sha_chars:
        cols.append(Column("sha256", lambda a: a["sha256"][:sha_chars]))
    return cols


def with_dense(recs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Artifact rows with the dense variant's size beside each (for the ratio column)."""
    dense = next((a["bytes"] for a in recs if a["format"] == "dense"), None)
    return [{**a, "_dense": dense} for a in recs]


def _energy(r: dict[str, Any]) -> str:
    e = r.get("energy") or {}
    if e.get("per_inference_mj") is None:
        return "not available"
    return f"{e['per_inference_mj']:.4f} mJ ({e['label']})"


def _latency(key: str) -> Callable[[dict[str, Any]], str | None]:
    def cell(r: dict[str, Any]) -> str | None:
        lat = r.get("latency_ms") or {}
        return " / ".join(f"{lat[k]:.3f}" for k in key.split("/")) if lat else None

    return cell


def _temperature(r: dict[str, Any]) -> str:
    th = r.get("thermal") or {}
    before, after = th.get("before") or {}, th.get("after") or {}
    if before.get("temp_c") is None:
        return "not available"
    return f"{before.get('temp_c')} → {after.get('temp_c')} °C"


BENCH: list[Column] = [
    Column("device", lambda r: r["device_id"], keep=True),
    Column("artifact", lambda r: r["artifact"], keep=True),
    Column("status", lambda r: r.get("status")),
    Column(
        "runtime", lambda r: (r.get("runtime") or {}).get("name", "-") + (" (no delegate)" if r.get("fallback") else "")
    ),
    Column("delegate fallback", lambda r: (r.get("fallback") or {}).get("reason", "")[:80] or "no", brief=False),
    Column("p50 ms", _latency("p50")),
    Column("p90 / p99 ms", _latency("p90/p99")),
    Column(
        "harness/indep.",
        lambda r: f"{r['harness_vs_independent']:.3f}" if r.get("harness_vs_independent") else None,
    ),
    Column(
        "RSS +", lambda r: human_bytes((r.get("memory") or {}).get("rss_increase_bytes")) if r.get("memory") else None
    ),
    Column("energy/inference", _energy),
    Column("energy model", lambda r: (r.get("energy") or {}).get("model") or "", brief=False),
    Column("temperature", _temperature, brief=False),
    Column(
        "throttled",
        lambda r: {True: "yes", False: "no", None: "not available"}[
            (r.get("thermal") or {}).get("throttled_during_run")
        ],
        brief=False,
    ),
    Column("note", lambda r: r.get("error") or ""),
]


DEPLOYMENT: list[Column] = [  # coordinator.deployment.options rows
    Column("device", lambda o: o["device"], keep=True),
    Column("artifact", lambda o: o["artifact"], keep=True),
    Column("accuracy", lambda o: _pct(o["accuracy"])),
    Column("p50 ms", lambda o: f"{o['p50_ms']:.3f}"),
    Column("p99 ms", lambda o: None if o.get("p99_ms") is None else f"{o['p99_ms']:.3f}"),
    Column("size", lambda o: human_bytes(o["bytes"])),
    Column("RSS +", lambda o: human_bytes(o["rss_increase_bytes"]) if o.get("rss_increase_bytes") else None),
    Column("energy/inference", lambda o: _energy(o)),
    Column("Pareto", lambda o: "yes" if o["pareto"] else ""),
    Column("pick", lambda o: "<- recommended" if o.get("recommended") else ""),
]


def latest_bench(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One result per (device, artifact): the latest (results come ordered by time)."""
    latest: dict[tuple, dict[str, Any]] = {}
    for r in results:
        latest[(r["device_id"], r["artifact"])] = r
    return list(latest.values())


# -- renderers -------------------------------------------------------------------


def cells(columns: Sequence[Column], rows: Sequence[dict[str, Any]]) -> list[list[str]]:
    return [["-" if (v := c.cell(r)) is None else str(v) for c in columns] for r in rows]


def terminal(title: str | None, columns: Sequence[Column], rows: Sequence[dict[str, Any]]) -> None:
    from . import output

    columns = [c for c in columns if c.brief]
    keep = [i for i, c in enumerate(columns) if c.keep]
    output.table(title, [c.header for c in columns], cells(columns, rows), keep=keep)


def html_table(columns: Sequence[Column], rows: Sequence[dict[str, Any]]) -> str:
    head = "".join(f"<th>{html.escape(c.header)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in cells(columns, rows)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def line_header(columns: Sequence[Column]) -> str:
    """The header of the fixed-width live table (columns with a width)."""
    return "  ".join(f"{c.header:>{c.width}}" for c in columns if c.width)


def line(columns: Sequence[Column], row: dict[str, Any]) -> str:
    """One row of the fixed-width live table."""
    return "  ".join(f"{('-' if (v := c.cell(row)) is None else str(v)):>{c.width}}" for c in columns if c.width)
