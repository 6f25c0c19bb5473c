"""The sparse downlink: exact reconstructions, error feedback, and devices that lack or lose their base."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator import broker as broker_mod
from coordinator.downlink import Downlink
from coordinator.global_model import GlobalModel
from coordinator.model_worker import InProcessModelWorker
from coordinator.train import TrainConfig, train
from coordinator.train.observer import Silent
from edge_agent import heldmodels
from edge_agent.protocol import codec
from edge_agent.protocol.args import BlobRef, DeltaLink, TrainRound
from edge_agent.protocol.errors import ProtocolError

from .helpers.memfleet import Behaviour, memory_fleet

SHAPES = [(6, 5), (5,)]
NAMES = ["d/kernel", "d/bias"]


class _Model:
    """What Downlink reads and writes of a GlobalModel: names, weights, masks, and its exact encoding."""

    def __init__(self, weights, masks):
        self.names, self.weights, self.masks, self.pruning_on = NAMES, weights, masks, True

    def encode(self, meta):
        return codec.encode(self.weights, names=self.names, masks=self.masks, kind="model", meta=meta)


def _device_view(cast, held: codec.Bundle | None) -> codec.Bundle:
    """What a device rebuilds from the cast, holding ``held`` (the round before's model) or nothing."""
    if cast.small is not None and (cast.base is None or held is not None):
        if cast.base is None:
            return codec.decode(cast.small)
        return codec.decode(cast.small, reference=held.tensors, reference_masks=held.masks)
    return codec.decode(cast.exact)


@settings(max_examples=25, deadline=None)
@given(
    fmt=st.sampled_from(["exact", "fp16", "delta-int8", "delta-int4"]),
    seed=st.integers(0, 2**16),
    rounds=st.integers(2, 6),
)
def test_what_a_device_rebuilds_is_what_the_coordinator_announced(fmt, seed, rounds):
    """Masks that shrink and grow back (regrowth), rounds after rounds: the device's reconstruction has
    the announced digest, and it is what the coordinator goes on from."""
    rng = np.random.default_rng(seed)
    link = Downlink(fmt, seed=seed)
    held = None
    for rnd in range(rounds):
        masks = [rng.random(SHAPES[0]) < rng.uniform(0.2, 0.9), None]
        weights = [rng.normal(0, 1, s).astype(np.float32) * (m if m is not None else 1) for s, m in zip(SHAPES, masks)]
        gm = _Model(weights, masks)
        cast = link.prepare(gm, "r")
        got = _device_view(cast, held)
        assert codec.digest(got.names, got.tensors, got.masks) == cast.digest
        assert all(np.array_equal(a, b) for a, b in zip(got.tensors, gm.weights))  # the global model is it
        exact = codec.decode(cast.exact)
        assert codec.digest(exact.names, exact.tensors, exact.masks) == cast.digest  # the fallback is the same
        link.trained("dev", cast.digest)
        held = got
        if fmt.startswith("delta") and rnd:
            assert cast.base is not None  # a delta, after round one


def _rebuild(route, held: codec.Bundle | None) -> codec.Bundle:
    """What a device rebuilds by applying ``route``'s broadcasts in order to ``held``."""
    bundle = None if route[0].base is None else held
    for link in route:
        bundle = (
            codec.decode(link.data)
            if bundle is None
            else codec.decode(link.data, reference=bundle.tensors, reference_masks=bundle.masks)
        )
    return bundle


@settings(max_examples=25, deadline=None)
@given(
    fmt=st.sampled_from(["delta-int8", "delta-int4"]),
    seed=st.integers(0, 2**16),
    joins=st.lists(st.booleans(), min_size=3, max_size=10),
    drift=st.sampled_from([0.01, 0.3]),
)
def test_a_device_that_missed_rounds_rebuilds_the_same_model_by_the_chain(fmt, seed, joins, drift):
    """Device "a" trains every round, "b" only in some (``joins``); masks change a little each round
    (``drift``: how much). Whenever "b" comes back it is sent the chain of broadcasts since the model it
    holds, or the exact model when the chain would be as large, and ends on the same weights as "a"."""
    rng = np.random.default_rng(seed)
    link = Downlink(fmt, seed=seed, seeded=True)
    weights = [rng.uniform(-0.2, 0.2, s).astype(np.float32) for s in BIG]
    masks = [np.ones(BIG[0], bool), None]
    b_held: codec.Bundle | None = None
    b_digest: str | None = None
    last = -1  # the round "b" last trained (-1: never; it then starts from the seeded first model)
    for rnd, joined in enumerate(joins):
        gm = _Model([w.copy() for w in weights], masks)
        cast = link.prepare(gm, "r")
        assert cast.route(b_digest, "1.4") is None or cast.base in (None, b_digest)  # no chains before 1.5
        if joined:
            route = cast.route(b_digest, "1.5")
            got = codec.decode(cast.exact) if route is None else _rebuild(route, b_held)
            assert codec.digest(got.names, got.tensors, got.masks) == cast.digest
            assert all(np.array_equal(x, y) for x, y in zip(got.tensors, gm.weights))
            if route is not None:
                assert sum(len(x.data) for x in route) == cast.size_for(b_digest, "1.5") < len(cast.exact)
            if drift == 0.01 and rnd - last <= 3:  # a delta is a quarter of the exact model (int8) or less
                assert route is not None and len(route) == rnd - last, (rnd, last)
            last = rnd
            link.trained("b", cast.digest)
            b_held, b_digest = got, cast.digest
        link.trained("a", cast.digest)
        assert sum(len(x.data) for x in link.links) < len(cast.exact)  # only links some route can use
        # the next round's aggregate: the weights move, and a few (or many) kept weights are pruned or regrown
        keep = rng.random(BIG[0]) < 0.5
        flip = rng.random(BIG[0]) < drift * 0.1
        masks = [np.where(flip, keep, masks[0]), None]
        weights = [(gm.weights[0] + rng.normal(0, 0.01, BIG[0]).astype(np.float32)) * masks[0], gm.weights[1] + 0.01]


@pytest.mark.parametrize("fmt, step", [("delta-int8", 1 / 127), ("delta-int4", 1 / 7), ("fp16", 1e-3)])
def test_error_feedback_keeps_the_held_model_on_the_true_one(fmt, step):
    """With the true model fixed, what devices hold never drifts from it and averages to it."""
    rng = np.random.default_rng(0)
    true = [rng.normal(0, 1, s).astype(np.float32) for s in SHAPES]
    masks = [np.ones(SHAPES[0], bool), None]
    link, held = Downlink(fmt), []
    for _ in range(40):
        gm = _Model([t.copy() for t in true], masks)
        link.prepare(gm, "r")
        link.trained("dev", "x")  # holders make the next cast a delta (the digest is looked up by base)
        link.holds["dev"] = next(reversed(link.bases))
        held.append(gm.weights[0])
    err = np.abs(np.stack(held) - true[0])
    peak = np.abs(true[0]).max()
    assert err.max() <= 2 * step * peak + 1e-6  # bounded: no accumulation over 40 rounds
    assert np.abs(np.mean(held, axis=0) - true[0]).max() <= 0.25 * step * peak + 1e-6  # and unbiased


def _round_args(cast, small_ref, exact_ref, base):
    return TrainRound(run_id="r", round=2, model=exact_ref, model_digest=cast.digest, delta=small_ref, delta_base=base)


def _blobs(*datas):
    store = {codec_sha(d): d for d in datas}
    fetched: list[str] = []

    def fetch(sha, timeout_s, size, chunks):
        fetched.append(sha)
        return store[sha]

    return fetch, fetched


def codec_sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


BIG = [(200, 100), (100,)]


def _two_casts(tmp_path):
    rng = np.random.default_rng(1)
    link = Downlink("delta-int8")
    masks = [rng.random(BIG[0]) < 0.5, None]
    first = link.prepare(_Model([rng.normal(0, 1, s).astype(np.float32) for s in BIG], masks), "r")
    link.trained("dev", first.digest)
    second = link.prepare(_Model([rng.normal(0, 1, s).astype(np.float32) for s in BIG], masks), "r")
    assert second.base == first.digest
    held = heldmodels.HeldModels(tmp_path / "models", keep=2, max_bytes=1 << 20)
    held.put(codec.decode(first.exact))
    ref = lambda data: BlobRef(codec_sha(data), len(data), 1)  # noqa: E731
    return held, first, second, ref


def test_a_device_holding_the_base_fetches_only_the_delta(tmp_path):
    held, first, second, ref = _two_casts(tmp_path)
    fetch, fetched = _blobs(second.small, second.exact)
    _, how = heldmodels.obtain(held, _round_args(second, ref(second.small), ref(second.exact), first.digest), fetch)
    assert how == {"download": "delta", "download_bytes": len(second.small), "delta_links": 1}
    assert len(second.small) < len(second.exact)
    _, again = heldmodels.obtain(held, _round_args(second, ref(second.small), ref(second.exact), first.digest), fetch)
    assert again["download"] == "cached" and fetched == [codec_sha(second.small)]


@pytest.mark.parametrize("fmt", ["exact", "fp16", "delta-int8"])
def test_a_fresh_model_goes_down_as_a_seed_in_every_format(tmp_path, fmt):
    rng = np.random.default_rng(3)
    init = [rng.uniform(-0.2, 0.2, BIG[0]).astype(np.float32), np.zeros(BIG[1], np.float32)]
    link = Downlink(fmt, seed=7, seeded=True)
    gm = _Model(init, [np.ones(BIG[0], bool), None])
    first = link.prepare(gm, "r")
    assert first.base is None and len(first.small) < 1_000 and len(first.exact) > 50_000
    # a device on protocol 1.3 cannot draw it: it is sent the exact model, and told of no delta
    assert first.route(None, "1.4") and first.route(None, "1.3") is None and not first.readable_by(None)
    assert first.size_for(None, "1.3") == len(first.exact) and first.size_for(None, "1.4") == len(first.small)
    held = heldmodels.HeldModels(tmp_path / "models", keep=2, max_bytes=1 << 20)
    fetch, fetched = _blobs(first.small, first.exact)
    ref = lambda data: BlobRef(codec_sha(data), len(data), 1)  # noqa: E731
    data, how = heldmodels.obtain(held, _round_args(first, ref(first.small), ref(first.exact), None), fetch)
    assert how == {"download": "small", "download_bytes": len(first.small), "delta_links": 1}
    drawn = codec.decode(data)  # the device drew the model the coordinator now holds, bit for bit
    assert codec.digest(drawn.names, drawn.tensors, drawn.masks) == first.digest
    assert all(np.array_equal(a, b) for a, b in zip(drawn.tensors, gm.weights))
    assert link.error is None or not any(e.any() for e in link.error)  # it is the model: nothing owed
    link.trained("dev", first.digest)
    second = link.prepare(_Model([w + 0.01 for w in gm.weights], gm.masks), "r")  # only the first is seeded
    assert second.digest != first.digest
    assert second.base == (first.digest if fmt.startswith("delta-") else None)
    assert (second.small is None) == (fmt == "exact")


def _chain_casts(tmp_path, rounds=4):
    """``rounds`` casts of a delta-int8 run whose weights move a little each round; a device's model store
    holding the first round's model."""
    rng = np.random.default_rng(2)
    link = Downlink("delta-int8")
    masks = [rng.random(BIG[0]) < 0.5, None]
    weights = [rng.normal(0, 1, s).astype(np.float32) * (m if m is not None else 1) for s, m in zip(BIG, masks)]
    casts = []
    for _ in range(rounds):
        gm = _Model([w.copy() for w in weights], masks)
        casts.append(link.prepare(gm, "r"))
        link.trained("a", casts[-1].digest)
        weights = [
            w + rng.normal(0, 0.01, w.shape).astype(np.float32) * (m if m is not None else 1)
            for w, m in zip(gm.weights, masks)
        ]
    held = heldmodels.HeldModels(tmp_path / "models", keep=2, max_bytes=1 << 22)
    held.put(codec.decode(casts[0].exact))
    return held, casts


def _chain_args(cast, route, base):
    ref = lambda data: BlobRef(codec_sha(data), len(data), 1)  # noqa: E731
    chain = [DeltaLink(ref(x.data), x.base) for x in route]
    return TrainRound(
        run_id="r",
        round=4,
        model=ref(cast.exact),
        model_digest=cast.digest,
        delta=chain[-1].blob,
        delta_base=base,
        delta_chain=chain,
    )


def test_a_device_that_missed_rounds_applies_the_chain_from_the_latest_model_it_holds(tmp_path):
    held, casts = _chain_casts(tmp_path)
    last = casts[-1]
    route = last.route(casts[0].digest, "1.5")
    assert [x.digest for x in route] == [c.digest for c in casts[1:]]  # rounds 2, 3 and 4
    fetch, fetched = _blobs(*(x.data for x in route), last.exact)
    args = _chain_args(last, route, casts[0].digest)
    args.check("train_round")
    data, how = heldmodels.obtain(held, args, fetch)
    assert how == {"download": "chain", "download_bytes": last.size_for(casts[0].digest, "1.5"), "delta_links": 3}
    got = codec.decode(data)
    assert codec.digest(got.names, got.tensors, got.masks) == last.digest
    assert last.size_for(casts[0].digest, "1.5") < len(last.exact) and codec_sha(last.exact) not in fetched
    # a device that (unknown to the coordinator) already holds round 3's model applies only the last delta
    other = heldmodels.HeldModels(tmp_path / "other", keep=2, max_bytes=1 << 22)
    other.put(codec.decode(casts[2].exact))
    fetch, fetched = _blobs(*(x.data for x in route), last.exact)
    _, how = heldmodels.obtain(other, args, fetch)
    assert how == {"download": "delta", "download_bytes": len(last.small), "delta_links": 1}
    assert fetched == [codec_sha(last.small)]
    # a device that speaks 1.4 gets the exact model; one that holds none of these models starts from the
    # run's first broadcast, a model on its own (here the quantised one), while that costs less than exact
    assert last.route(casts[0].digest, "1.4") is None
    fresh = last.route("0" * 64, "1.5")
    assert fresh == list(last.chain) and fresh[0].base is None and len(fresh) == 4
    # one that holds this very model (a round that was not applied reuses the cast) is sent nothing
    assert last.route(last.digest, "1.5") == [] and last.size_for(last.digest, "1.5") == 0


def test_a_chain_longer_than_a_train_round_may_carry_is_not_offered(tmp_path, monkeypatch):
    _, casts = _chain_casts(tmp_path)
    assert len(casts[-1].route("0" * 64, "1.5")) == 4
    monkeypatch.setattr("coordinator.downlink.MAX_DELTA_CHAIN", 3)
    assert casts[-1].route("0" * 64, "1.5") is None and len(casts[-1].route(casts[1].digest, "1.5")) == 2


def test_a_round_that_changes_nothing_is_a_link_of_its_own(tmp_path):
    """Two links can rebuild the same model (a round whose delta is all zero): a device applies both."""
    rng = np.random.default_rng(4)
    link = Downlink("delta-int8")
    masks = [rng.random(BIG[0]) < 0.5, None]
    weights = [rng.normal(0, 1, s).astype(np.float32) * (m if m is not None else 1) for s, m in zip(BIG, masks)]
    first = link.prepare(_Model([w.copy() for w in weights], masks), "r")
    link.trained("a", first.digest)
    gm = _Model([w + 0.01 * (m if m is not None else 1) for w, m in zip(first_weights(first), masks)], masks)
    second = link.prepare(gm, "r")
    link.trained("a", second.digest)
    link.error = None  # nothing owed, and the same weights again: an all-zero delta
    third = link.prepare(_Model([w.copy() for w in gm.weights], masks), "r")
    assert third.digest == second.digest and third.base == second.digest
    route = third.route(first.digest, "1.5")
    assert [(x.base, x.digest) for x in route] == [(first.digest, second.digest), (second.digest, second.digest)]
    got = _rebuild(route, codec.decode(first.exact))
    assert codec.digest(got.names, got.tensors, got.masks) == third.digest


def first_weights(cast):
    return codec.decode(cast.exact).tensors


def test_a_broken_link_of_the_chain_is_detected_and_the_exact_model_fetched(tmp_path):
    held, casts = _chain_casts(tmp_path)
    last = casts[-1]
    route = last.route(casts[0].digest, "1.5")
    broken = [route[0], type(route[1])(route[1].digest, route[1].base, casts[1].small), route[2]]  # wrong blob
    fetch, fetched = _blobs(*(x.data for x in broken), last.exact)
    data, how = heldmodels.obtain(held, _chain_args(last, broken, casts[0].digest), fetch)
    assert how["download"] == "recovered" and fetched[-1] == codec_sha(last.exact)
    got = codec.decode(data)
    assert codec.digest(got.names, got.tensors, got.masks) == last.digest


@pytest.mark.parametrize("damage", ["evicted", "corrupted"])
def test_a_lost_or_corrupted_base_is_detected_and_the_exact_model_fetched(tmp_path, damage):
    held, first, second, ref = _two_casts(tmp_path)
    path = held.path(first.digest)
    if damage == "evicted":
        path.unlink()
    else:
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF  # one weight's last byte
        path.write_bytes(bytes(data))
    fetch, fetched = _blobs(second.small, second.exact)
    data, how = heldmodels.obtain(held, _round_args(second, ref(second.small), ref(second.exact), first.digest), fetch)
    assert how == {"download": "exact", "download_bytes": len(second.exact)} and fetched == [codec_sha(second.exact)]
    got = codec.decode(data)
    assert codec.digest(got.names, got.tensors, got.masks) == second.digest
    assert not path.exists() or damage == "evicted"


def test_a_reconstruction_that_does_not_match_is_discarded_for_the_exact_model(tmp_path):
    held, first, second, ref = _two_casts(tmp_path)
    other = Downlink("delta-int8")  # a delta of other weights against the same base: decodes, wrong digest
    other.bases = {first.digest: _base_of(first)}
    other.holds = {"dev": first.digest}
    rng = np.random.default_rng(9)
    bad = other.prepare(_Model([rng.normal(0, 1, s).astype(np.float32) for s in BIG], _base_of(first)[2]), "r")
    fetch, fetched = _blobs(bad.small, second.exact)
    data, how = heldmodels.obtain(held, _round_args(second, ref(bad.small), ref(second.exact), first.digest), fetch)
    assert how["download"] == "recovered" and how["download_bytes"] == len(bad.small) + len(second.exact)
    got = codec.decode(data)
    assert codec.digest(got.names, got.tensors, got.masks) == second.digest
    with pytest.raises(ProtocolError, match="digest"):  # an exact model that is not the announced one: refused
        heldmodels.obtain(
            heldmodels.HeldModels(tmp_path / "m2", 2, 1 << 20),
            TrainRound(run_id="r", round=2, model=ref(bad.exact), model_digest=second.digest),
            _blobs(bad.exact)[0],
        )


def _base_of(cast):
    b = codec.decode(cast.exact)
    return (b.names, b.tensors, b.masks)


# -- a whole run ------------------------------------------------------------------------------

MLP = {"model": "mlp", "input_shape": (64,), "num_classes": 10, "eval_data": None, "local_epochs": 1}


@pytest.fixture
def keras_in_process(monkeypatch):
    monkeypatch.setattr(GlobalModel, "worker_class", InProcessModelWorker)


def test_a_device_that_missed_a_round_gets_the_exact_model_and_trains_on_the_same_weights(tmp_path, keras_in_process):
    with memory_fleet(tmp_path) as f:
        for d in ("a", "b"):
            f.add(d)
        f.add("late", Behaviour(fail=True, forget=True, from_round=2, to_round=2))
        s = f.connect(3)
        cfg = TrainConfig(**MLP, rounds=4, sparsity=0.8, schedule="constant", download_format="delta-int8")
        out = train(cfg, s, s.store, Silent())
        rows = s.store.rounds(out["run_id"])
        clients = {(c["round"], c["device_id"]): c for c in s.store.client_rounds(out["run_id"])}
        held = {d: set(a.held.digests()) for d, a in f.agents.items()}
    assert out["state"] == "done" and [r["clients_ok"] for r in rows] == [3, 2, 3, 3]
    how = lambda rnd, dev: (clients[(rnd, dev)]["metrics"] or {}).get("download")  # noqa: E731
    assert [how(1, d) for d in ("a", "b", "late")] == ["small"] * 3  # round 1: the seeded model, to all
    assert rows[0]["bytes_down_per_client"] < 2_000 < rows[1]["bytes_down_per_client"]  # a header, not weights
    assert how(3, "a") == how(3, "b") == "delta" and how(3, "late") == "exact"  # it did not count in round 2
    assert how(4, "late") == "delta"
    assert set.intersection(*held.values())  # every device holds the same model: the one of the last round
    r3 = rows[2]
    assert r3["download_format"] == "delta-int8" and r3["bytes_down_total"] == sum(
        clients[(3, d)]["metrics"]["download_bytes"] for d in ("a", "b", "late")
    )


def test_devices_that_sit_rounds_out_catch_up_by_the_chain_and_train_on_the_same_weights(
    tmp_path, keras_in_process, monkeypatch
):
    """Two of four devices per round: a device sampled again after rounds out gets the broadcasts since the
    model it holds (or, never sampled, since the seeded first one), when that costs less than the exact
    model, and rebuilds what the coordinator announced (else its update would not count)."""
    with memory_fleet(tmp_path) as f:
        for d in ("a", "b", "c", "d", "old"):
            f.add(d)
        s = f.connect(5)
        protocol_of = s.protocol_of  # "old" says it speaks 1.4: it must never be sent a chain
        monkeypatch.setattr(s, "protocol_of", lambda d: "1.4" if d == "old" else protocol_of(d))
        cfg = TrainConfig(
            **MLP, rounds=8, sparsity=0.8, schedule="constant", download_format="delta-int8", clients_per_round=3
        )
        out = train(cfg, s, s.store, Silent())
        rows = s.store.rounds(out["run_id"])
        clients = s.store.client_rounds(out["run_id"])
    assert out["state"] == "done" and all(r["clients_ok"] == 3 for r in rows)
    old = [c["metrics"]["download"] for c in clients if c["device_id"] == "old"]
    assert old and "chain" not in old and "exact" in old, old  # it sat rounds out: the exact model then
    metrics = [c["metrics"] for c in clients if c["device_id"] != "old"]
    chains = [m for m in metrics if m["download"] == "chain"]
    assert chains and all(m["delta_links"] >= 2 for m in chains), [m["download"] for m in metrics]
    assert all(m["download_bytes"] < m["model_bytes"] for m in chains)  # each chain cost less than the exact model
    assert {m["download"] for m in metrics} <= {"small", "delta", "chain", "exact"}  # nothing recovered: all matched
    assert sum(r["bytes_down_total"] for r in rows) == sum(c["metrics"]["download_bytes"] for c in clients)


def test_a_resumed_run_goes_on_with_deltas_against_what_the_devices_hold(tmp_path, keras_in_process):
    with memory_fleet(tmp_path) as f:
        for d in ("a", "b"):
            f.add(d)
        s = f.connect(2)
        base = {**MLP, "sparsity": 0.8, "schedule": "constant", "download_format": "delta-int8"}
        first = train(TrainConfig(**base, rounds=2), s, s.store, Silent())
        out = train(TrainConfig(**base, rounds=3), s, s.store, Silent(), resume=first["run_id"])
        out = train(TrainConfig(**base, rounds=5), s, s.store, Silent(), resume=first["run_id"])  # and again
        clients = s.store.client_rounds(out["run_id"])
    assert out["state"] == "done"
    how = {(c["round"], c["device_id"]): c["metrics"]["download"] for c in clients}
    for rnd in (3, 4, 5):  # not the exact or the quantised model: they held the round before's
        assert how[(rnd, "a")] == how[(rnd, "b")] == "delta", how


def test_round_rows_count_the_bytes_that_crossed_the_broker(tmp_path, keras_in_process):
    """The bytes a round row says went down and up are what Mosquitto's $SYS counters saw it send,
    less the control traffic and framing (which the row does not count)."""
    b = broker_mod.start("mosquitto", "127.0.0.1", 0, tmp_path / "broker", sys_interval_s=1)
    counters = broker_mod.SysCounters(b.url)
    try:
        with memory_fleet(tmp_path, url=b.url) as f:
            for d in ("a", "b", "c"):
                f.add(d, heartbeat_s=30.0)
            s = f.connect(3)
            rows = {}
            for fmt in ("exact", "delta-int8"):
                before = counters.snapshot()["bytes/sent"]
                cfg = TrainConfig(**MLP, rounds=3, sparsity=0.5, schedule="constant", download_format=fmt)
                out = train(cfg, s, s.store, Silent())
                sent = counters.snapshot()["bytes/sent"] - before
                rows[fmt] = s.store.rounds(out["run_id"])
                counted = sum(r["bytes_down_total"] + r["bytes_up_total"] for r in rows[fmt])
                print(f"{fmt}: rows count {counted:,} B, the broker sent {sent:,} B")
                assert counted <= sent <= counted * 1.05 + 60_000, (fmt, counted, sent)
    finally:
        counters.close()
        b.stop()
    assert sum(r["bytes_down_total"] for r in rows["delta-int8"]) * 3 < sum(
        r["bytes_down_total"] for r in rows["exact"]
    )
