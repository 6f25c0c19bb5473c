"""Which artifact to ship to which device: every exported artifact on every device, its Pareto front, a pick.

Pure logic over stored rows (no I/O): the report renders it (terminal, HTML, ``--json``). An option is one
artifact benchmarked on one device: its accuracy (the .tflite file scored on the eval data at export), its
median latency measured on that device, and its size. On each device, an option is on the Pareto front
when no other option there is at least as good in all three and better in one (an unknown accuracy
compares with nothing). The pick under a budget is the most accurate option within it; among equally
accurate ones, the smallest of those within :data:`LATENCY_TIE` of the fastest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

KB = 1000  # bytes in the KB of --size-budget-kb (as everywhere edgeprune prints sizes)
LATENCY_TIE = 0.05  # p50s within 5% of the fastest count as equally fast: closer than repeated runs agree


@dataclass(frozen=True)
class Budget:
    latency_ms: float | None = None  # p50 on the device
    size_kb: float | None = None  # the .tflite file

    def admits(self, o: dict[str, Any]) -> bool:
        return (self.latency_ms is None or o["p50_ms"] <= self.latency_ms) and (
            self.size_kb is None or o["bytes"] <= self.size_kb * KB
        )

    def describe(self) -> str:
        parts = [f"p50 <= {self.latency_ms:g} ms" if self.latency_ms is not None else ""]
        parts.append(f"size <= {self.size_kb:g} KB" if self.size_kb is not None else "")
        return ", ".join(p for p in parts if p) or "no budget"


def options(artifacts: list[dict[str, Any]], bench: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (device, artifact) that ran: the latest result of each, joined to its artifact
    record by sha256 (or name), with ``pareto`` marked per device."""
    by_sha = {a["sha256"]: a for a in artifacts}
    by_name = {a["name"]: a for a in artifacts}
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for r in bench:
        if r.get("status") == "ok" and (r.get("latency_ms") or {}).get("p50") is not None:
            latest[(r["device_id"], r["artifact"])] = r
    rows = []
    for (dev, name), r in sorted(latest.items()):
        a = by_sha.get(r.get("sha256") or "") or by_name.get(name) or {}
        rows.append(
            {
                "device": dev,
                "artifact": name,
                "format": a.get("format", name),
                "accuracy": a.get("accuracy"),
                "p50_ms": r["latency_ms"]["p50"],
                "p99_ms": r["latency_ms"].get("p99"),
                "bytes": a.get("bytes") if a.get("bytes") is not None else r.get("bytes", 0),
                "rss_increase_bytes": (r.get("memory") or {}).get("rss_increase_bytes"),
                "energy": r.get("energy") or {},
            }
        )
    for mine in by_device(rows).values():
        for row in mine:
            row["pareto"] = not any(dominates(o, row) for o in mine if o is not row)
    return rows


def by_device(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows grouped per device (devices sorted), each group in the rows' order: one pass, not one per device."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["device"], []).append(r)
    return dict(sorted(groups.items()))


def dominates(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """``a`` is at least as accurate, fast and small as ``b``, and better in one of them."""
    if (a["accuracy"] is None) != (b["accuracy"] is None):
        return False
    acc_a, acc_b = a["accuracy"] or 0.0, b["accuracy"] or 0.0
    no_worse = acc_a >= acc_b and a["p50_ms"] <= b["p50_ms"] and a["bytes"] <= b["bytes"]
    better = acc_a > acc_b or a["p50_ms"] < b["p50_ms"] or a["bytes"] < b["bytes"]
    return no_worse and better


def recommend(rows: list[dict[str, Any]], budget: Budget) -> dict[str, dict[str, Any]]:
    """Per device: ``{"artifact": row or None, "why": text}``: the pick within ``budget``, or why none."""
    out: dict[str, dict[str, Any]] = {}
    for dev, mine in by_device(rows).items():
        fits = [r for r in mine if budget.admits(r)]
        if not fits:
            fastest = min(mine, key=lambda r: r["p50_ms"])
            smallest = min(mine, key=lambda r: r["bytes"])
            out[dev] = {
                "artifact": None,
                "why": f"nothing within {budget.describe()}: fastest is {fastest['artifact']} at "
                f"{fastest['p50_ms']:.3f} ms, smallest {smallest['artifact']} at {smallest['bytes'] / KB:.1f} KB",
            }
            continue
        top = max(_accuracy(r) for r in fits)
        tied = [r for r in fits if _accuracy(r) == top]
        fastest = min(r["p50_ms"] for r in tied)
        best = min(
            (r for r in tied if r["p50_ms"] <= fastest * (1 + LATENCY_TIE)), key=lambda r: (r["bytes"], r["p50_ms"])
        )
        acc = f"{best['accuracy'] * 100:.2f}% accuracy, " if best["accuracy"] is not None else "accuracy unknown, "
        out[dev] = {
            "artifact": best,
            "why": f"{acc}{best['p50_ms']:.3f} ms p50, {best['bytes'] / KB:.1f} KB; "
            f"the most accurate of {len(fits)} of {len(mine)} "
            + ("(no budget given)" if budget == Budget() else f"within {budget.describe()}"),
        }
    return out


def _accuracy(r: dict[str, Any]) -> float:
    return r["accuracy"] if r["accuracy"] is not None else -1.0  # unknown: below any measured accuracy
