"""TF-MOT glue shared by the training worker and the coordinator (needs TensorFlow).

- :class:`RoundSchedule`: a pruning schedule whose targets live in tf.Variables,
  so one compiled model serves every round of a run (re-wrapping and
  re-compiling each round would cost seconds per round on a Pi).
- :func:`wrap`: wraps every layer TF-MOT can prune, leaves the rest dense and
  reports them by name (instead of failing on the first unsupported layer).
- :func:`weight_spec` / :func:`get_state` / :func:`set_state`: one weight
  order for both sides (layer by layer, each layer's ``weights``) and which of
  those tensors carry a pruning mask.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .tfenv import load

GRANULARITIES = ("unstructured", "block", "2:4")
POLICIES = ("all", "xnnpack")
"""``all``: every layer TF-MOT can prune. ``xnnpack``: only 1x1 convolutions (pointwise), the
only weights XNNPACK's sparse inference path uses; stem, depthwise and classifier stay dense."""
BLOCK_SHAPE = (16, 1)
"""Dense kernels are [inputs, outputs]; a (16, 1) block is 16 consecutive inputs of one
output unit, i.e. the 1x16 block TFLite's int8 sparse FULLY_CONNECTED stores compactly
(one index per 16 weights; smaller blocks are stored element by element)."""
M_BY_N = (2, 4)


def _tf():
    return load()


def make_round_schedule():
    """A PruningSchedule driven by variables: sparsity ramps from s0 at ``begin`` to s1 at
    ``end`` (cubic, like TF-MOT's PolynomialDecay), pruning every ``freq`` steps."""
    t = _tf()
    tf = t.tf
    base = t.tfmot.sparsity.keras.PruningSchedule

    class RoundSchedule(base):
        def __init__(self):
            self.s0 = tf.Variable(0.0, trainable=False, dtype=tf.float32, name="sched_s0")
            self.s1 = tf.Variable(0.0, trainable=False, dtype=tf.float32, name="sched_s1")
            self.begin = tf.Variable(1, trainable=False, dtype=tf.int64, name="sched_begin")
            self.end = tf.Variable(1, trainable=False, dtype=tf.int64, name="sched_end")
            self.freq = tf.Variable(1, trainable=False, dtype=tf.int64, name="sched_freq")
            self.active = tf.Variable(False, trainable=False, name="sched_active")

        def set(self, s0: float, s1: float, begin: int, end: int, freq: int, active: bool) -> None:
            self.s0.assign(s0)
            self.s1.assign(s1)
            self.begin.assign(begin)
            self.end.assign(max(end, begin))
            self.freq.assign(max(1, freq))
            self.active.assign(active)

        @tf.autograph.experimental.do_not_convert  # plain ops, nothing for AutoGraph to convert
        def __call__(self, step):
            step = tf.cast(step, tf.int64)
            span = tf.cast(tf.maximum(self.end - self.begin, 1), tf.float32)
            p = tf.clip_by_value(tf.cast(step - self.begin, tf.float32) / span, 0.0, 1.0)
            sparsity = self.s1 + (self.s0 - self.s1) * tf.pow(1.0 - p, 3.0)
            should = tf.logical_and(self.active, self._should_prune_in_step(step, self.begin, self.end, self.freq))
            return should, sparsity

        def get_config(self):
            return {"class_name": "RoundSchedule", "config": {}}

    return RoundSchedule()


def _internals():
    """TF-MOT internals we rely on (not in its public API): the registry and the wrapper class."""
    from .tfenv import tfmot_internals

    return tfmot_internals()


def _prunable_weight_names(layer) -> list[str] | None:
    """The weights TF-MOT would prune; [] for layers it supports with nothing to prune
    (BatchNormalization...); None for layers it does not support."""
    t = _tf()
    registry, _ = _internals()
    if isinstance(layer, t.tfmot.sparsity.keras.PrunableLayer):
        return ["custom"]
    if not registry.supports(layer):
        return None
    if layer.__class__ in registry._LAYERS_WEIGHTS_MAP:
        return list(registry._LAYERS_WEIGHTS_MAP[layer.__class__])
    return ["rnn_or_mha"]


def wrap(
    model, granularity: str, make_schedule=None, policy: str = "all"
) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Clone ``model`` with every prunable layer wrapped in ``prune_low_magnitude``.

    Each wrapped layer gets its own schedule from ``make_schedule`` (default
    :func:`make_round_schedule`), so layers can move to different targets.
    Returns the wrapped model (weights copied), a report
    ``{"pruned": {layer: granularity}, "dense": {layer: reason}}`` and the
    schedules by layer name.
    """
    make_schedule = make_schedule or make_round_schedule
    schedules: dict[str, Any] = {}
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; choose from {', '.join(GRANULARITIES)}")
    if policy not in POLICIES:
        raise ValueError(f"unknown pruning policy {policy!r}; choose from {', '.join(POLICIES)}")
    t = _tf()
    keras, tfmot = t.keras, t.tfmot
    report: dict[str, Any] = {"pruned": {}, "dense": {}}

    def clone(layer):
        fresh = layer.__class__.from_config(layer.get_config())
        if not layer.weights:
            return fresh
        names = _prunable_weight_names(layer)
        if names is None:
            report["dense"][layer.name] = f"{type(layer).__name__} is not supported by TF-MOT pruning"
            return fresh
        if not names:
            return fresh
        if policy == "xnnpack" and not (type(layer) is keras.layers.Conv2D and tuple(layer.kernel_size) == (1, 1)):
            report["dense"][layer.name] = "kept dense by the xnnpack policy (only 1x1 convolutions are pruned)"
            return fresh
        kind = "unstructured"
        schedule = make_schedule()
        kwargs: dict[str, Any] = {"pruning_schedule": schedule}
        if granularity == "block" and isinstance(layer, keras.layers.Dense):
            kwargs["block_size"] = BLOCK_SHAPE
            kind = f"block{BLOCK_SHAPE[0]}x{BLOCK_SHAPE[1]}"
        elif granularity == "2:4":
            if not isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D)) or isinstance(
                layer, keras.layers.DepthwiseConv2D
            ):
                report["dense"][layer.name] = f"2:4 sparsity applies to Dense/Conv2D only, not {type(layer).__name__}"
                return fresh
            kwargs["sparsity_m_by_n"] = M_BY_N
            kind = f"{M_BY_N[0]}:{M_BY_N[1]}"
        try:
            wrapped = tfmot.sparsity.keras.prune_low_magnitude(fresh, **kwargs)
        except (ValueError, TypeError) as exc:
            report["dense"][layer.name] = f"TF-MOT cannot wrap it: {exc}"
            return fresh
        _skip_autograph(wrapped)
        report["pruned"][layer.name] = kind
        schedules[layer.name] = schedule
        return wrapped

    try:
        wrapped = keras.models.clone_model(model, clone_function=clone)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"TF-MOT cannot prune this model: {exc}") from None
    set_state(wrapped, get_weights(model))
    return wrapped, report, schedules


def _skip_autograph(wrapper) -> None:
    """Trace a TF-MOT wrapper's ``call`` as the plain Python it is, without AutoGraph.

    Keras runs AutoGraph over every non-Keras layer's ``call`` and, recursively, over
    everything it calls: for the wrapper that is TF-MOT's pruning code (its ``tf.cond``
    branches, mask update, schedule), which uses explicit ``tf.cond`` and decides its
    Python ``if``s on static attributes and shapes, so AutoGraph has nothing to convert but
    still parses and rewrites all of it. That was about half of the first round's tracing
    (~1 s of CPU on 1 thread for digits_cnn). The traced ops are the same; a Python
    ``if`` on a tensor would fail loudly at trace time, never silently."""
    tf = _tf().tf
    wrapper.call = tf.autograph.experimental.do_not_convert(wrapper.call)


def _tfmot_loaded() -> bool:
    import sys

    return "tensorflow_model_optimization" in sys.modules  # no TF-MOT, no wrapped layers


def _inner(layer):
    if not _tfmot_loaded():
        return layer
    _, wrapper = _internals()
    return layer.layer if isinstance(layer, wrapper) else layer


def _pruning_vars(layer) -> dict[int, Any]:
    """id(weight variable) -> mask variable, for a wrapped layer."""
    if not _tfmot_loaded():
        return {}
    _, wrapper = _internals()
    if not isinstance(layer, wrapper):
        return {}
    return {id(w): m for w, m, _ in layer.pruning_vars}


def weight_spec(model) -> list[dict[str, Any]]:
    """One entry per weight tensor in edgeprune's order, with whether it is pruned."""
    spec = []
    for layer in model.layers:
        inner = _inner(layer)
        masks = _pruning_vars(layer)
        for w in inner.weights:
            spec.append(
                {
                    "name": f"{inner.name}/{w.name.split('/')[-1].split(':')[0]}",
                    "layer": inner.name,
                    "shape": list(w.shape),
                    "prunable": id(w) in masks,
                }
            )
    return spec


def pruning_triples(model) -> list[tuple[Any, Any, Any] | None]:
    """Per weight tensor in edgeprune's order: TF-MOT's ``(weight, mask, threshold)`` variables
    when the tensor is pruned, else None."""
    out: list[tuple[Any, Any, Any] | None] = []
    _, wrapper = _internals() if _tfmot_loaded() else (None, None)
    for layer in model.layers:
        triples = {id(w): (w, m, t) for w, m, t in layer.pruning_vars} if wrapper and isinstance(layer, wrapper) else {}
        out.extend(triples.get(id(w)) for w in _inner(layer).weights)
    return out


def get_weights(model) -> list[np.ndarray]:
    return [w.numpy() for layer in model.layers for w in _inner(layer).weights]


def get_masks(model) -> list[np.ndarray | None]:
    out: list[np.ndarray | None] = []
    for layer in model.layers:
        masks = _pruning_vars(layer)
        for w in _inner(layer).weights:
            out.append(masks[id(w)].numpy().astype(bool) if id(w) in masks else None)
    return out


def magnitude_mask(weight: np.ndarray, sparsity: float) -> tuple[np.ndarray, np.float32]:
    """The mask and threshold TF-MOT's unstructured update (``Pruning._update_mask``) computes
    for ``weight`` at ``sparsity``, in numpy: bit for bit the same.

    TF-MOT keeps ``k = max(round(size * (1 - sparsity)), 1)`` weights (float32 arithmetic,
    round half to even): the threshold is the k-th largest ``|w|`` and the mask is
    ``|w| >= threshold`` (its one-hot of the threshold's own position is inside that set).
    TF-MOT finds the k-th value with ``top_k(k=size)``, a full sort of the tensor inside the
    train step (~0.15-0.25 s for a 1.6M-weight Dense on 1 thread); ``np.partition`` is linear
    (~10-25 ms). NaN weights (a diverged round, which the coordinator rejects) may be masked
    differently."""
    a = np.abs(np.asarray(weight, dtype=np.float32)).reshape(-1)
    if not a.size:
        return np.ones(np.shape(weight), bool), np.float32(0.0)
    k = int(max(np.round(np.float32(a.size) * (np.float32(1.0) - np.float32(sparsity))), np.float32(1.0)))
    positive = a[a > 0]  # the k-th largest is among them when there are k; else it is 0
    if positive.size >= k:  # (np.partition degrades ~20x on the many exact zeros a regrow round starts from)
        threshold = np.partition(positive, positive.size - k)[positive.size - k]
    else:
        threshold = np.float32(0.0)
    return (a >= threshold).reshape(np.shape(weight)), np.float32(threshold)


def set_state(model, weights: list[np.ndarray], masks: list[np.ndarray | None] | None = None) -> None:
    """Assign weights (and, on a wrapped model, masks) in edgeprune's order."""
    i = 0
    for layer in model.layers:
        vars_ = _pruning_vars(layer)
        for w in _inner(layer).weights:
            if tuple(w.shape) != tuple(np.shape(weights[i])):
                raise ValueError(f"weight {w.name}: shape {tuple(w.shape)} != {np.shape(weights[i])}")
            w.assign(weights[i])
            if id(w) in vars_:
                m = masks[i] if masks is not None and masks[i] is not None else np.ones(w.shape, bool)
                vars_[id(w)].assign(np.asarray(m, dtype=np.float32))
            i += 1
    if i != len(weights):
        raise ValueError(f"model has {i} weight tensors, got {len(weights)}")
