"""Reports: a terminal summary and one self-contained HTML file (figures embedded as PNG).

Written for someone who did not run the job: every number says what it is and
how it was obtained (read back from the artifact, measured on the device,
or estimated with a named power model).
"""

from __future__ import annotations

import base64
import html
import io
import time
from typing import Any

from . import output, views


def gather(store, run: dict) -> dict[str, Any]:
    """Everything known about a run: config, rounds, artifacts, benchmark results."""
    train_run, bench_id = run, None
    if run["kind"] == "bench":
        bench_id = run["run_id"]
        source = (run["config"] or {}).get("run_id")
        train_run = store.run(source) if source else None
    rid = train_run["run_id"] if train_run else None
    benches = store.bench_results(bench_id=bench_id) if bench_id else (store.bench_results(run_id=rid) if rid else [])
    return {
        "run": train_run or run,
        "bench_id": bench_id,
        "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
        "rounds": store.rounds(rid) if train_run and train_run["kind"] == "train" else [],
        "artifacts": store.artifacts(rid) if rid else [],
        "bench": benches,
    }


def print_bench(results: list[dict]) -> None:
    views.terminal("on-device benchmark", views.BENCH, views.latest_bench(results))


def print_summary(data: dict) -> None:
    run = data["run"]
    s = run.get("summary") or {}
    print(f"run {run['run_id']} ({run['kind']}, {run['state']}), fleet {run['fleet']}")
    if data["rounds"]:
        last = data["rounds"][-1]
        print(
            f"  {len(data['rounds'])} rounds; final accuracy {last['accuracy'] * 100:.2f}%, "
            f"sparsity {last['sparsity']:.2%}; upload {output.human_bytes(s.get('upload_bytes_per_client_round'))}"
            f"/client-round ({(s.get('ratio_vs_dense_fp32') or 0):.1f}x below dense fp32)"
        )
    if data["artifacts"]:
        views.terminal("artifacts", views.artifacts(sha_chars=0), views.with_dense(data["artifacts"]))
    if data["bench"]:
        print_bench(data["bench"])


# -- HTML ----------------------------------------------------------------------


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _figures(data: dict) -> list[tuple[str, str, str]]:
    """(title, caption, data URI) for every figure the data supports."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = []
    rounds = data["rounds"]
    if rounds:
        x = [r["round"] for r in rounds]
        fig, ax = plt.subplots(figsize=(7, 3.2))
        ax.plot(x, [(r["accuracy"] or 0) * 100 for r in rounds], "o-", color="tab:blue", label="accuracy (held-out)")
        ax.set_xlabel("round")
        ax.set_ylabel("accuracy %", color="tab:blue")
        ax2 = ax.twinx()
        ax2.plot(x, [r["sparsity"] * 100 for r in rounds], "s--", color="tab:red", label="sparsity")
        ax2.set_ylabel("sparsity % of prunable weights", color="tab:red")
        figs.append(
            (
                "Accuracy and sparsity per round",
                "Accuracy of the global model on the coordinator's held-out "
                "data after each round; sparsity of its pruned weights.",
                _png(fig),
            )
        )
        fig, ax = plt.subplots(figsize=(7, 3.2))
        ax.plot(x, [r.get("bytes_up_per_client") or 0 for r in rounds], "o-", label="upload per client")
        ax.plot(x, [r.get("bytes_down_per_client") or 0 for r in rounds], "s-", label="download per client")
        ax.axhline(rounds[0]["dense_fp32_bytes"], color="grey", ls=":", label="dense fp32 model")
        ax.set_yscale("log")
        ax.set_xlabel("round")
        ax.set_ylabel("bytes (payload)")
        ax.legend(fontsize=8)
        figs.append(
            (
                "Bytes per round",
                "Exact payload bytes each client downloaded (global model) and uploaded " "(sparse update) per round.",
                _png(fig),
            )
        )
    arts = data["artifacts"]
    if arts:
        fig, ax = plt.subplots(figsize=(7, 3.2))
        names = [a["format"] for a in arts]
        ax.bar([i - 0.2 for i in range(len(arts))], [a["bytes"] / 1e3 for a in arts], 0.4, label="raw")
        ax.bar([i + 0.2 for i in range(len(arts))], [a["gzip_bytes"] / 1e3 for a in arts], 0.4, label="gzip")
        ax.set_xticks(range(len(arts)), names)
        ax.set_ylabel("KB")
        ax.legend(fontsize=8)
        figs.append(("Size per variant", "TFLite artifact size, raw and gzip-compressed.", _png(fig)))
    bench = [r for r in views.latest_bench(data["bench"]) if r.get("latency_ms")]
    if bench:
        labels = [f"{r['device_id']}\n{r['artifact']}" for r in bench]
        p50 = [r["latency_ms"]["p50"] for r in bench]
        p90 = [r["latency_ms"]["p90"] for r in bench]
        p99 = [r["latency_ms"]["p99"] for r in bench]
        fig, ax = plt.subplots(figsize=(max(7, len(bench) * 1.1), 3.6))
        ax.bar(range(len(bench)), p50, color="tab:green", label="p50")
        ax.errorbar(
            range(len(bench)),
            p50,
            yerr=[[0] * len(bench), [b - a for a, b in zip(p50, p90)]],
            fmt="none",
            ecolor="black",
            capsize=4,
            label="p90",
        )
        ax.plot(range(len(bench)), p99, "k_", markersize=14, label="p99")
        ax.set_xticks(range(len(bench)), labels, fontsize=7)
        ax.set_ylabel("latency ms")
        ax.legend(fontsize=8)
        figs.append(
            (
                "Latency per variant per device",
                "Median (bar), p90 (whisker) and p99 (tick) of timed "
                "inferences after warm-up, measured on each device in interleaved blocks.",
                _png(fig),
            )
        )
        with_energy = [r for r in bench if (r.get("energy") or {}).get("per_inference_mj") is not None]
        if with_energy:
            fig, ax = plt.subplots(figsize=(max(7, len(with_energy) * 1.1), 3.2))
            colors = ["tab:orange" if r["energy"]["label"] == "measured" else "tab:grey" for r in with_energy]
            ax.bar(range(len(with_energy)), [r["energy"]["per_inference_mj"] for r in with_energy], color=colors)
            ax.set_xticks(
                range(len(with_energy)),
                [f"{r['device_id']}\n{r['artifact']}\n({r['energy']['label']})" for r in with_energy],
                fontsize=7,
            )
            ax.set_ylabel("mJ per inference")
            figs.append(
                (
                    "Energy per inference",
                    "Orange: measured with the device's power sensor; grey: "
                    "estimated with the named board power model.",
                    _png(fig),
                )
            )
    return figs


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1000px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f3f3f3}figure{margin:1.5em 0}figcaption{font-size:13px;color:#555}img{max-width:100%}
.note{font-size:13px;color:#555}"""


def write_html(data: dict, path: str) -> None:
    run = data["run"]
    cfg = run.get("config") or {}
    parts = [
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>edgeprune report {html.escape(run['run_id'])}"
        f"</title><style>{_CSS}</style></head><body>",
        f"<h1>edgeprune report: {html.escape(run['run_id'])}</h1>",
        f"<p class='note'>{html.escape(run['kind'])} run on fleet {html.escape(str(run['fleet']))}, state "
        f"{html.escape(run['state'])}; report generated {data['generated']}.</p>",
    ]
    if run["kind"] == "train":
        parts.append("<h2>Training</h2>")
        keys = ("model", "rounds", "sparsity", "schedule", "granularity", "mask_policy", "local_epochs")
        keys += ("batch_size", "lr", "num_params", "dense_fp32_bytes")
        settings = [views.Column("setting", lambda r: r["k"]), views.Column("value", lambda r: r["v"])]
        parts.append(views.html_table(settings, [{"k": k, "v": cfg.get(k)} for k in keys]))
    for title, caption, uri in _figures(data):
        parts.append(
            f"<figure><h3>{html.escape(title)}</h3><img alt='{html.escape(title)}' src='{uri}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    if data["rounds"]:
        parts.append("<h2>Rounds</h2>" + views.html_table(views.ROUNDS, data["rounds"]))
    if data["artifacts"]:
        parts.append(
            "<h2>Artifacts</h2><p class='note'>Sparsity is read back from each .tflite file's weight "
            "tensors, not taken from the training config.</p>"
            + views.html_table(views.artifacts(sha_chars=16), views.with_dense(data["artifacts"]))
        )
    if data["bench"]:
        parts.append("<h2>On-device benchmark</h2>" + views.html_table(views.BENCH, views.latest_bench(data["bench"])))
    parts.append("</body></html>")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
