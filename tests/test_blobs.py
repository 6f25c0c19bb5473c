import pytest

from edge_agent.common.blobs import BlobStore, sha256_hex
from edge_agent.protocol.errors import ErrorCode, ProtocolError


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
