"""Which artifact to ship: the Pareto front and the pick under a budget, on hand-made rows."""

from __future__ import annotations

import numpy as np

from coordinator import deployment, tblog
from coordinator.deployment import Budget


def art(name, fmt, nbytes, acc):
    return {"name": name, "format": fmt, "sha256": name * 4, "bytes": nbytes, "accuracy": acc}


def result(dev, name, p50, status="ok"):
    return {"device_id": dev, "artifact": name, "sha256": name * 4, "status": status, "latency_ms": {"p50": p50}}


ARTS = [art("d", "dense", 400_000, 0.95), art("s", "sparse", 150_000, 0.95), art("q", "sparse-int8", 60_000, 0.93)]


def test_pareto_front_per_device():
    bench = [result("a", "d", 1.0), result("a", "s", 1.2), result("a", "q", 0.5)]
    bench += [result("b", "d", 2.0), result("b", "s", 3.0), result("b", "q", 4.0, status="failed")]
    rows = {(o["device"], o["artifact"]): o for o in deployment.options(ARTS, bench)}
    assert set(rows) == {("a", "d"), ("a", "s"), ("a", "q"), ("b", "d"), ("b", "s")}  # a failed run is no option
    # on a: d is faster than s but bigger (both on the front); q is fastest and smallest but less accurate
    assert rows["a", "d"]["pareto"] and rows["a", "s"]["pareto"] and rows["a", "q"]["pareto"]
    # a later result of the same (device, artifact) replaces the earlier one
    bench.append(result("a", "d", 1.5))
    rows = {(o["device"], o["artifact"]): o for o in deployment.options(ARTS, bench)}
    assert rows["a", "d"]["p50_ms"] == 1.5 and not rows["a", "d"]["pareto"]  # s: as accurate, faster, smaller


def test_pick_is_most_accurate_within_budget_then_fastest():
    bench = [result("a", "d", 1.0), result("a", "s", 0.9), result("a", "q", 0.5)]
    rows = deployment.options(ARTS, bench)
    assert deployment.recommend(rows, Budget())["a"]["artifact"]["artifact"] == "s"  # tie on accuracy: faster
    near = deployment.options(ARTS, [result("a", "d", 1.0), result("a", "s", 1.04), result("a", "q", 0.5)])
    assert deployment.recommend(near, Budget())["a"]["artifact"]["artifact"] == "s"  # as fast (4%) and smaller
    assert deployment.recommend(rows, Budget(size_kb=100))["a"]["artifact"]["artifact"] == "q"
    assert deployment.recommend(rows, Budget(latency_ms=0.6))["a"]["artifact"]["artifact"] == "q"
    none = deployment.recommend(rows, Budget(latency_ms=0.1, size_kb=10))["a"]
    assert none["artifact"] is None and "fastest is q at 0.500 ms" in none["why"] and "10 KB" in none["why"]


def test_unknown_accuracy_is_compared_on_speed_and_size_only():
    arts = [art("d", "dense", 400_000, None), art("q", "sparse-int8", 60_000, None)]
    rows = deployment.options(arts, [result("a", "d", 1.0), result("a", "q", 0.5)])
    front = {o["artifact"]: o["pareto"] for o in rows}
    assert front == {"d": False, "q": True}
    assert deployment.recommend(rows, Budget())["a"]["artifact"]["artifact"] == "q"


def test_histogram_buckets_and_tags():
    h = tblog.histogram(np.array([0.0, 1.0, 1.0, np.nan, 2.0]), buckets=2)
    assert h.shape == (2, 3) and h[:, 2].sum() == 4 and h[0, 0] == 0.0 and h[-1, 1] == 2.0
    assert tblog.histogram(np.array([])) is None
    assert tblog.tag("dense 1", "kernel:0") == "dense_1/kernel_0"
