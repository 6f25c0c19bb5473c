"""Masked FedAvg, mask policies and schedules on tiny hand-computed vectors."""

import numpy as np
import pytest

from coordinator.aggregate import (MaskedFedAvg, TensorInfo, UpdateRejected, block_mask, check_mask, magnitude_mask,
                                   mbyn_mask, sparsity_report)
from coordinator.schedule import sparsity_at

INFOS = [TensorInfo("k", "unstructured"), TensorInfo("b", None)]
SHAPES = [(4,), (2,)]


def two_clients():
    agg = MaskedFedAvg(INFOS, SHAPES)
    agg.add([np.array([1, 2, 0, 4.0]), np.array([1, 1.0])], [np.array([1, 1, 0, 1], bool), None], 1.0)
    agg.add([np.array([3, 0, 0, 8.0]), np.array([3, 3.0])], [np.array([1, 0, 0, 1], bool), None], 3.0)
    return agg


def test_masked_fedavg_hand_computed():
    prev = [np.ones(4, bool), None]
    w, m = two_clients().result("magnitude", 0.5, prev)
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
    w, m = agg.result("magnitude", 0.7, [prev])
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


@pytest.mark.parametrize("tensors,masks,why", [
    ([np.array([np.nan, 0, 0, 1.0]), np.zeros(2)], [np.array([1, 0, 0, 1], bool), None], "NaN"),
    ([np.array([np.inf, 0, 0, 1.0]), np.zeros(2)], [np.array([1, 0, 0, 1], bool), None], "NaN or Inf"),
    ([np.zeros(5), np.zeros(2)], [np.zeros(5, bool), None], "shape"),
    ([np.zeros(4), np.zeros(2)], [np.ones(4, bool), None], "below the round's target"),
    ([np.zeros(4), np.zeros(2)], [None, None], "without a mask"),
    ([np.zeros(4), np.zeros(2)], [np.zeros(4, bool), np.ones(2, bool)], "not pruned"),
    ([np.zeros(4)], [np.zeros(4, bool)], "tensors"),
])
def test_bad_updates_rejected(tensors, masks, why):
    with pytest.raises(UpdateRejected, match=why):
        MaskedFedAvg(INFOS, SHAPES).validate(tensors, masks, 0.5)


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
    score = np.array([[1, 1, 1, 1, 9, 9, 9, 9], [2, 2, 2, 2, 0, 0, 0, 1.0]])
    m = block_mask(score, 0.5)
    np.testing.assert_array_equal(m, [[0, 0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0, 0]])
    assert check_mask(m, "block1x4", 0.5) is None


def test_magnitude_mask_within():
    score = np.array([5.0, 4, 3, 2])
    m = magnitude_mask(score, 0.5, "unstructured", within=np.array([0, 1, 1, 1], bool))
    np.testing.assert_array_equal(m, [0, 1, 1, 0])


def test_sparsity_report():
    r = sparsity_report([np.array([1, 0, 0, 0], bool), None], ["k", "b"], [(4,), (4,)])
    assert r == {"per_tensor": {"k": 0.75}, "prunable": 0.75, "overall": 0.375}


def test_schedules():
    poly = [sparsity_at(r, 10, 0.8) for r in range(0, 11)]
    assert poly[0] == 0.0 and poly[5] == pytest.approx(0.8) and poly[10] == pytest.approx(0.8)
    assert all(a <= b for a, b in zip(poly, poly[1:]))
    assert poly[1] > 0.3  # cubic: prunes fast early
    assert [sparsity_at(r, 4, 0.5, "constant") for r in range(5)] == [0.0, 0.5, 0.5, 0.5, 0.5]
    assert sparsity_at(3, 10, 0.0) == 0.0
    with pytest.raises(ValueError):
        sparsity_at(1, 10, 1.0)
