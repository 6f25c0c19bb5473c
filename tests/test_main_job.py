"""The main job through the CLI, as a user runs it: train -> export -> bench -> report,
and the HTML report opened in headless Chromium."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import browser, events

pytestmark = [pytest.mark.slow, pytest.mark.tf]


def cli(home, *args, timeout=900):
    out = subprocess.run(
        [sys.executable, "-m", "coordinator", *args, "--home", str(home)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.mark.parametrize("rounds", [1, 10])
def test_train_export_bench_report(mosquitto, agents, tmp_path, rounds):
    for i in range(2):
        agents(mosquitto.url, f"pi{i}", "job", "--data", "digits", "--data-shard", f"{i}/2", "--train-threads", "1")
    home = tmp_path / "home"
    common = ["--broker", mosquitto.url, "--fleet", "job"]
    train = ["--rounds", str(rounds), "--sparsity", "0.5", "--local-epochs", "1", "--wait-for", "2", "--json"]
    run = json.loads(cli(home, "train", *common, *train).stdout)
    assert run["state"] == "done" and len(run["rounds"]) == rounds
    exported = json.loads(cli(home, "export", run["run_id"], "--json").stdout)
    assert {a["format"] for a in exported["artifacts"]} == {"dense", "sparse", "sparse-int8", "fp16"}
    for a in exported["artifacts"]:  # read back from the .tflite, equal to the trained global mask
        assert abs(a["sparsity"] - run["final_sparsity"]) < 0.005, a
        # each .tflite scored on the run's eval data: the float variants agree with training's own figure
        assert a["accuracy_on"] == "digits-test (359 examples)"
        if a["format"] in ("dense", "sparse"):
            assert a["accuracy"] == pytest.approx(run["final_accuracy"], abs=0.006), a
    bench = json.loads(cli(home, "bench", *common, "--model", run["run_id"], "--runs", "50", "--json").stdout)
    assert set(bench["devices"]) == {"pi0", "pi1"}
    assert all(r["status"] == "ok" for d in bench["devices"].values() for r in d["artifacts"])
    board = events.read(Path(bench["tensorboard"]))  # the benchmark as its own TensorBoard run
    assert Path(bench["tensorboard"]).parent == Path(run["run_dir"]) / "tensorboard"
    for dev in ("pi0", "pi1"):
        for a in exported["artifacts"]:
            for metric in ("latency_p50_ms", "latency_p99_ms", "rss_increase_bytes"):
                assert board[f"{dev}/{a['name']}/{metric}"][0] == "scalars", (dev, a["name"], metric)
    assert board["bench"][0] == "text"
    html_path = tmp_path / "report.html"
    # a budget the dense model cannot meet but a smaller variant can: the pick must respect it
    dense = next(a for a in exported["artifacts"] if a["format"] == "dense")
    budget_kb = (dense["bytes"] - 1) / 1000
    report = json.loads(cli(home, "report", run["run_id"][:15], "--size-budget-kb", f"{budget_kb}", "--json").stdout)
    options = report["deployment"]["options"]
    assert len(options) == 8 and any(o["pareto"] for o in options)
    for dev, pick in report["deployment"]["recommended"].items():
        chosen = next(o for o in options if o["device"] == dev and o["artifact"] == pick["artifact"])
        assert chosen["bytes"] <= budget_kb * 1000 and chosen["format"] != "dense"
        within = [o for o in options if o["device"] == dev and o["bytes"] <= budget_kb * 1000]
        assert chosen["accuracy"] == max(o["accuracy"] for o in within)
    text = cli(home, "report", run["run_id"][:15], "--html", str(html_path), "--size-budget-kb", f"{budget_kb}").stdout
    assert "final accuracy" in text and "sparse-int8" in text and "pi0: ship " in text
    html = html_path.read_text()
    assert html.count("data:image/png;base64,") >= 6 and "http://" not in html and "<script" not in html
    assert "not available" in html  # this machine has no power sensor: said so, never zero
    assert "Which artifact to ship" in html and "&lt;- recommended" in html

    if not browser.available():
        pytest.skip("chromium/chromedriver not installed (./scripts/test installs them)")
    driver = browser.chromium(tmp_path / "chrome")
    try:
        driver.get(html_path.as_uri())
        assert "edgeprune report" in driver.title
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])"
        )
        assert len(images) >= 4 and all(ok and width > 100 for _, ok, width in images), images
        headings = [h.text for h in driver.find_elements("tag name", "h3")]
        for title in (
            "Accuracy and sparsity per round",
            "Sparsity per tensor",
            "Bytes per round",
            "Size per variant",
            "Latency per variant per device",
            "Accuracy, latency and size per artifact per device",
        ):
            assert title in headings
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        driver.quit()
