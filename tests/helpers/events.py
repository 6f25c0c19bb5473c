"""Read a TensorBoard run back with TensorBoard's own event reader (what the dashboards see)."""

from __future__ import annotations

from pathlib import Path


def read(logdir: Path) -> dict[str, tuple[str, list[int]]]:
    """``{tag: (plugin name, steps)}`` of one TensorBoard run directory, plus ``"__graph__"`` when it has one."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(logdir), size_guidance={ea.TENSORS: 0})
    acc.Reload()
    tags = {
        t: (acc.SummaryMetadata(t).plugin_data.plugin_name, [e.step for e in acc.Tensors(t)])
        for t in acc.Tags()["tensors"]
    }
    if acc.Tags()["graph"]:
        tags["__graph__"] = ("graph", [0])
    return tags


def values(logdir: Path, tag: str) -> list[float]:
    """A scalar tag's values, in step order."""
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.util import tensor_util

    acc = ea.EventAccumulator(str(logdir), size_guidance={ea.TENSORS: 0})
    acc.Reload()
    return [float(tensor_util.make_ndarray(e.tensor_proto)) for e in sorted(acc.Tensors(tag), key=lambda e: e.step)]
