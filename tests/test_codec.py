"""Tensor bundle codec: exact round trips, quantisation bounds, size behaviour, bad input."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edge_agent.protocol import codec
from edge_agent.protocol.errors import ErrorCode, ProtocolError


def rand_model(seed=0, sparsity=0.8):
    rng = np.random.default_rng(seed)
    kernel = rng.normal(size=(64, 32)).astype(np.float32)
    mask = rng.random(kernel.shape) >= sparsity
    bias = rng.normal(size=(32,)).astype(np.float32)
    return [kernel * mask, bias], [mask, None]


def test_hand_computed_vector():
    t = np.array([[0.0, 1.5], [-2.0, 0.0]], dtype=np.float32)
    m = t != 0
    data = codec.encode([t], names=["w"], masks=[m], kind="model", compression="none")
    header, off = codec.read_header(data)
    body = data[off:]
    # mask bits 0110 -> packbits (big bit order) -> 0b01100000 = 0x60, then two fp32 values
    assert body[:1] == b"\x60"
    assert np.frombuffer(body[1:], "<f4").tolist() == [1.5, -2.0]
    assert header["tensors"][0] == {
        "name": "w",
        "shape": [2, 2],
        "mask": "bitmap",
        "values": "fp32",
        "scale": None,
        "nnz": 2,
        "delta": False,
    }


def test_model_round_trip_is_exact():
    tensors, masks = rand_model()
    data = codec.encode(tensors, names=["k", "b"], masks=masks, kind="model", meta={"round": 3})
    b = codec.decode(data)
    assert b.kind == "model" and b.meta == {"round": 3} and b.names == ["k", "b"]
    np.testing.assert_array_equal(b.tensors[0], tensors[0])
    np.testing.assert_array_equal(b.tensors[1], tensors[1])
    np.testing.assert_array_equal(b.masks[0], masks[0])
    assert b.masks[1] is None


def test_relative_mask_and_int8_delta_update():
    base, base_masks = rand_model()
    rng = np.random.default_rng(1)
    client_mask = base_masks[0] & (rng.random(base_masks[0].shape) > 0.1)  # prunes 10% more
    trained = [(base[0] + rng.normal(scale=0.01, size=base[0].shape).astype(np.float32)) * client_mask, base[1] + 0.01]
    data = codec.encode(
        trained,
        names=["k", "b"],
        masks=[client_mask, None],
        kind="update",
        reference=base,
        reference_masks=base_masks,
        values="int8",
        delta=True,
        seed=5,
    )
    b = codec.decode(data, reference=base, reference_masks=base_masks)
    np.testing.assert_array_equal(b.masks[0], client_mask)
    assert np.all(b.tensors[0][~client_mask] == 0)
    err = np.abs(b.tensors[0] - trained[0])[client_mask]
    delta_peak = np.abs(trained[0] - base[0])[client_mask].max()
    assert err.max() <= delta_peak / 127 * 1.0001  # stochastic rounding: within one step
    np.testing.assert_allclose(b.tensors[1], trained[1], atol=0.01 / 127 * 1.01)


def test_stochastic_rounding_is_unbiased():
    x = np.full((20000,), 0.3, dtype=np.float32)
    x[0] = 1.0  # scale = 1/127, 0.3 sits between two steps
    data = codec.encode([x], names=["x"], kind="update", values="int8")
    back = codec.decode(data).tensors[0][1:]
    assert abs(back.mean() - 0.3) < 0.001
    assert len(np.unique(back)) == 2


def test_unchanged_mask_costs_almost_nothing():
    base, base_masks = rand_model(sparsity=0.9)
    big = [np.tile(base[0], (8, 8)), base[1]]
    big_mask = [np.tile(base_masks[0], (8, 8)), None]
    same = codec.encode(
        big,
        names=["k", "b"],
        masks=big_mask,
        kind="update",
        reference=big,
        reference_masks=big_mask,
        values="int8",
        delta=True,
    )
    nnz = int(big_mask[0].sum()) + 32
    assert len(same) < nnz * 1.0 + 1000  # ~1 byte per kept value, the mask nearly free
    bitmap = codec.encode(big, names=["k", "b"], masks=big_mask, kind="update", values="int8")
    assert len(bitmap) > len(same)


@settings(max_examples=60, deadline=None)
@given(
    arr=hnp.arrays(
        np.float32, hnp.array_shapes(min_dims=1, max_dims=4, max_side=7), elements=st.floats(-1e3, 1e3, width=32)
    ),
    density=st.floats(0, 1),
    values=st.sampled_from(["fp32", "fp16", "int8", "int6", "int4"]),
    compression=st.sampled_from(["zstd", "none"]),
    seed=st.integers(0, 100),
)
def test_property_round_trip(arr, density, values, compression, seed):
    rng = np.random.default_rng(seed)
    mask = rng.random(arr.shape) < density
    t = arr * mask
    data = codec.encode([t], names=["t"], masks=[mask], kind="model", values=values, compression=compression, seed=seed)
    b = codec.decode(data)
    np.testing.assert_array_equal(b.masks[0], mask)
    assert np.all(b.tensors[0][~mask] == 0)
    if values == "fp32":
        np.testing.assert_array_equal(b.tensors[0], t)
    elif values == "fp16":
        np.testing.assert_allclose(b.tensors[0], t.astype(np.float16).astype(np.float32))
    else:
        peak = np.abs(t[mask]).max() if mask.any() else 0
        levels = codec.INT_LEVELS[values]
        assert np.all(np.abs(b.tensors[0] - t) <= peak / levels * 1.0001 + 1e-6)


@settings(max_examples=40, deadline=None)
@given(
    shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=9),
    seed=st.integers(0, 1000),
    p_ref=st.floats(0, 1),
    p_keep=st.floats(0, 1),
    p_regrow=st.sampled_from([0.0, 0.1]),
)
def test_property_relative_and_xor_masks(shape, seed, p_ref, p_keep, p_regrow):
    rng = np.random.default_rng(seed)
    ref_mask = rng.random(shape) < p_ref
    ref = (rng.normal(size=shape) * ref_mask).astype(np.float32)
    mask = (ref_mask & (rng.random(shape) < p_keep)) | (rng.random(shape) < p_regrow)
    t = (ref + rng.normal(size=shape).astype(np.float32)) * mask
    data = codec.encode(
        [t], names=["t"], masks=[mask], kind="update", reference=[ref], reference_masks=[ref_mask], delta=True
    )
    b = codec.decode(data, reference=[ref], reference_masks=[ref_mask])
    np.testing.assert_array_equal(b.masks[0], mask)
    np.testing.assert_allclose(b.tensors[0], t, atol=1e-5)


def test_regrown_positions_use_xor_masks():
    ref_mask = np.array([1, 0, 1, 1, 0, 0, 1, 0], bool)
    ref = np.arange(8, dtype=np.float32) * ref_mask
    mask = np.array([1, 1, 0, 1, 0, 0, 1, 0], bool)  # regrew position 1, pruned position 2
    t = (np.arange(8, dtype=np.float32) + 0.5) * mask
    data = codec.encode(
        [t], names=["t"], masks=[mask], kind="update", reference=[ref], reference_masks=[ref_mask], delta=True
    )
    header, _ = codec.read_header(data)
    assert header["tensors"][0]["mask"] == "xor"
    b = codec.decode(data, reference=[ref], reference_masks=[ref_mask])
    np.testing.assert_array_equal(b.masks[0], mask)
    np.testing.assert_allclose(b.tensors[0], t)


@pytest.mark.parametrize("fmt,levels", [("int8", 127), ("int6", 31), ("int4", 7)])
def test_integer_formats_error_bound_and_size(fmt, levels):
    rng = np.random.default_rng(0)
    x = rng.normal(size=50_000).astype(np.float32)
    data = codec.encode([x], names=["x"], kind="update", values=fmt, seed=1)
    back = codec.decode(data).tensors[0]
    step = np.abs(x).max() / levels
    assert np.abs(back - x).max() <= step * 1.0001
    assert abs(float((back - x).mean())) < step / 50  # unbiased


def test_fewer_levels_compress_smaller():
    x = np.random.default_rng(0).normal(size=50_000).astype(np.float32)
    sizes = [len(codec.encode([x], names=["x"], kind="update", values=f)) for f in ("int8", "int6", "int4")]
    assert sizes[0] > sizes[1] > sizes[2]
    assert sizes[2] < 50_000 * 3.5 / 8  # near the entropy of 15 levels (~3 bits), far below 8


def test_integer_value_out_of_range_refused():
    data = bytearray(
        codec.encode([np.array([1.0, -1.0], np.float32)], names=["x"], kind="update", values="int4", compression="none")
    )
    data[-1] = 100  # int4 values must stay in -7..7
    with pytest.raises(ProtocolError) as e:
        codec.decode(bytes(data))
    assert e.value.code == ErrorCode.BAD_FIELD


def good_bundle():
    tensors, masks = rand_model()
    return codec.encode(tensors, names=["k", "b"], masks=masks, kind="model"), tensors, masks


def rewrite_header(data, fn):
    import json
    import struct

    header, off = codec.read_header(data)
    fn(header)
    raw = json.dumps(header).encode()
    return struct.pack("<4sI", b"EPT1", len(raw)) + raw + data[off:]


def _set(key, value, tensor=None):
    def fn(h):
        (h["tensors"][tensor] if tensor is not None else h)[key] = value

    return fn


@pytest.mark.parametrize(
    "mutate,code",
    [
        (lambda d: b"NOPE" + d[4:], ErrorCode.MALFORMED),
        (lambda d: d[:5], ErrorCode.MALFORMED),
        (lambda d: d[:-10], ErrorCode.MALFORMED),  # truncated body
        (lambda d: d[:8] + b"[" + d[9:], ErrorCode.MALFORMED),  # header not JSON
        (lambda d: rewrite_header(d, _set("v", 7)), ErrorCode.BAD_VERSION),
        (lambda d: rewrite_header(d, _set("nnz", 3, 0)), ErrorCode.BAD_FIELD),
        (lambda d: rewrite_header(d, _set("mask", "weird", 0)), ErrorCode.MALFORMED),
        (lambda d: rewrite_header(d, _set("compression", "lz4")), ErrorCode.MALFORMED),
        (lambda d: rewrite_header(d, _set("body_bytes", -1)), ErrorCode.TOO_LARGE),
        (lambda d: rewrite_header(d, _set("shape", [64, 33], 0)), ErrorCode.BAD_FIELD),
    ],
)
def test_corrupted_bundles_refused(mutate, code):
    data, _, _ = good_bundle()
    with pytest.raises(ProtocolError) as e:
        codec.decode(mutate(data))
    assert e.value.code == code


def test_shape_mismatch_with_model_refused():
    data, tensors, _ = good_bundle()
    with pytest.raises(ProtocolError) as e:
        codec.decode(data, reference=[np.zeros((64, 31), np.float32), tensors[1]])
    assert e.value.code == ErrorCode.BAD_FIELD
    with pytest.raises(ProtocolError) as e:
        codec.decode(data, reference=[tensors[0]])
    assert e.value.code == ErrorCode.BAD_FIELD


def test_decompression_bomb_refused():
    big = [np.zeros((4096, 1024), np.float32)]
    data = codec.encode(big, names=["z"], kind="model")
    assert len(data) < 10_000
    with pytest.raises(ProtocolError) as e:
        codec.decode(data, max_body_bytes=1 << 20)
    assert e.value.code == ErrorCode.TOO_LARGE


# -- seeded models: a fresh model the receiver draws itself -----------------------------------


def _seeded_model():
    rng = np.random.default_rng(4)
    limit = np.sqrt(6 / (64 + 32))  # Glorot uniform, as the built-in models initialise kernels
    kernel = rng.uniform(-limit, limit, (64, 32)).astype(np.float32)
    return [kernel, np.zeros(32, np.float32), np.ones(8, np.float32)], limit


def test_a_seeded_model_costs_its_header_and_keeps_each_tensors_spread():
    tensors, limit = _seeded_model()
    data = codec.encode_seeded(tensors, names=["k", "b", "g"], masks=[np.ones((64, 32), bool), None, None], seed=5)
    assert len(data) < 600 < 4 * 64 * 32
    got = codec.decode(data)
    assert got.masks[0].all() and got.masks[1] is None
    kernel = got.tensors[0]
    assert not np.array_equal(kernel, tensors[0]) and np.abs(kernel).max() <= limit * 1.02  # its rms, measured
    assert abs(float(kernel.std()) - float(tensors[0].std())) < 0.05 * float(tensors[0].std())
    assert not got.tensors[1].any() and (got.tensors[2] == 1).all()  # constant tensors are kept as they are
    again = codec.decode(codec.encode_seeded(tensors, names=["k", "b", "g"], masks=[None, None, None], seed=5))
    other = codec.decode(codec.encode_seeded(tensors, names=["k", "b", "g"], masks=[None, None, None], seed=6))
    assert np.array_equal(again.tensors[0], kernel) and not np.array_equal(other.tensors[0], kernel)


def test_a_seeded_model_keeps_its_masks():
    tensors, _ = _seeded_model()
    mask = np.random.default_rng(1).random((64, 32)) < 0.3
    got = codec.decode(codec.encode_seeded(tensors, names=["k", "b", "g"], masks=[mask, None, None], seed=1))
    assert np.array_equal(got.masks[0], mask) and not got.tensors[0][~mask].any() and got.tensors[0][mask].all()


@pytest.mark.parametrize(
    "mutate,code",
    [
        (_set("seed", None, 0), ErrorCode.MALFORMED),  # uniform values need their seed
        (_set("seed", -1, 0), ErrorCode.MALFORMED),
        (_set("scale", None, 1), ErrorCode.MALFORMED),  # const values need their value
        (_set("delta", True, 0), ErrorCode.MALFORMED),  # a drawn value is never a delta
        (_set("kind", "update"), ErrorCode.MALFORMED),  # nor an update
        (_set("scale", 10**400, 0), ErrorCode.MALFORMED),  # an integer no float holds: refused, not a crash
        (_set("shape", [1 << 20, 1 << 10], 0), ErrorCode.TOO_LARGE),  # a tiny header must not draw 4 GB
    ],
)
def test_bad_seeded_bundles_refused(mutate, code):
    tensors, _ = _seeded_model()
    data = codec.encode_seeded(tensors, names=["k", "b", "g"], masks=[None, None, None], seed=5)
    with pytest.raises(ProtocolError) as e:
        codec.decode(rewrite_header(data, mutate))
    assert e.value.code == code
