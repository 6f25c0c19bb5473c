"""Local datasets: the data a device trains on never leaves it.

Sources: the built-in digits data (scikit-learn's ``load_digits``, 1,797 real
8x8 handwritten digits that ship inside the wheel, so demos need no download),
``.npz`` files with ``x``/``y``, CSV with a label column, and image folders.
The partition functions are pure numpy so they can be tested without TensorFlow.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
MIN_SHARD_SAMPLES = 10


@dataclass(frozen=True)
class Dataset:
    x: np.ndarray
    y: np.ndarray
    name: str

    @property
    def num_classes(self) -> int:
        return int(self.y.max()) + 1 if len(self.y) else 0

    def __len__(self) -> int:
        return len(self.y)


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits (images 8x8 in 0..16, labels), read from the file inside its wheel.

    Importing scikit-learn (and SciPy behind it) costs seconds per process, paid by every
    training worker on a Pi; the data file is what load_digits() reads, so read it directly
    and fall back to load_digits() if the file ever moves."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the built-in digits data needs scikit-learn installed (edgeprune[train])")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    if path.is_file():
        with gzip.open(path) as f:
            raw = np.loadtxt(f, delimiter=",")
        return raw[:, :-1].reshape(-1, 8, 8), raw[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target


def digits_split() -> tuple[Dataset, Dataset]:
    """The fixed digits train/test split (80/20, stratified, seed 0). Pixels scaled to [0, 1]."""
    images, target = _load_digits()
    x = (images.astype(np.float32) / 16.0)[..., None]
    y = target.astype(np.int64)
    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    test_idx = []
    for c in range(10):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        test_idx.extend(idx[: int(round(len(idx) * DIGITS_TEST_FRACTION))])
    test = np.zeros(len(y), dtype=bool)
    test[test_idx] = True
    return Dataset(x[~test], y[~test], "digits-train"), Dataset(x[test], y[test], "digits-test")


def partition(labels: np.ndarray, num_shards: int, mode: str = "iid", alpha: float = 0.5,
              seed: int = 0) -> list[np.ndarray]:
    """Split sample indices into ``num_shards`` disjoint shards.

    ``iid``: a random permutation cut into equal parts. ``dirichlet``: for every
    class, shard proportions drawn from Dirichlet(alpha) (smaller alpha = more
    skew), redrawn until every shard has at least ``MIN_SHARD_SAMPLES``.
    Deterministic in ``seed`` so every device computes the same partition.
    """
    if num_shards < 1:
        raise ValueError("num_shards must be >= 1")
    rng = np.random.default_rng(seed)
    n = len(labels)
    if mode == "iid":
        return [np.sort(s) for s in np.array_split(rng.permutation(n), num_shards)]
    if mode != "dirichlet":
        raise ValueError(f"unknown partition mode {mode!r}")
    if alpha <= 0:
        raise ValueError("alpha must be positive")
    minimum = min(MIN_SHARD_SAMPLES, n // num_shards)
    for _ in range(1000):
        shards: list[list[int]] = [[] for _ in range(num_shards)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * num_shards)) * len(idx)).astype(int)[:-1]
            for s, part in enumerate(np.split(idx, cuts)):
                shards[s].extend(part.tolist())
        if min(len(s) for s in shards) >= minimum:
            return [np.sort(np.array(s, dtype=np.int64)) for s in shards]
    raise ValueError(f"could not draw {num_shards} Dirichlet(alpha={alpha}) shards with >= {minimum} samples each")


def label_histogram(y: np.ndarray, num_classes: int) -> list[int]:
    return np.bincount(y, minlength=num_classes).astype(int).tolist()


def load_npz(path: str) -> Dataset:
    with np.load(path) as f:
        if "x" not in f or "y" not in f:
            raise ValueError(f"{path}: an .npz needs arrays 'x' and 'y' (found {', '.join(f.files)})")
        x, y = f["x"].astype(np.float32), f["y"].astype(np.int64).reshape(-1)
    if len(x) != len(y):
        raise ValueError(f"{path}: x has {len(x)} samples but y has {len(y)}")
    return Dataset(x, y, Path(path).name)


def load_csv(path: str, label_column: str = "label") -> Dataset:
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header or label_column not in header:
            raise ValueError(f"{path}: no label column {label_column!r} in header {header}")
        li = header.index(label_column)
        rows = [r for r in reader if r]
    try:
        y = np.array([int(float(r[li])) for r in rows], dtype=np.int64)
        x = np.array([[float(v) for j, v in enumerate(r) if j != li] for r in rows], dtype=np.float32)
    except ValueError as exc:
        raise ValueError(f"{path}: non-numeric value ({exc})") from None
    return Dataset(x, y, Path(path).name)


def load_image_folder(path: str, image_size: tuple[int, int] = (96, 96)) -> Dataset:
    """One sub-folder per class (needs TensorFlow; runs in the training worker)."""
    from .tfenv import load

    keras = load().keras
    ds = keras.utils.image_dataset_from_directory(path, image_size=image_size, batch_size=256, shuffle=False)
    xs, ys = [], []
    for xb, yb in ds:
        xs.append(xb.numpy() / 255.0)
        ys.append(yb.numpy())
    return Dataset(np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.int64), Path(path).name)


def load_local(settings: dict[str, Any]) -> Dataset:
    """The dataset this agent's settings point at; ValueError with a clear message otherwise."""
    spec = settings.get("data") or ""
    if not spec:
        raise ValueError("this agent has no training data configured (set --data / EDGEPRUNE_DATA)")
    if spec == "digits":
        train, _ = digits_split()
        index, count = map(int, settings.get("data_shard", "0/1").split("/"))
        shards = partition(train.y, count, settings.get("data_partition", "iid"),
                           settings.get("data_alpha", 0.5), settings.get("data_seed", 0))
        idx = shards[index]
        return Dataset(train.x[idx], train.y[idx], f"digits[{index}/{count}]")
    path = Path(spec).expanduser()
    if not path.exists():
        raise ValueError(f"training data {spec!r} does not exist")
    if path.is_dir():
        return load_image_folder(str(path))
    if path.suffix == ".npz":
        return load_npz(str(path))
    if path.suffix == ".csv":
        return load_csv(str(path), settings.get("data_label_column", "label"))
    raise ValueError(f"training data {spec!r}: use 'digits', a .npz, a .csv or an image folder")
