"""Structured pruning: the graph analysis and the cuts (numpy), and with tf-keras that removing units
whose outgoing weights are all zero leaves the model's outputs unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest

from coordinator import surgery


def _seq(*layers):
    return json.dumps(
        {
            "class_name": "Sequential",
            "config": {
                "name": "m",
                "layers": [
                    {"class_name": "InputLayer", "config": {"name": "in", "batch_input_shape": [None, 4, 4, 2]}},
                    *[{"class_name": c, "config": {"name": n, **cfg}} for c, n, cfg in layers],
                ],
            },
        }
    )


def test_analysis_reports_why_a_layer_stays_whole():
    arch = _seq(
        ("Conv2D", "c1", {"filters": 8}),
        ("MyCustomLayer", "odd", {}),
        ("Conv2D", "c2", {"filters": 4}),
        ("Flatten", "f", {}),
        ("Dense", "d1", {"units": 16}),
        ("Dense", "out", {"units": 3}),
    )
    rep = surgery.report(arch)
    assert rep["shrinkable"] == {"c2": 4, "d1": 16}
    assert "MyCustomLayer odd" in rep["whole"]["c1"] and "model output" in rep["whole"]["out"]
    odd = surgery.report(
        _seq(
            ("Conv2D", "c1", {"filters": 8}),
            ("BatchNormalization", "bn", {"axis": 1}),
            ("Conv2D", "c2", {"filters": 4}),
            ("PReLU", "pr", {}),
            ("Conv2D", "c3", {"filters": 4}),
            ("Flatten", "f", {}),
            ("BatchNormalization", "bn2", {"axis": -1}),
            ("Dense", "out", {"units": 2}),
        )
    )
    assert "not on the channel axis" in odd["whole"]["c1"]  # axis 1 of an image is its height
    assert "PReLU pr" in odd["whole"]["c2"]  # per-channel weights we do not cut
    assert "after a Flatten" in odd["whole"]["c3"] and odd["shrinkable"] == {}
    func = {
        "class_name": "Functional",
        "config": {
            "name": "m",
            "layers": [
                {"class_name": "InputLayer", "name": "in", "config": {"name": "in"}, "inbound_nodes": []},
                {
                    "class_name": "Conv2D",
                    "name": "a",
                    "config": {"name": "a", "filters": 4},
                    "inbound_nodes": [[["in", 0, 0, {}]]],
                },
                {
                    "class_name": "Conv2D",
                    "name": "b",
                    "config": {"name": "b", "filters": 4},
                    "inbound_nodes": [[["a", 0, 0, {}]]],
                },
                {
                    "class_name": "Add",
                    "name": "add",
                    "config": {"name": "add"},
                    "inbound_nodes": [[["a", 0, 0, {}], ["b", 0, 0, {}]]],
                },
                {
                    "class_name": "Conv2D",
                    "name": "s",
                    "config": {"name": "s", "filters": 4},
                    "inbound_nodes": [[["add", 0, 0, {}]], [["add", 0, 0, {}]]],
                },
                {
                    "class_name": "GlobalAveragePooling2D",
                    "name": "gap",
                    "config": {"name": "gap"},
                    "inbound_nodes": [[["s", 0, 0, {}]]],
                },
                {
                    "class_name": "Dense",
                    "name": "out",
                    "config": {"name": "out", "units": 2},
                    "inbound_nodes": [[["gap", 0, 0, {}]]],
                },
            ],
            "input_layers": [["in", 0, 0]],
            "output_layers": [["out", 0, 0]],
        },
    }
    rep = surgery.report(json.dumps(func))
    assert "Add add" in rep["whole"]["a"] and "Add add" in rep["whole"]["b"]
    assert "shared" in rep["whole"]["s"] and rep["shrinkable"] == {}


def test_cuts_follow_flatten_and_refuse_impossible_targets():
    arch = _seq(
        ("Conv2D", "c", {"filters": 3}),
        ("Flatten", "f", {}),
        ("Dense", "d", {"units": 5}),
        ("Dense", "out", {"units": 2}),
    )
    names = ["c/kernel", "c/bias", "d/kernel", "d/bias", "out/kernel", "out/bias"]
    rng = np.random.default_rng(0)
    ws = [rng.normal(size=s) for s in [(1, 1, 2, 3), (3,), (4 * 3, 5), (5,), (5, 2), (2,)]]
    new_arch, cuts = surgery.shrink(arch, names, {"c": np.array([0, 2]), "d": np.array([1, 3, 4])})
    out = surgery.apply(cuts, names, ws)
    assert [w.shape for w in out] == [(1, 1, 2, 2), (2,), (4 * 2, 3), (3,), (3, 2), (2,)]
    # Dense rows after Flatten are position-major: position p, channel c -> row 3p + c; keep channels 0 and 2
    assert np.array_equal(out[2], ws[2][[0, 2, 3, 5, 6, 8, 9, 11]][:, [1, 3, 4]])
    assert np.array_equal(out[4], ws[4][[1, 3, 4]])
    assert surgery.units(surgery.parse(new_arch)) == {"c": 2, "d": 3, "out": 2}
    with pytest.raises(surgery.SurgeryError, match="^d: removing 100% of its 5 units leaves none"):
        surgery.keep_top({"d": np.ones(5)}, {"d": 5}, {"d": 5}, 1.0)
    with pytest.raises(surgery.SurgeryError, match="^out: cannot be shrunk"):
        surgery.shrink(arch, names, {"out": np.array([0])})
    keep = surgery.keep_top({"d": np.array([5.0, 1, 4, 2, 3])}, {"d": 5}, {"d": 5}, 0.4)
    assert keep["d"].tolist() == [0, 2, 4]  # the three most important, in order


@pytest.mark.tf
@pytest.mark.parametrize("name,shape", [("digits_cnn", (8, 8, 1)), ("mobilenet_tiny", (32, 32, 3)), ("mlp", (64,))])
def test_removing_units_with_zero_outgoing_weights_keeps_outputs(name, shape):
    from edge_agent.ml import models, pruning
    from edge_agent.ml.tfenv import load

    load()
    model = models.build(name, shape, 10, 0)
    spec = pruning.weight_spec(model)
    names = [s["name"] for s in spec]
    weights = pruning.get_weights(model)
    rng = np.random.default_rng(1)
    weights = [w + rng.normal(0, 0.05, w.shape).astype(np.float32) for w in weights]  # non-trivial BN stats
    arch = model.to_json()
    rep = surgery.report(arch)
    assert rep["shrinkable"], rep
    keep = {layer: np.sort(rng.choice(n, size=max(1, n // 2), replace=False)) for layer, n in rep["shrinkable"].items()}
    plans, _ = surgery.analyse(surgery.parse(arch))
    consumer_kernels = {f"{c}/kernel" for p in plans.values() for c, _ in p.consumers}
    _, cuts = surgery.shrink(arch, names, keep)
    # zero what the removed units send on: cut an index array the way the consumer's inputs are cut
    for i, n in enumerate(names):
        if n not in consumer_kernels:
            continue
        idx = np.arange(weights[i].size).reshape(weights[i].shape)
        survivors = surgery.apply({n: [c for c in cuts[n] if not _is_output_cut(c, weights[i])]}, [n], [idx])[0]
        zero = np.ones(weights[i].size, bool)
        zero[survivors.ravel()] = False
        weights[i] = np.where(zero.reshape(weights[i].shape), 0.0, weights[i]).astype(np.float32)
    pruning.set_state(model, weights)
    x = rng.normal(size=(16, *shape)).astype(np.float32)
    before = model(x, training=False).numpy()

    new_arch, cuts = surgery.shrink(arch, names, keep)
    small = models.from_json(new_arch)
    small_weights = surgery.apply(cuts, names, weights)
    assert [tuple(s["shape"]) for s in pruning.weight_spec(small)] == [w.shape for w in small_weights]
    pruning.set_state(small, small_weights)
    after = small(x, training=False).numpy()
    assert small.count_params() < model.count_params()
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-5)


def _is_output_cut(cut, w) -> bool:
    """A cut on the consumer's own outputs (it is also a producer being shrunk), not on its inputs."""
    axis, idx = cut
    return not isinstance(idx, tuple) and axis in (-1, w.ndim - 1)


class _Notes:
    def __init__(self):
        self.warnings, self.said = [], []

    def warn(self, msg):
        self.warnings.append(msg)

    def say(self, msg):
        self.said.append(msg)


class _StubModel:
    """The parts of GlobalModel the structured step reads (pure logic; the real one is tested end to end)."""

    def __init__(self, arch, fail=None):
        self.arch_json, self.fail, self.num_params, self.shrunk = arch, fail, 1000, None

    @property
    def units(self):
        return surgery.units(surgery.parse(self.arch_json))

    @property
    def structure(self):
        return surgery.report(self.arch_json)

    def shrink(self, keep):
        if self.fail:
            raise surgery.SurgeryError("c", self.fail)
        self.shrunk = keep


def _run(gm):
    from coordinator.train import Run, TrainConfig

    run = Run(TrainConfig(structured=0.5, rounds=3, structured_every=1), None, None, _Notes(), "r", None, gm=gm)
    run.original_units = gm.units
    run.begun = {"a": {}, "b": {}}
    return run


def test_mismatched_importance_is_ignored_by_name_and_a_failed_cut_keeps_the_architecture():
    from coordinator.train.structured import fold_importance as _fold_importance
    from coordinator.train.structured import shrink as _shrink

    arch = _seq(
        ("Conv2D", "c", {"filters": 4}),
        ("Flatten", "f", {}),
        ("Dense", "d", {"units": 6}),
        ("Dense", "out", {"units": 2}),
    )
    run = _run(_StubModel(arch))
    _fold_importance(run, "good", {"layers": {"c": [4, 3, 2, 1], "d": [1, 2, 3, 4, 5, 6]}}, 10)
    _fold_importance(run, "short", {"layers": {"c": [1, 2, 3], "d": [1, 2, 3, 4, 5, 6]}}, 10)
    _fold_importance(run, "nan", {"layers": {"c": [1, 2, 3, float("nan")], "d": [0] * 6}}, 10)
    _fold_importance(run, "missing", {"layers": {"c": [1, 2, 3, 4]}}, 10)
    _fold_importance(run, "garbage", "not a dict", 10)
    w = run.reporter.warnings
    assert len(w) == 4 and "short" in w[0] and "layer c has 4 units, the statistics 3" in w[0]
    assert "layer c: statistics contain NaN" in w[1] and "layer d: no statistics" in w[2]
    assert run.importance["weight"] == 10  # only the good device counted
    _shrink(run, 1, 0.5)
    assert {k: v.tolist() for k, v in run.gm.shrunk.items()} == {"c": [0, 1], "d": [3, 4, 5]}
    assert run.begun == {}  # agents get the new architecture next round

    failing = _run(_StubModel(arch, fail="the smaller model does not build"))
    _fold_importance(failing, "good", {"layers": {"c": [4, 3, 2, 1], "d": [1, 2, 3, 4, 5, 6]}}, 10)
    _shrink(failing, 1, 0.5)
    assert (
        "structured step skipped (c: the smaller model does not build); keeping the last good"
        in failing.reporter.warnings[-1]
    )
    assert failing.begun  # nothing changed: the agents keep training the last good architecture
    everything = _run(_StubModel(arch))
    _fold_importance(everything, "good", {"layers": {"c": [4, 3, 2, 1], "d": [1, 2, 3, 4, 5, 6]}}, 10)
    _shrink(everything, 1, 1.0)
    assert "removing 100% of its" in everything.reporter.warnings[-1] and everything.gm.shrunk is None
