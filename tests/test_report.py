"""The HTML report's figures and deployment section from stored rows, at fleet sizes the main-job test
does not reach (rendered with matplotlib; no TensorFlow, no broker)."""

from __future__ import annotations

import re

from coordinator import deployment, report


def _data(devices: int, rounds: int) -> dict:
    fmts = ["dense", "sparse", "sparse-int8", "fp16"]
    arts = [
        {"name": f"m-{f}", "format": f, "sha256": f * 8, "bytes": b, "gzip_bytes": b // 2, "sparsity": 0.8}
        | {"accuracy": a, "accuracy_on": "digits-test (359 examples)", "weights": 0, "tensors": 0}
        for f, b, a in zip(fmts, (400_000, 150_000, 60_000, 200_000), (0.95, 0.95, 0.93, 0.95))
    ]
    bench = [
        {"device_id": f"pi-{d:03d}", "artifact": a["name"], "sha256": a["sha256"], "status": "ok"}
        | {"latency_ms": {"p50": 1.0 + d * 0.01 + i * 0.2, "p90": 2.0 + i, "p99": 3.0 + i}, "energy": {}}
        for d in range(devices)
        for i, a in enumerate(arts)
    ]
    rows = [
        {"round": r, "accuracy": 0.5 + r / 40, "loss": 1.0, "sparsity": 0.8 * r / rounds, "clients_ok": 2}
        | {"clients_selected": 2, "bytes_up_per_client": 5e4, "bytes_down_per_client": 1e5, "wall_s": 1.0}
        | {"dense_fp32_bytes": 4e5, "sparsity_per_tensor": {"conv/kernel": 0.8 * r / rounds}, "applied": True}
        for r in range(1, rounds + 1)
    ]
    options = deployment.options(arts, bench)
    picks = deployment.recommend(options, deployment.Budget(size_kb=100))
    dep = {"budget": {"text": "size <= 100 KB"}, "options": options}
    dep["recommended"] = {d: {"artifact": p["artifact"]["artifact"], "why": p["why"]} for d, p in picks.items()}
    run = {"run_id": "r", "kind": "train", "fleet": "f", "state": "done", "config": {}, "summary": {}}
    return {"run": run, "generated": "now", "rounds": rows, "artifacts": arts, "bench": bench, "deployment": dep}


def test_a_large_fleet_gets_one_box_per_variant_and_a_pick_per_device(tmp_path):
    data = _data(devices=40, rounds=10)
    report.write_html(data, str(tmp_path / "r.html"))
    html = (tmp_path / "r.html").read_text()
    titles = re.findall(r"<h3>([^<]+)</h3>", html)
    assert "Latency per variant across devices" in titles and "Latency per variant per device" not in titles
    assert html.count("ship <b>m-sparse-int8</b>") == 40  # the only one within 100 KB, on every device


def test_one_round_and_one_device(tmp_path):
    data = _data(devices=1, rounds=1)
    report.write_html(data, str(tmp_path / "r.html"))
    titles = re.findall(r"<h3>([^<]+)</h3>", (tmp_path / "r.html").read_text())
    assert titles[:3] == ["Accuracy and sparsity per round", "Sparsity per tensor", "Bytes per round"]
    assert "Latency per variant per device" in titles
