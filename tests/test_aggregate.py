"""Masked FedAvg, mask policies and schedules on tiny hand-computed vectors."""

import numpy as np
import pytest

from coordinator.masks import (
    MIN_DENSITY,
    block_mask,
    check_mask,
    global_magnitude_masks,
    magnitude_mask,
    mbyn_mask,
    round_targets,
    sparsity_report,
)
from coordinator.schedule import sparsity_at
from coordinator.strategy import MaskedFedAvg, TensorInfo, UpdateRejected

INFOS = [TensorInfo("k", "unstructured"), TensorInfo("b", None)]
SHAPES = [(4,), (2,)]


def two_clients():
    agg = MaskedFedAvg(INFOS, SHAPES)
    agg.add([np.array([1, 2, 0, 4.0]), np.array([1, 1.0])], [np.array([1, 1, 0, 1], bool), None], 1.0)
    agg.add([np.array([3, 0, 0, 8.0]), np.array([3, 3.0])], [np.array([1, 0, 0, 1], bool), None], 3.0)
    return agg


def test_masked_fedavg_hand_computed():
    prev = [np.ones(4, bool), None]
    w, m = two_clients().result("layer", 0.5, prev)
    # position 0: (1*1 + 3*3)/4 = 2.5; 1: only client A kept it -> 2; 3: (4 + 24)/4 = 7
    # importance |sum|/total = [2.5, 0.5, 0, 7] -> keep the top 2 at 50% sparsity
    np.testing.assert_allclose(w[0], [2.5, 0, 0, 7])
    np.testing.assert_array_equal(m[0], [1, 0, 0, 1])
    np.testing.assert_allclose(w[1], [2.5, 2.5])  # dense tensors: plain weighted FedAvg
    assert m[1] is None


def test_union_and_intersection_policies():
    prev = [np.ones(4, bool), None]
    w, m = two_clients().result("union", 0.5, prev)
    np.testing.assert_allclose(w[0], [2.5, 2, 0, 7])
    w, m = two_clients().result("intersection", 0.5, prev)
    np.testing.assert_allclose(w[0], [2.5, 0, 0, 7])
    np.testing.assert_array_equal(m[0], [1, 0, 0, 1])


def test_pruned_weights_are_exactly_zero_and_never_regrow():
    rng = np.random.default_rng(0)
    prev = rng.random((50, 40)) > 0.5
    agg = MaskedFedAvg([TensorInfo("k", "unstructured")], [(50, 40)])
    for _ in range(5):
        client_mask = prev & (rng.random(prev.shape) > 0.2)
        agg.add([rng.normal(size=prev.shape) * client_mask], [client_mask], 1.0)
    w, m = agg.result("layer", 0.7, [prev])
    assert not np.any(m[0] & ~prev)
    assert np.all(w[0][~m[0]] == 0.0)
    assert abs((1 - m[0].mean()) - 0.7) < 0.001


def test_memory_is_independent_of_client_count():
    agg = MaskedFedAvg([TensorInfo("k", "unstructured")], [(100, 100)])
    before = sum(a.nbytes for a in agg.sum + agg.kept + agg.votes)
    for _ in range(50):
        agg.add([np.ones((100, 100))], [np.ones((100, 100), bool)], 2.0)
    assert sum(a.nbytes for a in agg.sum + agg.kept + agg.votes) == before
    assert agg.count == 50


@pytest.mark.parametrize(
    "tensors,masks,why",
    [
        ([np.array([np.nan, 0, 0, 1.0]), np.zeros(2)], [np.array([1, 0, 0, 1], bool), None], "NaN"),
        ([np.array([np.inf, 0, 0, 1.0]), np.zeros(2)], [np.array([1, 0, 0, 1], bool), None], "NaN or Inf"),
        ([np.zeros(5), np.zeros(2)], [np.zeros(5, bool), None], "shape"),
        ([np.zeros(4), np.zeros(2)], [np.ones(4, bool), None], "below the round's target"),
        ([np.zeros(4), np.zeros(2)], [None, None], "without a mask"),
        ([np.zeros(4), np.zeros(2)], [np.zeros(4, bool), np.ones(2, bool)], "not pruned"),
        ([np.zeros(4)], [np.zeros(4, bool)], "tensors"),
        ([np.zeros(4), np.zeros(2)], [np.array([1, 1, 0, 0], bool), None], None),  # exactly at target: accepted
    ],
)
def test_bad_updates_rejected(tensors, masks, why):
    if why is None:
        MaskedFedAvg(INFOS, SHAPES).validate(tensors, masks, [0.5, 0.0])
        return
    with pytest.raises(UpdateRejected, match=why):
        MaskedFedAvg(INFOS, SHAPES).validate(tensors, masks, [0.5, 0.0])


def test_mbyn_hand_computed_dense_and_conv():
    k = np.array([[0.1], [-3.0], [2.0], [0.5]])  # Dense kernel [in=4, out=1]
    np.testing.assert_array_equal(mbyn_mask(np.abs(k))[:, 0], [0, 1, 1, 0])
    conv = np.random.default_rng(1).normal(size=(3, 3, 8, 5))
    m = mbyn_mask(np.abs(conv))
    groups = m.transpose(3, 0, 1, 2).reshape(-1, 8).reshape(-1, 2, 4).sum(-1)
    assert np.all(groups == 2)  # exactly 2 of every 4 input channels
    assert check_mask(m, "2:4", 0.5) is None
    assert check_mask(np.ones_like(m), "2:4", 0.5) is not None
    # one input channel: padding keeps the only real weight
    assert mbyn_mask(np.abs(np.ones((3, 3, 1, 4)))).all()


def test_block_mask_keeps_whole_blocks():
    # Dense kernel [inputs=32, outputs=2]: blocks are 16 consecutive inputs of one output
    score = np.zeros((32, 2))
    score[:16, 0], score[16:, 0], score[:16, 1], score[16:, 1] = 1, 9, 2, 0.5
    m = block_mask(score, 0.5)
    expected = np.zeros((32, 2), bool)
    expected[16:, 0] = expected[:16, 1] = True
    np.testing.assert_array_equal(m, expected)
    assert check_mask(m, "block16x1", 0.5) is None
    broken = m.copy()
    broken[0, 0] = True  # a block half kept counts as kept
    assert check_mask(broken, "block16x1", 0.5) is not None


def test_magnitude_mask_within():
    score = np.array([5.0, 4, 3, 2])
    m = magnitude_mask(score, 0.5, "unstructured", within=np.array([0, 1, 1, 1], bool))
    np.testing.assert_array_equal(m, [0, 1, 1, 0])


def test_sparsity_report():
    r = sparsity_report([np.array([1, 0, 0, 0], bool), None], ["k", "b"], [(4,), (4,)])
    assert r == {"per_tensor": {"k": 0.75}, "prunable": 0.75, "overall": 0.375}


def test_schedules():
    poly = [sparsity_at(r, 10, 0.8, ramp_fraction=0.5) for r in range(0, 11)]
    assert poly[0] == 0.0 and poly[5] == pytest.approx(0.8) and poly[10] == pytest.approx(0.8)
    assert all(a <= b for a, b in zip(poly, poly[1:]))
    assert poly[1] > 0.3  # cubic: prunes fast early
    assert [sparsity_at(r, 4, 0.5, "constant") for r in range(5)] == [0.0, 0.5, 0.5, 0.5, 0.5]
    assert sparsity_at(3, 10, 0.0) == 0.0
    with pytest.raises(ValueError):
        sparsity_at(1, 10, 1.0)


def test_global_magnitude_one_threshold_across_tensors():
    small = np.array([[5.0, 4.0], [3.0, 0.1]])  # 4 weights, mostly large
    big = np.arange(1, 13, dtype=float).reshape(3, 4) / 10  # 12 weights, all small
    m = global_magnitude_masks([small, big], ["unstructured", "unstructured"], 0.5)
    # keep 8 of 16: the three large ones in `small`, then the five largest of `big`
    np.testing.assert_array_equal(m[0], [[1, 1], [1, 0]])
    assert m[1].sum() == 5 and m[1].reshape(-1)[-5:].all()


def test_global_magnitude_floor_and_within_and_dense_tensors():
    tiny = np.full((10, 10), 1e-6)
    huge = np.full((10, 10), 1.0)
    m = global_magnitude_masks([tiny, None, huge], ["unstructured", None, "unstructured"], 0.5)
    assert m[1] is None
    assert m[0].sum() == max(1, int(np.ceil(MIN_DENSITY * 100)))  # not cut off entirely
    within = [np.zeros((10, 10), bool), None, np.ones((10, 10), bool)]
    within[0][0, :3] = True
    m = global_magnitude_masks([huge, None, tiny], ["unstructured", None, "unstructured"], 0.9, within)
    assert not np.any(m[0] & ~within[0])  # nothing regrows


def test_round_targets_preview_global_split():
    w = [np.array([5.0, 4, 3, 0.001]), np.zeros(2), np.linspace(0.01, 0.12, 12)]
    kinds = ["unstructured", None, "unstructured"]
    masks = [np.ones(4, bool), None, np.ones(12, bool)]
    t = round_targets(w, masks, kinds, "global", 0.5)
    assert t[1] == 0.0 and t[0] == pytest.approx(0.25) and t[2] == pytest.approx(7 / 12)
    assert round_targets(w, masks, kinds, "layer", 0.5) == [0.5, 0.0, 0.5]


def test_global_policy_result_hits_sparsity():
    rng = np.random.default_rng(3)
    infos = [TensorInfo("a", "unstructured"), TensorInfo("b", "unstructured"), TensorInfo("c", None)]
    shapes = [(30, 30), (5, 5), (7,)]
    agg = MaskedFedAvg(infos, shapes)
    for _ in range(3):
        agg.add(
            [rng.normal(size=(30, 30)) * 0.1, rng.normal(size=(5, 5)), rng.normal(size=7)],
            [np.ones((30, 30), bool), np.ones((5, 5), bool), None],
            1.0,
        )
    w, m = agg.result("global", 0.8, [np.ones((30, 30), bool), np.ones((5, 5), bool), None])
    kept = m[0].sum() + m[1].sum()
    assert abs(kept - round(925 * 0.2)) <= 1
    assert m[1].mean() > m[0].mean()  # the small layer with larger weights keeps more


def test_digits_reader_matches_sklearn():
    from sklearn.datasets import load_digits

    from edge_agent.ml.data import _load_digits, digits_split
    from edge_agent.ml.shards import partition

    images, target = _load_digits()
    ref = load_digits()
    np.testing.assert_array_equal(images, ref.images)
    np.testing.assert_array_equal(target, ref.target)
    train, test = digits_split()
    assert len(train) + len(test) == 1797 and abs(len(test) - 360) <= 5
    assert train.x.shape[1:] == (8, 8, 1) and 0.0 <= train.x.min() and train.x.max() <= 1.0
    shards = partition(train.y, 8, "dirichlet", 0.5, 0)
    assert sum(len(s) for s in shards) == len(train) and len(set(np.concatenate(shards))) == len(train)
    assert min(len(s) for s in shards) >= 10
    iid = partition(train.y, 3, "iid", seed=1)
    assert sorted(len(s) for s in iid) == sorted(len(a) for a in np.array_split(np.arange(len(train)), 3))
