"""Built-in data sets (fashion-mnist IDX files, digits) and the shard partitions every device computes.

Everything here is numpy only and quick, except the last test (TF-MOT on fmnist_cnn)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from edge_agent import settings
from edge_agent.ml import data
from edge_agent.ml.shards import MIN_SHARD_SAMPLES, partition

REAL = Path(data.FASHION_MNIST_DIR)
HAVE_REAL = all((REAL / name).is_file() for files in data.FASHION_MNIST_FILES.values() for name in files)
needs_real = pytest.mark.skipif(
    not HAVE_REAL, reason=f"{REAL} missing: {data.FASHION_MNIST_INSTALL} " "(./scripts/test installs it)"
)
FASHION_LABELS = np.repeat(np.arange(10), 6000)  # fashion-mnist's train labels, up to order


def write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> Path:
    """An IDX file of unsigned bytes, gzip-compressed, as in the Debian package."""
    array = np.asarray(array, dtype=np.uint8)
    magic = (0x0800 | array.ndim) if magic is None else magic
    header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
    path.write_bytes(gzip.compress(header + array.tobytes()))
    return path


@pytest.fixture
def small_fmnist(tmp_path, monkeypatch):
    """A 40-image train / 20-image test fashion-mnist in tmp_path, pointed at by the environment variable."""
    rng = np.random.default_rng(0)
    sets = {}
    for split, n in (("train", 40), ("test", 20)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[0] = 255
        labels = np.arange(n) % 10
        img_name, lab_name = data.FASHION_MNIST_FILES[split]
        write_idx(tmp_path / img_name, images)
        write_idx(tmp_path / lab_name, labels)
        sets[split] = (images, labels)
    monkeypatch.setenv(data.FASHION_MNIST_DIR_ENV, str(tmp_path))
    return tmp_path, sets


# ---------------------------------------------------------------- the real files


@pytest.fixture(scope="module")
def real_train():
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(data.FASHION_MNIST_DIR_ENV, raising=False)
        return data.fashion_mnist("train")


@needs_real
def test_real_fashion_mnist_train(real_train):
    ds = real_train
    assert ds.x.shape == (60000, 28, 28, 1) and ds.x.dtype == np.float32
    assert ds.y.shape == (60000,) and ds.y.dtype == np.int64
    assert 0.0 == ds.x.min() and ds.x.max() == 1.0
    assert ds.y.min() == 0 and ds.y.max() == 9 and ds.num_classes == 10
    assert np.bincount(ds.y).tolist() == [6000] * 10


@needs_real
def test_real_fashion_mnist_test_is_the_eval_set(monkeypatch):
    from coordinator.global_model import load_eval_data

    monkeypatch.delenv(data.FASHION_MNIST_DIR_ENV, raising=False)
    ds = load_eval_data("fashion-mnist")
    assert ds.x.shape == (10000, 28, 28, 1) and ds.x.dtype == np.float32
    assert np.bincount(ds.y).tolist() == [1000] * 10


@needs_real
def test_real_shards_cover_the_train_split(real_train, monkeypatch):
    monkeypatch.delenv(data.FASHION_MNIST_DIR_ENV, raising=False)
    cfg = {"data": "fashion-mnist", "data_partition": "dirichlet:0.1", "data_seed": 4}
    shards = [data.load_local({**cfg, "data_shard": f"{k}/2"}) for k in range(2)]
    assert sum(len(s) for s in shards) == 60000
    assert len({s.name.split("#")[1] for s in shards}) == 1  # one partition digest for the whole fleet
    idx = partition(real_train.y, 2, "dirichlet:0.1", seed=4)[1]
    np.testing.assert_array_equal(shards[1].x, real_train.x[idx])


# ---------------------------------------------------------------- missing and corrupt files


def test_missing_package_names_the_apt_command(tmp_path, monkeypatch):
    from coordinator.global_model import load_eval_data

    monkeypatch.setenv(data.FASHION_MNIST_DIR_ENV, str(tmp_path))
    with pytest.raises(data.DataNotInstalled) as e:
        data.fashion_mnist("train")
    msg = str(e.value)
    assert "sudo apt-get install dataset-fashion-mnist" in msg and str(tmp_path) in msg
    with pytest.raises(ValueError, match="apt-get install dataset-fashion-mnist"):  # no silent digits instead
        data.load_local({"data": "fashion-mnist", "data_shard": "0/4"})
    with pytest.raises(ValueError, match="apt-get install dataset-fashion-mnist"):
        load_eval_data("fashion-mnist")


def test_small_generated_files_load(small_fmnist):
    _, sets = small_fmnist
    for split in ("train", "test"):
        ds = data.fashion_mnist(split)
        images, labels = sets[split]
        assert ds.x.shape == (len(labels), 28, 28, 1) and ds.x.dtype == np.float32
        np.testing.assert_array_equal(ds.y, labels)
        np.testing.assert_allclose(ds.x[..., 0], images / 255.0, atol=1e-7)
        assert ds.x[0].min() == 1.0


def _truncate_data(p: Path) -> None:
    raw = gzip.decompress(p.read_bytes())
    p.write_bytes(gzip.compress(raw[:-100]))


def _trailing(p: Path) -> None:
    p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes()) + b"\0"))


def _cut_gzip(p: Path) -> None:
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])


def _flip_byte(p: Path) -> None:  # inside the deflate stream: a zlib error or a CRC mismatch
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    p.write_bytes(bytes(raw))


def _not_gzip(p: Path) -> None:
    p.write_bytes(gzip.decompress(p.read_bytes()))


def _wrong_magic(p: Path) -> None:
    raw = gzip.decompress(p.read_bytes())
    p.write_bytes(gzip.compress(struct.pack(">I", 2049) + raw[4:]))


def _short_header(p: Path) -> None:
    p.write_bytes(gzip.compress(struct.pack(">I", 2051) + b"\0\0"))


@pytest.mark.parametrize(
    "damage,expect",
    [
        (_truncate_data, "truncated"),
        (_trailing, "trailing bytes"),
        (_cut_gzip, "gzip"),
        (_flip_byte, "gzip"),
        (_not_gzip, "gzip"),
        (_wrong_magic, "magic number 2049"),
        (_short_header, "header"),
    ],
)
def test_corrupt_image_file_is_refused(small_fmnist, damage, expect):
    directory, _ = small_fmnist
    path = directory / data.FASHION_MNIST_FILES["train"][0]
    damage(path)
    with pytest.raises(data.IdxError, match=expect) as e:
        data.fashion_mnist("train")
    assert str(path) in str(e.value)


def test_mismatched_files_are_refused(small_fmnist):
    directory, _ = small_fmnist
    images, labels = data.FASHION_MNIST_FILES["train"]
    write_idx(directory / labels, np.arange(39) % 10)
    with pytest.raises(data.IdxError, match="40 images but .* 39 labels"):
        data.fashion_mnist("train")
    write_idx(directory / labels, np.full(40, 10))
    with pytest.raises(data.IdxError, match="label 10 outside 0..9"):
        data.fashion_mnist("train")
    write_idx(directory / labels, np.arange(40) % 10)
    write_idx(directory / images, np.zeros((40, 27, 27)))
    with pytest.raises(data.IdxError, match="27x27"):
        data.fashion_mnist("train")
    write_idx(directory / images, np.zeros((40, 28, 28)), magic=2049)  # a label magic on an image file
    with pytest.raises(data.IdxError, match="magic number 2049"):
        data.fashion_mnist("train")


def test_load_local_shards_of_generated_files(small_fmnist):
    _, sets = small_fmnist
    images, labels = sets["train"]
    cfg = {"data": "fashion-mnist", "data_partition": "classes:2", "data_seed": 1}
    parts = [data.load_local({**cfg, "data_shard": f"{k}/5"}) for k in range(5)]
    shards = partition(labels, 5, "classes:2", seed=1)
    for k, (ds, idx) in enumerate(zip(parts, shards)):
        assert ds.x.shape == (len(idx), 28, 28, 1) and ds.x.dtype == np.float32
        np.testing.assert_array_equal(ds.y, labels[idx])
        np.testing.assert_allclose(ds.x[..., 0], images[idx] / 255.0, atol=1e-7)
        assert len(np.unique(ds.y)) == 2
        assert ds.name.startswith(f"fashion-mnist[{k}/5 classes:2 seed=1 #")
    assert sum(len(p) for p in parts) == len(labels)


# ---------------------------------------------------------------- partitions


def _check_partition(shards: list[np.ndarray], n: int) -> None:
    assert all(len(s) > 0 for s in shards), "a shard is empty"
    everything = np.concatenate(shards)
    assert len(everything) == n and np.array_equal(np.sort(everything), np.arange(n)), "not disjoint or not covering"
    assert all(s.dtype == np.int64 and np.all(np.diff(s) > 0) for s in shards)


MODES = ["iid", "dirichlet", "dirichlet:0.1", "dirichlet:5", "classes:1", "classes:2", "classes:3"]


@pytest.mark.parametrize(
    "mode,num_shards",
    [  # classes:C needs num_shards * C >= 10 (see test_impossible_...)
        (m, n) for m in MODES for n in (1, 7, 13, 100) if not m.startswith("classes:") or n * int(m[8:]) >= 10
    ],
)
def test_shards_are_disjoint_cover_and_are_reproducible(mode, num_shards):
    shards = partition(FASHION_LABELS, num_shards, mode, alpha=0.3, seed=11)
    _check_partition(shards, len(FASHION_LABELS))
    again = partition(FASHION_LABELS, num_shards, mode, alpha=0.3, seed=11)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again))
    if num_shards > 1:
        other = partition(FASHION_LABELS, num_shards, mode, alpha=0.3, seed=12)
        assert any(not np.array_equal(a, b) for a, b in zip(shards, other))


def test_digits_shards_cover_the_train_split():
    train, _ = data.digits_split()
    for mode in ("iid", "dirichlet", "dirichlet:0.05", "classes:2"):
        _check_partition(partition(train.y, 30, mode, seed=3), len(train))
    parts = [
        data.load_local({"data": "digits", "data_shard": f"{k}/4", "data_partition": "dirichlet", "data_alpha": 0.2})
        for k in range(4)
    ]
    assert sum(len(p) for p in parts) == len(train)


def test_bare_dirichlet_takes_data_alpha():
    a = partition(FASHION_LABELS, 10, "dirichlet", alpha=0.2, seed=5)
    b = partition(FASHION_LABELS, 10, "dirichlet:0.2", alpha=99.0, seed=5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_classes_gives_each_shard_c_labels_and_balanced_holders():
    for c in (1, 2, 3, 10):
        shards = partition(FASHION_LABELS, 100, f"classes:{c}", seed=2)
        held = [np.unique(FASHION_LABELS[s]) for s in shards]
        assert all(len(h) == c for h in held)
        holders = np.bincount(np.concatenate(held), minlength=10)
        assert holders.max() - holders.min() <= 1  # every class held by floor or ceil(100 * c / 10) shards
    combos = {tuple(np.unique(FASHION_LABELS[s])) for s in partition(FASHION_LABELS, 100, "classes:2", seed=2)}
    assert len(combos) > 5  # not the same few pairs over and over


def test_dirichlet_alpha_controls_skew():
    def skew(mode):
        shards = partition(FASHION_LABELS, 100, mode, seed=0)
        return np.mean([np.bincount(FASHION_LABELS[s]).max() / len(s) for s in shards])

    assert skew("dirichlet:0.1") > 0.5
    assert skew("dirichlet:100") < 0.2
    assert skew("iid") < 0.2


def test_dirichlet_top_up_leaves_no_shard_small():
    labels = np.repeat(np.arange(10), 50)  # 500 samples, 100 shards: alpha 0.05 leaves many shards empty
    shards = partition(labels, 100, "dirichlet:0.05", seed=0)
    _check_partition(shards, 500)
    assert min(len(s) for s in shards) == 5  # min(MIN_SHARD_SAMPLES, 500 // 100)
    shards = partition(labels, 20, "dirichlet:0.05", seed=0)
    assert min(len(s) for s in shards) == MIN_SHARD_SAMPLES
    again = partition(labels, 20, "dirichlet:0.05", seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again))


def test_impossible_partitions_say_why():
    with pytest.raises(ValueError, match="non-empty"):
        partition(np.arange(5) % 2, 6, "iid")
    with pytest.raises(ValueError, match="only 10 classes"):
        partition(FASHION_LABELS, 4, "classes:11")
    with pytest.raises(ValueError, match="at most 4 of the 10 classes"):
        partition(FASHION_LABELS, 4, "classes:1")
    with pytest.raises(ValueError, match="would be empty"):
        partition(np.array([0, 1, 1, 1, 1, 1]), 5, "classes:1")


@pytest.mark.parametrize(
    "value,ok",
    [
        ("iid", True),
        ("dirichlet", True),
        ("dirichlet:0.1", True),
        ("classes:2", True),
        (" Classes:3 ", True),
        ("random", False),
        ("dirichlet:", False),
        ("dirichlet:-1", False),
        ("dirichlet:nan", False),
        ("dirichlet:abc", False),
        ("classes", False),
        ("classes:0", False),
        ("classes:2.5", False),
        ("iid:3", False),
    ],
)
def test_partition_setting_is_validated_at_start_up(value, ok):
    if ok:
        assert settings.load({"data_partition": value}, None, {})["data_partition"] == value
    else:
        with pytest.raises(settings.SettingsError, match="setting data_partition: .*"):
            settings.load({"data_partition": value}, None, {})


def test_bare_dirichlet_with_bad_alpha_names_data_alpha():
    with pytest.raises(settings.SettingsError, match="setting data_alpha"):
        settings.load({"data_partition": "dirichlet", "data_alpha": "0"}, None, {})
    settings.load({"data_partition": "iid", "data_alpha": "0"}, None, {})  # unused there, as before


# ---------------------------------------------------------------- the fmnist models under pruning


@pytest.mark.tf
def test_fmnist_cnn_prunes_to_80_percent():
    from coordinator import surgery
    from edge_agent.ml import models, pruning, tfenv

    t = tfenv.load(1)
    keras, tfmot = t.keras, t.tfmot
    model = models.build("fmnist_cnn", *models.DEFAULT_SHAPES["fmnist_cnn"])
    assert model.count_params() == 1_663_370
    assert [layer.name for layer in model.layers] == ["conv1", "pool1", "conv2", "pool2", "flatten", "fc1", "logits"]
    assert models.build("fmnist_cnn_wide", *models.DEFAULT_SHAPES["fmnist_cnn_wide"]).count_params() == 6_497_162

    rng = np.random.default_rng(0)
    x = rng.random((64, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, 64)
    schedule = tfmot.sparsity.keras.ConstantSparsity(0.8, begin_step=0, frequency=1)
    pruned = tfmot.sparsity.keras.prune_low_magnitude(model, pruning_schedule=schedule)
    # one step: eager is ~3x quicker here than tracing the pruning wrappers into a graph
    pruned.compile(
        optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), run_eagerly=True
    )
    pruned.fit(x, y, batch_size=64, epochs=1, verbose=0, callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
    stripped = tfmot.sparsity.keras.strip_pruning(pruned)
    kernels = {layer.name: layer.kernel.numpy() for layer in stripped.layers if hasattr(layer, "kernel")}
    assert set(kernels) == {"conv1", "conv2", "fc1", "logits"}
    for name, k in kernels.items():
        assert abs(float(np.mean(k == 0)) - 0.8) < 0.01, name

    for granularity, fc_kind in (("unstructured", "unstructured"), ("block", "block16x1")):
        _, report, _ = pruning.wrap(model, granularity)
        assert (
            report["pruned"] == {"conv1": "unstructured", "conv2": "unstructured", "fc1": fc_kind, "logits": fc_kind}
            and not report["dense"]
        )
    structure = surgery.report(model.to_json())
    assert structure["shrinkable"] == {"conv1": 32, "conv2": 64, "fc1": 512}
    assert "logits" in structure["whole"]
