"""Export variants on real TF-MOT-pruned models: read-back sparsity, sizes, QAT, block int8."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.tf]


def test_variants_sizes_and_readback(tmp_path):
    from coordinator import export
    from edge_agent.ml import data

    model = export.latency_model("digits_cnn", 0.8)
    recs = {
        r["format"]: r for r in export.export(model, list(export.FORMATS), tmp_path, calibration=data.digits_split()[1])
    }
    for r in recs.values():
        assert abs(r["sparsity"] - 0.8) < 0.005, r  # read from the .tflite, not from the config
        data_bytes = Path(r["path"]).read_bytes()
        assert hashlib.sha256(data_bytes).hexdigest() == r["sha256"] and len(data_bytes) == r["bytes"]
        assert r["gzip_bytes"] < r["bytes"]
    assert recs["sparse"]["bytes"] < recs["dense"]["bytes"] / 3
    assert recs["sparse-int8"]["bytes"] < recs["sparse"]["bytes"]
    assert all(t["encoding"] == "sparse" for t in recs["sparse"]["tensors"])
    assert all(t["encoding"] == "dense" for t in recs["dense"]["tensors"])


def test_block_granularity_makes_small_int8_artifacts(tmp_path):
    from coordinator import export

    model = export.latency_model("digits_cnn", 0.8, granularity="block")
    recs = {r["format"]: r for r in export.export(model, ["dense", "sparse-int8"], tmp_path)}
    assert recs["dense"]["bytes"] / recs["sparse-int8"]["bytes"] >= 8.0


def test_qat_preserves_pruning(tmp_path):
    from coordinator import export
    from edge_agent.ml import data

    train, test = data.digits_split()
    model = export.latency_model("digits_cnn", 0.8)
    recs = {r["format"]: r for r in export.export(model, ["sparse-int8"], tmp_path, calibration=test, qat_data=train)}
    assert set(recs) == {"sparse-int8", "sparse-int8-qat"}
    assert recs["sparse-int8-qat"]["sparsity"] >= 0.79  # fine-tuning kept the zeros


def test_image_folder_data(tmp_path):
    from edge_agent.ml import data, tfenv

    tf = tfenv.load().tf
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(3):
            img = tf.constant(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8))
            (tmp_path / label / f"{i}.png").write_bytes(tf.io.encode_png(img).numpy())
    ds = data.load_local({"data": str(tmp_path)})
    assert ds.x.shape == (6, 96, 96, 3) and sorted(ds.y.tolist()) == [0, 0, 0, 1, 1, 1]
    assert 0.0 <= ds.x.min() and ds.x.max() <= 1.0
