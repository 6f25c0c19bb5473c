import random

import pytest
from hypothesis import given, settings, strategies as st

from edge_agent.blobs import Assembler, BlobStore, sha256_hex, split
from edge_agent.protocol.errors import ErrorCode, ProtocolError
from edge_agent.protocol.messages import ChunkFrame


@settings(max_examples=50)
@given(data=st.binary(max_size=5000), chunk=st.integers(1, 700), seed=st.integers(0, 1000))
def test_split_assemble_any_order_with_duplicates(data, chunk, seed):
    frames = list(split(data, chunk))
    assert len(frames) == max(1, -(-len(data) // chunk))
    shuffled = frames + frames[: len(frames) // 2]  # QoS 1 duplicates
    random.Random(seed).shuffle(shuffled)
    asm = Assembler()
    results = [r for r in (asm.add(f, "dev") for f in shuffled) if r is not None]
    assert results[0] == data
    assert asm.pending_bytes == 0 or len(results) == 1


def test_hash_mismatch_refused():
    frames = list(split(b"hello world" * 100, 100))
    bad = ChunkFrame(frames[3].blob_sha256, 3, frames[3].count, frames[3].total_bytes, b"x" * len(frames[3].data))
    asm = Assembler()
    with pytest.raises(ProtocolError) as e:
        for f in frames[:3] + [bad] + frames[4:]:
            asm.add(f)
    assert e.value.code == ErrorCode.INTEGRITY
    assert asm.pending_bytes == 0


def test_inconsistent_headers_and_size_limit():
    frames = list(split(b"a" * 1000, 100))
    asm = Assembler()
    asm.add(frames[0])
    with pytest.raises(ProtocolError) as e:
        asm.add(ChunkFrame(frames[1].blob_sha256, 1, 99, 1000, frames[1].data))
    assert e.value.code == ErrorCode.BAD_FIELD
    with pytest.raises(ProtocolError) as e:
        Assembler(max_blob_bytes=500).add(frames[0])
    assert e.value.code == ErrorCode.TOO_LARGE


def test_blob_store(tmp_path):
    store = BlobStore(tmp_path)
    sha = store.put(b"abc")
    assert sha == sha256_hex(b"abc") and store.has(sha) and store.get(sha) == b"abc"
    store.path(sha).write_bytes(b"abd")  # corrupted on disk
    with pytest.raises(ProtocolError) as e:
        store.get(sha)
    assert e.value.code == ErrorCode.INTEGRITY and not store.has(sha)
    with pytest.raises(ProtocolError) as e:
        store.get(sha)
    assert e.value.code == ErrorCode.NOT_FOUND
    shas = [store.put(bytes([i]) * 1000) for i in range(5)]
    store.evict_to(2500, keep={shas[0]})
    assert store.has(shas[0]) and store.total_bytes() <= 2500
