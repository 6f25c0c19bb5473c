"""Robust aggregation on small hand-computed vectors with one obvious outlier."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.strategy import (
    RobustFedAvg,
    TensorInfo,
    UpdateRejected,
    check_norm,
    clip_update,
    make_aggregator,
    update_norm,
)

DENSE = [TensorInfo("bias", None)]
PRUNED = [TensorInfo("kernel", "unstructured")]


def _run(method, values, trim=0.2, infos=DENSE, masks=None, weights=None):
    shape = np.asarray(values[0]).shape
    agg = make_aggregator(method, infos, [shape], trim)
    for i, v in enumerate(values):
        agg.add(
            [np.asarray(v, np.float32)],
            [None if masks is None else np.asarray(masks[i], bool)],
            (weights or [1.0] * len(values))[i],
        )
    w, m = agg.result("layer" if infos is PRUNED else "global", 0.0, None)
    return w[0], m[0]


def test_one_outlier_dense():
    clients = [[1.0], [2.0], [3.0], [4.0], [1000.0]]
    assert _run("fedavg", clients)[0] == pytest.approx([202.0])  # (1+2+3+4+1000)/5: the outlier wins
    assert _run("median", clients)[0] == pytest.approx([3.0])
    assert _run("trimmed-mean", clients, trim=0.2)[0] == pytest.approx([3.0])  # drop 1 and 1000: mean(2,3,4)


def test_sample_weights_do_not_let_an_outlier_buy_the_median():
    clients = [[1.0], [2.0], [3.0], [4.0], [1000.0]]
    weights = [1, 1, 1, 1, 1000]
    assert _run("fedavg", clients, weights=weights)[0] > 900
    assert _run("median", clients, weights=weights)[0] == pytest.approx([3.0])


def test_median_counts_only_clients_that_kept_a_position():
    values = [[1.0, 10.0, 5.0, 0.0], [2.0, 0.0, 6.0, 0.0], [3.0, 30.0, 700.0, 0.0]]
    masks = [[1, 1, 1, 0], [1, 0, 1, 0], [1, 1, 1, 0]]
    w, m = _run("median", values, infos=PRUNED, masks=masks)
    # position 0: median(1,2,3)=2; 1: median(10,30)=20 (client 2 pruned it); 2: median(5,6,700)=6; 3: nobody kept it
    assert w == pytest.approx([2.0, 20.0, 6.0, 0.0])
    assert m.tolist() == [True, True, True, False]


def test_trimmed_mean_per_position_with_masks():
    values = [[1.0, 4.0], [2.0, 0.0], [3.0, 8.0], [100.0, 0.0], [5.0, 6.0]]
    masks = [[1, 1], [1, 0], [1, 1], [1, 0], [1, 1]]
    w, _ = _run("trimmed-mean", values, trim=0.2, infos=PRUNED, masks=masks)
    # position 0: k=5, cut 1 each end of (1,2,3,5,100) -> mean(2,3,5)=10/3
    # position 1: k=3, cut floor(0.6)=0 -> mean(4,8,6)=6
    assert w == pytest.approx([10 / 3, 6.0])


def test_norm_clipping_hand_computed():
    ref = [np.zeros(2, np.float32)]
    clipped = clip_update([np.array([3.0, 4.0], np.float32)], ref, 1.0)  # norm 5 -> 1
    assert clipped[0] == pytest.approx([0.6, 0.8])
    same = [np.array([0.3, 0.4], np.float32)]
    assert clip_update(same, ref, 1.0)[0] is same[0]  # shorter than the limit: untouched
    ref = [np.array([1.0, 1.0], np.float32)]
    moved = clip_update([np.array([4.0, 5.0], np.float32)], ref, 2.5)  # delta (3,4) -> (1.5,2)
    assert moved[0] == pytest.approx([2.5, 3.0])
    assert update_norm(moved, ref) == pytest.approx(2.5)


def test_absurd_norms_rejected():
    ref = [np.array([1.0, 0.0], np.float32)]  # model norm 1
    assert check_norm([np.array([1.5, 0.5], np.float32)], ref, 10.0) == pytest.approx(np.sqrt(0.5))
    with pytest.raises(UpdateRejected, match="norm"):
        check_norm([np.array([1000.0, 0.0], np.float32)], ref, 10.0)
    check_norm([np.array([1000.0, 0.0], np.float32)], ref, 0.0)  # 0 = off


def test_robust_options_validated():
    with pytest.raises(ValueError):
        make_aggregator("mode", DENSE, [(1,)])
    with pytest.raises(ValueError):
        make_aggregator("trimmed-mean", DENSE, [(1,)], trim=0.5)


def test_adding_a_strategy_is_adding_one_file():
    import pkgutil

    import coordinator.strategy as strategy

    files = {m.name for m in pkgutil.iter_modules(strategy.__path__)} - {"base", "defences", "robust"}
    assert {f.replace("_", "-") for f in files} == set(strategy.STRATEGIES) == set(strategy.AGGREGATIONS)
    assert isinstance(make_aggregator("median", DENSE, [(1,)]), RobustFedAvg)
