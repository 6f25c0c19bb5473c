"""Structured pruning: remove whole units (Dense) and filters (Conv2D), rebuild a smaller model.

Works on the Keras architecture JSON and the weights in edgeprune's tensor order,
with numpy only (the model worker turns the result back into a Keras model).

A *producer* (Dense, Conv2D) can lose output channels if every path from its
output reaches the next producers (*consumers*, whose input channels are cut
to match) only through layers the surgery understands:

- channel-wise layers, sliced with it: BatchNormalization, DepthwiseConv2D
  (depth multiplier 1);
- layers without channel weights: activations, dropout, pooling, padding,
  global pooling;
- Flatten, after which a channel becomes one input row per spatial position
  (channels-last order) of the next Dense layer.

A producer is left whole, with the reason reported, when its channels reach a
residual Add (or any merge: all inputs must stay aligned), a model output, a
shared layer, or a layer class not listed above (custom layers included).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_agent.protocol.errors import EdgepruneError

PRODUCERS = {"Dense": "units", "Conv2D": "filters"}
CHANNELWISE = {"BatchNormalization", "DepthwiseConv2D"}
PASS = {
    "Activation",
    "ReLU",
    "LeakyReLU",
    "ELU",
    "Softmax",
    "Dropout",
    "SpatialDropout2D",
    "GaussianNoise",
    "GaussianDropout",
    "MaxPooling2D",
    "AveragePooling2D",
    "ZeroPadding2D",
    "Cropping2D",
    "UpSampling2D",
    "GlobalAveragePooling2D",
    "GlobalMaxPooling2D",
    "ActivityRegularization",
}
MERGES = {"Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum", "Concatenate", "Dot"}


class SurgeryError(EdgepruneError, ValueError):
    """A shrink that cannot be done; names the layer."""

    code = "surgery"

    def __init__(self, layer: str, why: str):
        super().__init__(f"{layer}: {why}")
        self.layer = layer


@dataclass
class Node:
    name: str
    cls: str
    config: dict
    inbound: list[str]
    shared: bool = False
    outbound: list[str] = field(default_factory=list)


@dataclass
class Graph:
    kind: str
    raw: dict
    nodes: dict[str, Node]
    outputs: set[str]


def parse(arch_json: str) -> Graph:
    raw = json.loads(arch_json)
    kind, cfg = raw.get("class_name"), raw.get("config", {})
    nodes: dict[str, Node] = {}
    if kind == "Sequential":
        prev = None
        for layer in cfg["layers"]:
            name = layer["config"]["name"]
            nodes[name] = Node(name, layer["class_name"], layer["config"], [prev] if prev else [])
            prev = name
        outputs = {prev}
    elif kind in ("Functional", "Model"):
        for layer in cfg["layers"]:
            inbound = layer.get("inbound_nodes") or []
            names = [x[0] for x in inbound[0]] if inbound else []
            nodes[layer["name"]] = Node(
                layer["name"], layer["class_name"], layer["config"], names, shared=len(inbound) > 1
            )
        outputs = {o[0] for o in cfg["output_layers"]}
    else:
        raise SurgeryError(
            str(raw.get("config", {}).get("name", "model")),
            f"a {kind} model: the surgery reads Sequential and Functional models",
        )
    for node in nodes.values():
        for src in node.inbound:
            nodes[src].outbound.append(node.name)
    return Graph(kind, raw, nodes, outputs)


@dataclass
class Plan:
    """What cutting a producer's channels touches: channel-wise layers, and consumers (flattened or not)."""

    producer: str
    channelwise: list[str]
    consumers: list[tuple[str, bool]]  # (layer, after a Flatten)
    measure_at: str = ""  # where its channels are last seen whole (after BN/activation, before a Flatten)


def analyse(graph: Graph) -> tuple[dict[str, Plan], dict[str, str]]:
    """Shrinkable producers with their plans, and the producers left whole with the reason."""
    plans: dict[str, Plan] = {}
    whole: dict[str, str] = {}
    for node in graph.nodes.values():
        if node.cls not in PRODUCERS:
            continue
        try:
            plans[node.name] = _plan(graph, node)
        except SurgeryError as exc:
            whole[node.name] = str(exc).split(": ", 1)[1]
    return plans, whole


def _plan(graph: Graph, producer: Node) -> Plan:
    if producer.shared:
        raise SurgeryError(producer.name, "a shared layer (used more than once)")
    if producer.config.get("groups", 1) != 1:
        raise SurgeryError(producer.name, "a grouped convolution")
    plan = Plan(producer.name, [], [], producer.name)
    chain = producer.name  # follows a single path, for measure_at
    todo = [(producer.name, False)]
    seen = set()
    while todo:
        name, flat = todo.pop()
        if name in graph.outputs:
            raise SurgeryError(producer.name, f"its channels reach the model output through {name}")
        for nxt in graph.nodes[name].outbound:
            if (nxt, flat) in seen:
                continue
            seen.add((nxt, flat))
            n = graph.nodes[nxt]
            if n.shared:
                raise SurgeryError(producer.name, f"its channels reach the shared layer {nxt}")
            if n.cls in PRODUCERS:
                if n.config.get("groups", 1) != 1:
                    raise SurgeryError(producer.name, f"its channels feed the grouped convolution {nxt}")
                if n.cls == "Conv2D" and flat:
                    raise SurgeryError(producer.name, f"Conv2D {nxt} after a Flatten")
                plan.consumers.append((nxt, flat))
            elif n.cls in CHANNELWISE:
                if flat:
                    raise SurgeryError(producer.name, f"{n.cls} {nxt} after a Flatten")
                if n.cls == "DepthwiseConv2D" and n.config.get("depth_multiplier", 1) != 1:
                    raise SurgeryError(producer.name, f"its channels feed {nxt}, a depthwise conv with multiplier > 1")
                channel_axes = (-1, [-1], 3, [3]) if producer.cls == "Conv2D" else (-1, [-1], 1, [1])
                if n.cls == "BatchNormalization" and n.config.get("axis") not in channel_axes:
                    raise SurgeryError(producer.name, f"BatchNormalization {nxt} is not on the channel axis")
                plan.channelwise.append(nxt)
                todo.append((nxt, flat))
                if name == chain and len(graph.nodes[name].outbound) == 1:
                    chain = nxt
            elif n.cls in PASS:
                todo.append((nxt, flat))
                if name == chain and not flat and len(graph.nodes[name].outbound) == 1:
                    chain = nxt
            elif n.cls == "Flatten":
                if flat:
                    raise SurgeryError(producer.name, f"two Flatten layers on the way ({nxt})")
                todo.append((nxt, True))
            elif n.cls in MERGES:
                raise SurgeryError(producer.name, f"its channels reach {n.cls} {nxt}, which needs its inputs aligned")
            else:
                raise SurgeryError(
                    producer.name, f"its channels reach {n.cls} {nxt}, a layer the surgery does not " "understand"
                )
    if not plan.consumers:
        raise SurgeryError(producer.name, "no layer consumes its channels")
    plan.measure_at = chain
    return plan


def units(graph: Graph) -> dict[str, int]:
    """Output units/filters of every producer."""
    return {n.name: int(n.config[PRODUCERS[n.cls]]) for n in graph.nodes.values() if n.cls in PRODUCERS}


def keep_top(
    importance: dict[str, np.ndarray], current: dict[str, int], original: dict[str, int], removed_fraction: float
) -> dict[str, np.ndarray]:
    """Per layer, the indices of the most important units so that ``removed_fraction`` of the
    layer's *original* units are gone (never more than it has now). SurgeryError if none would stay."""
    keep = {}
    for layer, score in importance.items():
        target = int(np.ceil(original[layer] * (1.0 - removed_fraction) - 1e-9))
        if target < 1:
            raise SurgeryError(layer, f"removing {removed_fraction:.0%} of its {original[layer]} units leaves none")
        k = min(target, current[layer])
        order = np.argsort(-np.asarray(score, np.float64), kind="stable")[:k]
        keep[layer] = np.sort(order)
    return keep


def shrink(arch_json: str, names: list[str], keep: dict[str, np.ndarray]) -> tuple[str, dict[str, list]]:
    """The smaller architecture and, per weight name, the slices to apply: [(axis, indices), ...].

    Use :func:`apply` with the returned slices on the weights (and the same on the masks)."""
    graph = parse(arch_json)
    plans, whole = analyse(graph)
    have = units(graph)
    by_layer: dict[str, list[str]] = {}
    for n in names:
        by_layer.setdefault(n.rsplit("/", 1)[0], []).append(n)
    slices: dict[str, list] = {}

    def cut(weight: str, axis: int, idx) -> None:
        slices.setdefault(weight, []).append((axis, idx if isinstance(idx, tuple) else np.asarray(idx, np.int64)))

    for layer, idx in keep.items():
        if layer in whole:
            raise SurgeryError(layer, f"cannot be shrunk: {whole[layer]}")
        if layer not in plans:
            raise SurgeryError(layer, "not a Dense or Conv2D layer of this model")
        idx = np.asarray(idx, np.int64)
        if idx.size < 1:
            raise SurgeryError(layer, "no unit would stay")
        if idx.min() < 0 or idx.max() >= have[layer] or len(np.unique(idx)) != idx.size:
            raise SurgeryError(layer, f"unit indices out of range 0..{have[layer] - 1} or repeated")
        plan, node = plans[layer], graph.nodes[layer]
        node.config[PRODUCERS[node.cls]] = int(idx.size)
        for w in by_layer.get(layer, []):
            cut(w, -1 if w.endswith("kernel") else 0, idx)
        for cw in plan.channelwise:
            for w in by_layer.get(cw, []):
                cut(w, 2 if w.endswith("depthwise_kernel") else 0, idx)
        for consumer, flat in plan.consumers:
            kernel = next((w for w in by_layer.get(consumer, []) if w.endswith("/kernel")), None)
            if kernel is None:
                raise SurgeryError(consumer, "has no kernel to cut")
            if flat:
                cut(kernel, 0, ("flat", have[layer], idx))
            else:
                cut(kernel, -2, idx)
    for node in graph.nodes.values():  # stale build shapes would rebuild the old sizes
        for holder in (node.config, _layer_entry(graph, node.name)):
            if holder is not None:
                holder.pop("build_config", None)
    return json.dumps(graph.raw), slices


def _layer_entry(graph: Graph, name: str) -> dict | None:
    for layer in graph.raw["config"]["layers"]:
        if layer.get("name", layer["config"].get("name")) == name:
            return layer
    return None


def apply(slices: dict[str, list], names: list[str], arrays: list[np.ndarray | None]) -> list[np.ndarray | None]:
    """Cut each named array (weights or masks; None stays None) as :func:`shrink` planned."""
    out = []
    for name, a in zip(names, arrays):
        if a is not None:
            for axis, idx in slices.get(name, []):
                if isinstance(idx, np.ndarray):
                    a = np.take(a, idx, axis=axis)
                else:  # rows of a Dense after Flatten: position-major, channel-minor
                    _, channels, keep = idx
                    if a.shape[0] % channels:
                        raise SurgeryError(
                            name.rsplit("/", 1)[0], f"{a.shape[0]} inputs are not a multiple of {channels} channels"
                        )
                    rows = (np.arange(a.shape[0] // channels)[:, None] * channels + keep[None, :]).ravel()
                    a = a[rows]
            a = np.ascontiguousarray(a)
        out.append(a)
    return out


def report(arch_json: str) -> dict[str, Any]:
    """Shrinkable layers with their units and where their activations are measured, and those left
    whole with why."""
    graph = parse(arch_json)
    plans, whole = analyse(graph)
    u = units(graph)
    return {
        "shrinkable": {k: u[k] for k in plans},
        "measure_at": {k: p.measure_at for k, p in plans.items()},
        "whole": whole,
    }
