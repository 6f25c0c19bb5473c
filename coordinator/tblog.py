"""What a run shows in TensorBoard: the records, built without TensorFlow, and their writer, in a TensorFlow process.

The round loop stays free of TensorFlow (see :mod:`coordinator.model_worker`), so it only *builds* records
(:func:`setup_records`, :func:`round_records`, :func:`bench_records`): plain numbers, small numpy arrays
(histogram buckets, computed here with ``np.histogram``) and text. :func:`write` runs where TensorFlow is
already imported (the model worker; a bench spawns one for the purpose) and writes them with ``tf.summary``
and TensorBoard's hparams and histogram plugins, one event-file writer per TensorBoard run:

- ``<run dir>/tensorboard``: the global model per round (``eval/``, ``sparsity/`` and ``sparsity_target/`` per
  tensor, ``weights/`` histograms of the kept values, ``bytes/`` per round and cumulative, ``clients/``,
  ``phase_s/``, ``structure/``), the model graph, the run config as text and as hparams.
- ``<run dir>/tensorboard/devices``: each device's local training, tags ``<device>/<metric>``.
- ``<run dir>/tensorboard/bench-<bench id>``: one benchmark, tags ``<device>/<artifact>/<metric>``, step 0.

``tensorboard --logdir <home>/runs`` shows every run of a coordinator home side by side.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

HISTOGRAM_BUCKETS = 30
DEVICES_RUN = "devices"  # the sub-run (directory under a run's tensorboard/) of per-device training metrics
DEVICE_METRICS = (  # (tag, key in a device's round metrics, what it is)
    ("samples", "num_samples", "examples the device trained on this round"),
    ("local_loss", "train_loss", "training loss of the device's last local epoch"),
    ("local_accuracy", "train_accuracy", "training accuracy of the device's last local epoch"),
    ("update_bytes", "update_bytes", "bytes of the sparse update the device uploaded"),
    ("train_s", "train_s", "seconds of local training (the device's own clock)"),
)


@dataclass(frozen=True)
class Record:
    """One thing to write. ``run``: the sub-run ('' is the run itself); ``kind``: scalar, histogram
    (``value`` an (k, 3) array of left edge, right edge, count), text, hparams (a dict) or graph (an
    architecture's JSON)."""

    run: str
    kind: str
    tag: str
    step: int
    value: Any
    description: str = ""


def tag(*parts: str) -> str:
    """A TensorBoard tag from names that may hold characters a summary name may not (``:``, spaces)."""
    return "/".join(re.sub(r"[^A-Za-z0-9_.\-]", "_", p) for p in parts)


def histogram(values: np.ndarray, buckets: int = HISTOGRAM_BUCKETS) -> np.ndarray | None:
    """TensorBoard's histogram tensor: rows of (left edge, right edge, count); None for no values."""
    values = np.asarray(values, np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    counts, edges = np.histogram(values, bins=buckets)
    return np.stack([edges[:-1], edges[1:], counts.astype(np.float64)], axis=1)


def setup_records(run_id: str, config: dict[str, Any], arch_json: str) -> list[Record]:
    """Once per run: the config as a text table and as hparams, and the model graph."""
    rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(config.items()))
    hparams = {k: v for k, v in config.items() if isinstance(v, (bool, int, float, str)) and v != ""}
    return [
        Record("", "text", "config", 0, f"| setting | value |\n|---|---|\n{rows}", "the run's settings"),
        Record("", "hparams", "hparams", 0, {"trial_id": run_id, "hparams": hparams}),
        Record("", "graph", "graph", 0, arch_json),
    ]


def round_records(
    rnd: int,
    row: dict[str, Any],
    gm: Any,
    targets: list[float],
    device_metrics: dict[str, dict[str, Any]],
    failures: dict[str, str],
    before: list[dict[str, Any]],
) -> list[Record]:
    """One round: the global model's scalars and histograms, and each selected device's training.

    ``row`` is the round's stored record (:func:`coordinator.train.record.round_row`, with its phase
    timings); ``targets`` the mask policy's per-tensor sparsity for this round; ``before`` the rounds
    already recorded (for the cumulative byte counts)."""
    out: list[Record] = []

    def scalar(name: str, value: Any, description: str = "", run: str = "") -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
            out.append(Record(run, "scalar", name, rnd, float(value), description))

    for key, value in (row.get("metrics") or {}).items():
        scalar(tag("eval", key), value, "the global model on the coordinator's held-out data")
    scalar("sparsity/prunable", row["sparsity"], "zeros among the prunable weights")
    scalar("sparsity/overall", row["sparsity_overall"], "zeros among all parameters")
    scalar("sparsity/schedule_target", row["target_sparsity"], "the schedule's sparsity for this round")
    for name, value in (row.get("sparsity_per_tensor") or {}).items():
        scalar(tag("sparsity", name), value, "achieved sparsity of this tensor's mask after the round")
    for name, target, info in zip(gm.names, targets, gm.infos):
        if info.kind:
            scalar(tag("sparsity_target", name), target, "the mask policy's sparsity for this tensor this round")
    for name, w, m in zip(gm.names, gm.weights, gm.masks):
        buckets = histogram(w[m] if m is not None else w)
        if buckets is not None:
            out.append(Record("", "histogram", tag("weights", name), rnd, buckets, "kept (unpruned) values"))
    for way in ("up", "down"):
        total = row[f"bytes_{way}_total"]
        scalar(f"bytes/{way}_per_client", row.get(f"bytes_{way}_per_client"), f"payload bytes per client ({way})")
        scalar(f"bytes/{way}_total", total, f"payload bytes of all clients this round ({way})")
        cumulative = total + sum(r.get(f"bytes_{way}_total") or 0 for r in before)
        scalar(f"bytes/{way}_cumulative", cumulative, f"payload bytes of all clients since round 1 ({way})")
    scalar("clients/selected", row["clients_selected"])
    scalar("clients/ok", row["clients_ok"], "updates aggregated")
    scalar("clients/failures", row["failures"])
    for phase, seconds in (row.get("timing_s") or {}).items():
        scalar(tag("phase_s", phase), seconds, "wall seconds of this phase of the round (coordinator)")
    scalar("phase_s/round", row.get("wall_s"), "wall seconds of the round, up to writing these records")
    scalar("structure/params", row["params"], "parameters after the round")
    scalar("structure/flops", row["flops"], "FLOPs of one inference after the round")
    scalar("structure/units_removed", row["units_removed"], "fraction of units removed by structured steps")
    for layer, units in (row.get("architecture") or {}).items():
        scalar(tag("structure", "units", layer), units, "units (neurons or filters) of this layer")
    for dev in sorted(set(device_metrics) | set(failures) - {"round"}):
        metrics = device_metrics.get(dev) or {}
        for name, key, description in DEVICE_METRICS:
            scalar(tag(dev, name), metrics.get(key), description, DEVICES_RUN)
        scalar(tag(dev, "failed"), 1.0 if dev in failures else 0.0, "1: the device's update was lost", DEVICES_RUN)
    return out


def bench_records(rows: list[dict[str, Any]], artifacts: list[dict[str, Any]]) -> list[Record]:
    """One benchmark (its stored result rows and the artifacts it ran): per device and artifact, at step 0."""
    out: list[Record] = []
    for a in artifacts:
        out.append(Record("", "scalar", tag(a["name"], "bytes"), 0, float(a["bytes"]), "size of the .tflite file"))
        if a.get("accuracy") is not None:
            out.append(Record("", "scalar", tag(a["name"], "accuracy"), 0, float(a["accuracy"]), "on the eval data"))
    lines = []
    for r in rows:
        base = (r["device_id"], r["artifact"])
        lat, mem, energy = r.get("latency_ms") or {}, r.get("memory") or {}, r.get("energy") or {}
        for q in ("p50", "p90", "p99"):
            if lat.get(q) is not None:
                out.append(Record("", "scalar", tag(*base, f"latency_{q}_ms"), 0, float(lat[q]), "timed inferences"))
        if mem.get("rss_increase_bytes") is not None:
            out.append(Record("", "scalar", tag(*base, "rss_increase_bytes"), 0, float(mem["rss_increase_bytes"]), ""))
        label = energy.get("label") or "not available"
        if energy.get("per_inference_mj") is not None:
            out.append(
                Record(
                    "",
                    "scalar",
                    tag(*base, f"energy_mj_per_inference_{label}"),
                    0,
                    float(energy["per_inference_mj"]),
                    f"{label}: {energy.get('model') or 'power sensor'}",
                )
            )
        p50 = f"{lat['p50']:.3f}" if lat.get("p50") is not None else "-"
        mj = f"{energy['per_inference_mj']:.4f}" if energy.get("per_inference_mj") is not None else "-"
        lines.append(f"| {r['device_id']} | {r['artifact']} | {r.get('status')} | {p50} | {mj} | {label} |")
    table = "| device | artifact | status | p50 ms | energy mJ/inference | energy is |\n|---|---|---|---|---|---|\n"
    out.append(Record("", "text", "bench", 0, table + "\n".join(lines), "energy labelled measured or estimated"))
    return out


def write(tf: Any, root: str, records: list[Record], writers: dict[str, Any]) -> None:
    """Write ``records`` under the TensorBoard directory ``root`` (in a process that imported TensorFlow).

    ``writers`` caches one ``tf.summary`` file writer per directory across calls (the caller closes them)."""
    import os

    from tensorboard.plugins.histogram import metadata as histogram_metadata
    from tensorboard.plugins.hparams import api as hp

    for sub in sorted({r.run for r in records}):
        logdir = os.path.join(root, sub) if sub else root
        writer = writers.get(logdir)
        if writer is None:
            writer = writers[logdir] = tf.summary.create_file_writer(logdir)
        with writer.as_default():
            for r in (r for r in records if r.run == sub):
                if r.kind == "scalar":
                    tf.summary.scalar(r.tag, r.value, step=r.step, description=r.description or None)
                elif r.kind == "histogram":
                    meta = histogram_metadata.create_summary_metadata(r.tag, r.description)
                    tf.summary.write(r.tag, tf.constant(r.value, tf.float64), step=r.step, metadata=meta)
                elif r.kind == "text":
                    tf.summary.text(r.tag, r.value, step=r.step, description=r.description or None)
                elif r.kind == "hparams":
                    hp.hparams(r.value["hparams"], trial_id=r.value["trial_id"])
                elif r.kind == "graph":
                    tf.summary.graph(_graph(tf, r.value))
                else:
                    raise ValueError(f"unknown TensorBoard record kind {r.kind!r}")
        writer.flush()


def _graph(tf: Any, arch_json: str) -> Any:
    """The inference graph of an architecture (weights do not matter to the graph plugin)."""
    from edge_agent.ml import models

    model = models.from_json(arch_json)
    spec = tf.TensorSpec([1, *model.input_shape[1:]], tf.float32)
    return tf.function(lambda x: model(x, training=False)).get_concrete_function(spec).graph
