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

from . import deployment, output, views


def gather(store, run: dict, budget: deployment.Budget | None = None) -> dict[str, Any]:
    """Everything known about a run: config, rounds, artifacts, benchmark results, and the deployment
    options (every artifact on every device, the Pareto front, the pick per device within ``budget``)."""
    train_run, bench_id = run, None
    if run["kind"] == "bench":
        bench_id = run["run_id"]
        source = (run["config"] or {}).get("run_id")
        train_run = store.run(source) if source else None
    rid = train_run["run_id"] if train_run else None
    benches = store.bench_results(bench_id=bench_id) if bench_id else (store.bench_results(run_id=rid) if rid else [])
    artifacts = store.artifacts(rid) if rid else []
    if not artifacts and bench_id:  # a bench of files or folders: what it ran is in its config
        artifacts = (run["config"] or {}).get("artifacts") or []
    budget = budget or deployment.Budget()
    options = deployment.options(artifacts, benches)
    picks = deployment.recommend(options, budget)
    for o in options:
        o["recommended"] = (picks[o["device"]]["artifact"] or {}).get("artifact") == o["artifact"]
    return {
        "run": train_run or run,
        "bench_id": bench_id,
        "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
        "rounds": store.rounds(rid) if train_run and train_run["kind"] == "train" else [],
        "artifacts": artifacts,
        "bench": benches,
        "deployment": {
            "budget": {"latency_ms": budget.latency_ms, "size_kb": budget.size_kb, "text": budget.describe()},
            "options": options,
            "recommended": {
                d: {"artifact": (p["artifact"] or {}).get("artifact"), "why": p["why"]} for d, p in picks.items()
            },
        },
    }


def print_bench(results: list[dict]) -> None:
    views.terminal("on-device benchmark", views.BENCH, views.latest_bench(results))


def print_summary(data: dict) -> None:
    run = data["run"]
    s = run.get("summary") or {}
    print(f"run {run['run_id']} ({run['kind']}, {run['state']}), fleet {run['fleet']}")
    if data["rounds"]:
        last = data["rounds"][-1]
        acc = f"{last['accuracy'] * 100:.2f}%" if last.get("accuracy") is not None else "not evaluated"
        print(
            f"  {len(data['rounds'])} rounds; final accuracy {acc}, "
            f"sparsity {last['sparsity']:.2%}; upload {output.human_bytes(s.get('upload_bytes_per_client_round'))}"
            f"/client-round ({(s.get('ratio_vs_dense_fp32') or 0):.1f}x below dense fp32)"
        )
        if s.get("run_dir"):
            print(f"  TensorBoard: tensorboard --logdir {s['run_dir']}/tensorboard")
    if data["artifacts"]:
        views.terminal("artifacts", views.artifacts(sha_chars=0), views.with_dense(data["artifacts"]))
    if data["bench"]:
        print_bench(data["bench"])
    dep = data["deployment"]
    if dep["options"]:
        views.terminal(f"deployment ({dep['budget']['text']})", views.DEPLOYMENT, dep["options"])
        for dev, pick in dep["recommended"].items():
            print(f"  {dev}: {'ship ' + pick['artifact'] if pick['artifact'] else 'no artifact fits'} ({pick['why']})")


# -- HTML ----------------------------------------------------------------------


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


MANY_DEVICES = 16  # above this, per-device bars give way to one box per variant across devices


def _colours(variants: list[str]) -> dict[str, Any]:
    """One distinct colour per variant, the same in every figure (export's formats first, in their order)."""
    import matplotlib

    from .export import FORMATS

    order = list(FORMATS) + sorted(set(variants) - set(FORMATS))
    palette = matplotlib.colormaps["tab10"].colors
    return {v: palette[i % len(palette)] for i, v in enumerate(order)}


def _round_axis(ax, x: list[int]) -> None:
    """Whole rounds on the x axis (each round a tick in a short run), with room around a single round."""
    from matplotlib.ticker import FixedLocator, MaxNLocator

    ax.xaxis.set_major_locator(FixedLocator(x) if len(x) <= 12 else MaxNLocator(integer=True))
    if len(x) < 3:
        ax.set_xlim(min(x) - 0.5, max(x) + 0.5)
    ax.set_xlabel("round")


def _label_points(ax, xs: list, ys: list, fmt: Any, colour: str) -> None:
    """Values (``fmt``: a format string or a function) beside the points of a short run, where a line has
    too few points to read."""
    if len(xs) <= 3:
        for x, y in zip(xs, ys):
            text = fmt(y) if callable(fmt) else fmt.format(y)
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(8, 4), color=colour, fontsize=8)


def _figures(data: dict) -> list[tuple[str, str, str]]:
    """(title, caption, data URI) for every figure the data supports."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = []
    rounds = data["rounds"]
    if rounds:
        x = [r["round"] for r in rounds]
        evaluated = [r for r in rounds if r.get("accuracy") is not None]
        fig, ax = plt.subplots(figsize=(7, 3.2))
        ex, ey = [r["round"] for r in evaluated], [r["accuracy"] * 100 for r in evaluated]
        ax.plot(ex, ey, "o-", color="tab:blue")
        _label_points(ax, ex, ey, "{:.1f}%", "tab:blue")
        ax.set_ylabel("accuracy %", color="tab:blue")
        if len(evaluated) < 3:
            ax.set_ylim(0, 100)
        ax2 = ax.twinx()
        sparsity = [r["sparsity"] * 100 for r in rounds]
        ax2.plot(x, sparsity, "s--", color="tab:red")
        _label_points(ax2, x, sparsity, "{:.0f}%", "tab:red")
        ax2.set_ylabel("sparsity % of prunable weights", color="tab:red")
        ax2.set_ylim(0, 100)
        _round_axis(ax, x)
        figs.append(
            (
                "Accuracy and sparsity per round",
                "Accuracy of the global model on the coordinator's held-out data after each evaluated round "
                "(blue); sparsity of its pruned weights (red).",
                _png(fig),
            )
        )
        per_tensor = sorted({t for r in rounds for t in (r.get("sparsity_per_tensor") or {})})
        if per_tensor:
            fig, ax = plt.subplots(figsize=(7, 3.2))
            for t in per_tensor:
                ax.plot(x, [(r.get("sparsity_per_tensor") or {}).get(t, 0) * 100 for r in rounds], "o-", label=t)
            ax.set_ylabel("sparsity %")
            ax.set_ylim(0, 100)
            _round_axis(ax, x)
            ax.legend(fontsize=7, ncol=2 if len(per_tensor) > 6 else 1, loc="center left", bbox_to_anchor=(1.01, 0.5))
            figs.append(("Sparsity per tensor", "Achieved sparsity of each pruned tensor's mask per round.", _png(fig)))
        fig, ax = plt.subplots(figsize=(7, 3.2))
        for key, style, label, colour in (
            ("bytes_up_per_client", "o-", "upload per client", "tab:blue"),
            ("bytes_down_per_client", "s-", "download per client", "tab:orange"),
        ):
            ys = [r.get(key) or 0 for r in rounds]
            ax.plot(x, ys, style, label=label, color=colour)
            _label_points(ax, x, ys, output.human_bytes, colour)
        ax.axhline(rounds[0]["dense_fp32_bytes"], color="grey", ls=":", label="dense fp32 model")
        ax.set_yscale("log")
        ax.set_ylabel("bytes (payload)")
        _round_axis(ax, x)
        ax.legend(fontsize=8)
        figs.append(
            (
                "Bytes per round",
                "Exact payload bytes each client downloaded (global model) and uploaded (sparse update) per round.",
                _png(fig),
            )
        )
    arts = data["artifacts"]
    options = data["deployment"]["options"]
    colours = _colours([a["format"] for a in arts] + [o["format"] for o in options])
    if arts:
        fig, ax = plt.subplots(figsize=(7, 0.8 + 0.45 * len(arts)))
        y = list(range(len(arts)))
        ax.barh(y, [a["bytes"] / 1e3 for a in arts], color=[colours[a["format"]] for a in arts], label="raw")
        ax.barh(y, [a["gzip_bytes"] / 1e3 for a in arts], fill=False, hatch="//", edgecolor="black", label="gzip")
        ax.set_yticks(y, [a["format"] for a in arts], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("KB")
        ax.legend(fontsize=8)
        figs.append(("Size per variant", "TFLite artifact size, raw (bar) and gzip-compressed (hatched).", _png(fig)))
    if options:
        figs.append(_latency_figure(plt, options, colours))
        figs.append(_deployment_figure(plt, options, colours))
        with_energy = [o for o in options if o["energy"].get("per_inference_mj") is not None]
        if with_energy:
            fig, ax = plt.subplots(figsize=(7, 0.8 + 0.3 * len(with_energy)))
            y = list(range(len(with_energy)))
            ax.barh(
                y,
                [o["energy"]["per_inference_mj"] for o in with_energy],
                color=[colours[o["format"]] for o in with_energy],
                hatch=["" if o["energy"]["label"] == "measured" else ".." for o in with_energy],
                edgecolor="black",
            )
            ax.set_yticks(
                y, [f"{o['device']} · {o['artifact']} ({o['energy']['label']})" for o in with_energy], fontsize=7
            )
            ax.invert_yaxis()
            ax.set_xlabel("mJ per inference")
            figs.append(
                (
                    "Energy per inference",
                    "Plain bars: measured with the device's power sensor; dotted: estimated with the named "
                    "board power model (see the benchmark table).",
                    _png(fig),
                )
            )
    return figs


def _latency_figure(plt, options: list[dict], colours: dict) -> tuple[str, str, str]:
    """p50 per variant per device (horizontal bars: device names never overlap), or, for a large fleet,
    the spread of p50 across devices per variant."""
    variants = sorted({o["format"] for o in options}, key=list(colours).index)
    devices = sorted({o["device"] for o in options})
    if len(devices) > MANY_DEVICES:
        fig, ax = plt.subplots(figsize=(7, 0.8 + 0.45 * len(variants)))
        data = [[o["p50_ms"] for o in options if o["format"] == v] for v in variants]
        box = ax.boxplot(data, orientation="horizontal", patch_artist=True, tick_labels=variants)
        for patch, v in zip(box["boxes"], variants):
            patch.set_facecolor(colours[v])
        ax.invert_yaxis()
        ax.set_xlabel("p50 latency ms")
        return (
            "Latency per variant across devices",
            f"Median latency of each variant on {len(devices)} devices (box: quartiles; whiskers: 1.5 IQR).",
            _png(fig),
        )
    fig, ax = plt.subplots(figsize=(7, 0.8 + 0.22 * len(devices) * len(variants) + 0.2 * len(devices)))
    height = 0.8 / len(variants)
    for j, v in enumerate(variants):
        pts = [(i, o) for i, d in enumerate(devices) for o in options if o["device"] == d and o["format"] == v]
        ys = [i + (j - (len(variants) - 1) / 2) * height for i, _ in pts]
        ax.barh(ys, [o["p50_ms"] for _, o in pts], height, color=colours[v], label=v)
        ax.plot([o["p99_ms"] or o["p50_ms"] for _, o in pts], ys, "k|", markersize=8)
    ax.set_yticks(range(len(devices)), devices, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("latency ms (bar: p50, tick: p99)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return (
        "Latency per variant per device",
        "Median (bar) and p99 (tick) of timed inferences after warm-up, measured on each device in "
        "interleaved blocks.",
        _png(fig),
    )


def _deployment_figure(plt, options: list[dict], colours: dict) -> tuple[str, str, str]:
    """Accuracy vs latency and size vs latency, one colour per variant; the Pareto front per device ringed."""
    scored = [o for o in options if o["accuracy"] is not None]
    panels = [("size KB (.tflite file)", lambda o: o["bytes"] / 1e3, options)]
    if scored:
        panels.insert(0, ("accuracy % (.tflite on the eval data)", lambda o: o["accuracy"] * 100, scored))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1.5, 3.8), squeeze=False)
    for ax, (label, y, rows) in zip(axes[0], panels):
        ax.scatter(  # one call for all points: per-point calls took seconds at 1,000 devices
            [o["p50_ms"] for o in rows],
            [y(o) for o in rows],
            s=60,
            color=[colours[o["format"]] for o in rows],
            edgecolors=["black" if o["pareto"] else "none" for o in rows],
            linewidths=1.5,
            alpha=0.85,
            zorder=3,
        )
        for mine in deployment.by_device(rows).values():
            front = sorted((o for o in mine if o["pareto"]), key=lambda o: o["p50_ms"])
            ax.plot([o["p50_ms"] for o in front], [y(o) for o in front], "-", color="grey", lw=0.8, zorder=2)
        ax.set_xlabel("p50 latency ms (on the device)")
        ax.set_ylabel(label)
        if rows is scored:
            low, high = ax.get_ylim()
            ax.set_ylim(low, min(high, 100.5))
    for v in sorted({o["format"] for o in options}, key=list(colours).index):
        axes[0][-1].scatter([], [], color=colours[v], label=v)
    axes[0][-1].scatter([], [], facecolors="none", edgecolors="black", linewidths=1.5, label="Pareto front")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return (
        "Accuracy, latency and size per artifact per device",
        "One point per artifact per device. Ringed points are on their device's Pareto front (no other "
        "artifact there is as accurate, as fast and as small), joined per device by a grey line."
        + ("" if scored else " No accuracy: the artifacts were not scored (no eval data)."),
        _png(fig),
    )


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
    dep = data["deployment"]
    if dep["options"]:
        picks = "".join(
            f"<li><b>{html.escape(dev)}</b>: "
            + (f"ship <b>{html.escape(p['artifact'])}</b>" if p["artifact"] else "no artifact fits")
            + f" ({html.escape(p['why'])})</li>"
            for dev, p in dep["recommended"].items()
        )
        parts.append(
            f"<h2>Which artifact to ship</h2><p class='note'>Budget: {html.escape(dep['budget']['text'])} "
            "(set with <code>edgeprune report RUN --latency-budget-ms X --size-budget-kb Y</code>). Accuracy: "
            "each .tflite file scored on the eval data at export; latency: measured on the device.</p>"
            f"<ul class='picks'>{picks}</ul>" + views.html_table(views.DEPLOYMENT, dep["options"])
        )
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
