"""Local datasets: the data a device trains on never leaves it.

Sources: two built-in data sets, ``.npz`` files with ``x``/``y``, CSV with a label
column, and image folders.

- ``digits``: scikit-learn's ``load_digits`` (1,797 real 8x8 handwritten digits that
  ship inside the wheel), split 80/20 into train and test.
- ``fashion-mnist``: Zalando's Fashion-MNIST (60,000 train / 10,000 test 28x28 grey
  images, 10 balanced classes), read from the IDX files of the Debian package
  ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``, or the directory in
  ``EDGEPRUNE_FASHION_MNIST_DIR``). Nothing is downloaded at run time; without the
  package the error names the apt command, and nothing falls back to other data.

A device holds one shard of a built-in training split (``data_shard`` INDEX/COUNT), cut by
:mod:`.shards`.
"""

from __future__ import annotations

import csv
import gzip
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .shards import parse_partition, partition, partition_digest

BUILTIN_DATASETS = ("digits", "fashion-mnist")
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0

FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_INSTALL = f"sudo apt-get install {FASHION_MNIST_PACKAGE}"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_DIR_ENV = "EDGEPRUNE_FASHION_MNIST_DIR"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_SHAPE = (28, 28)
IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions (count, rows, columns)
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension (count)


class DataNotInstalled(ValueError):
    """A built-in data set whose files are not on this machine; the message names the package to install."""


class IdxError(ValueError):
    """An IDX file that is truncated, corrupt or not what it should be."""


@dataclass(frozen=True)
class Dataset:
    x: np.ndarray
    y: np.ndarray
    name: str

    @property
    def num_classes(self) -> int:
        """Classes for integer labels; 0 for float targets (regression, reconstruction)."""
        if not len(self.y) or not np.issubdtype(self.y.dtype, np.integer):
            return 0
        return int(self.y.max()) + 1

    def __len__(self) -> int:
        return len(self.y)


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits (images 8x8 in 0..16, labels), read from the file inside its wheel.

    Importing scikit-learn (and SciPy behind it) costs seconds per process, paid by every
    training worker on a Pi; the data file is what load_digits() reads, so read it directly
    and fall back to load_digits() if the file ever moves."""
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
    test_idx: list[int] = []
    for c in range(10):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        test_idx.extend(idx[: int(round(len(idx) * DIGITS_TEST_FRACTION))])
    test = np.zeros(len(y), dtype=bool)
    test[test_idx] = True
    return Dataset(x[~test], y[~test], "digits-train"), Dataset(x[test], y[test], "digits-test")


# ---------------------------------------------------------------- fashion-mnist (IDX files)


def fashion_mnist_dir() -> Path:
    """Where the IDX files are: ``EDGEPRUNE_FASHION_MNIST_DIR`` if set, else the Debian package's directory."""
    return Path(os.environ.get(FASHION_MNIST_DIR_ENV) or FASHION_MNIST_DIR)


def read_idx(path: Path, magic: int) -> np.ndarray:
    """One gzip-compressed IDX file of unsigned bytes as a uint8 array of its declared shape.

    The header is big-endian: a magic number (``0x0000 08 NDIM``: 2051 for images,
    2049 for labels) and NDIM 32-bit sizes; the data follows (so images start at
    byte 16, labels at byte 8). A wrong magic number, a size that does not match
    the data (truncated or trailing bytes) or a broken gzip stream raise
    :class:`IdxError` naming the file.
    """
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (EOFError, OSError, zlib.error) as exc:  # truncated stream, bad CRC, not gzip at all
        raise IdxError(f"{path}: not a readable gzip-compressed IDX file ({exc})") from None
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxError(f"{path}: {len(raw)} bytes, shorter than the {header}-byte IDX header")
    (found,) = struct.unpack(">I", raw[:4])
    if found != magic:
        raise IdxError(
            f"{path}: magic number {found} where an IDX {'image' if magic == IDX_IMAGES_MAGIC else 'label'} "
            f"file has {magic}"
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    want = math.prod(dims)
    if len(raw) - header != want:
        what = "truncated" if len(raw) - header < want else "has trailing bytes"
        raise IdxError(
            f"{path}: {what}: the header declares {'x'.join(map(str, dims))} = {want:,} bytes of data, "
            f"the file holds {len(raw) - header:,}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_fashion_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """The raw ``split`` ('train' or 'test'): uint8 images (N, 28, 28) and int64 labels (N,).

    :class:`DataNotInstalled` (naming the apt command) when the files are absent,
    :class:`IdxError` when one is corrupt or the two do not belong together.
    """
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"fashion-mnist has splits {', '.join(FASHION_MNIST_FILES)}, not {split!r}")
    directory = fashion_mnist_dir()
    paths = [directory / name for name in FASHION_MNIST_FILES[split]]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        where = (
            f"{FASHION_MNIST_DIR_ENV}={os.environ[FASHION_MNIST_DIR_ENV]}"
            if os.environ.get(FASHION_MNIST_DIR_ENV)
            else "the Debian package's directory"
        )
        raise DataNotInstalled(
            f"the built-in fashion-mnist data is not installed: {missing[0]} is missing "
            f"({where}). Install the Debian package {FASHION_MNIST_PACKAGE}: "
            f"{FASHION_MNIST_INSTALL}"
        )
    images = read_idx(paths[0], IDX_IMAGES_MAGIC)
    labels = read_idx(paths[1], IDX_LABELS_MAGIC)
    if images.shape[1:] != FASHION_MNIST_SHAPE:
        raise IdxError(f"{paths[0]}: images are {images.shape[1]}x{images.shape[2]}, fashion-mnist's are 28x28")
    if len(images) != len(labels):
        raise IdxError(f"{paths[0]} holds {len(images):,} images but {paths[1]} holds {len(labels):,} labels")
    if len(labels) and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise IdxError(f"{paths[1]}: label {int(labels.max())} outside 0..{len(FASHION_MNIST_CLASSES) - 1}")
    return images, labels.astype(np.int64)


def _to_unit_float(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) -> float32 (N, H, W, 1) in [0, 1]."""
    x = images.astype(np.float32)
    x /= 255.0  # in place: one float32 copy of the images, not two
    return x[..., None]


def fashion_mnist(split: str = "train") -> Dataset:
    """Fashion-MNIST ``split`` as float32 images (N, 28, 28, 1) in [0, 1] and int64 labels 0..9."""
    images, labels = read_fashion_mnist(split)
    return Dataset(_to_unit_float(images), labels, f"fashion-mnist-{split}")


def load_npz(path: str) -> Dataset:
    with np.load(path) as f:
        if "x" not in f or "y" not in f:
            raise ValueError(f"{path}: an .npz needs arrays 'x' and 'y' (found {', '.join(f.files)})")
        x, y = f["x"].astype(np.float32), f["y"]
    if np.issubdtype(y.dtype, np.integer):  # class labels
        y = y.astype(np.int64).reshape(-1)
    else:  # regression targets or reconstructions (an autoencoder's y is x): kept as they are, float32
        y = y.astype(np.float32)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y.reshape(-1)
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


def load_builtin(name: str, settings: dict[str, Any]) -> Dataset:
    """This device's shard of a built-in training split (``data_shard``, ``data_partition``,
    ``data_alpha``, ``data_seed``). The name says which shard of which partition, with the
    partition's :func:`partition_digest`: devices of one fleet must show the same digest."""
    index, count = map(int, str(settings.get("data_shard") or "0/1").split("/"))
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"data_shard {index}/{count}: INDEX must be in 0..COUNT-1")
    if name == "digits":
        train, _ = digits_split()
        x, y = train.x, train.y
    elif name == "fashion-mnist":
        x, y = read_fashion_mnist("train")  # uint8: only this device's shard becomes float32
    else:
        raise ValueError(f"no built-in data set {name!r}; choose from {', '.join(BUILTIN_DATASETS)}")
    spec = parse_partition(settings.get("data_partition") or "iid", settings.get("data_alpha", 0.5))
    seed = int(settings.get("data_seed") or 0)
    shards = partition(y, count, spec, seed=seed)
    idx = shards[index]
    xs = _to_unit_float(x[idx]) if x.dtype == np.uint8 else x[idx]
    return Dataset(xs, y[idx], f"{name}[{index}/{count} {spec} seed={seed} #{partition_digest(shards)}]")


def load_local(settings: dict[str, Any]) -> Dataset:
    """The dataset this agent's settings point at; ValueError with a clear message otherwise."""
    spec = settings.get("data") or ""
    if not spec:
        raise ValueError("this agent has no training data configured (set --data / EDGEPRUNE_DATA)")
    if spec in BUILTIN_DATASETS:
        return load_builtin(spec, settings)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ValueError(f"training data {spec!r} does not exist (built-in data sets: {', '.join(BUILTIN_DATASETS)})")
    if path.is_dir():
        return load_image_folder(str(path))
    if path.suffix == ".npz":
        return load_npz(str(path))
    if path.suffix == ".csv":
        return load_csv(str(path), settings.get("data_label_column", "label"))
    raise ValueError(
        f"training data {spec!r}: use {' or '.join(repr(d) for d in BUILTIN_DATASETS)}, a .npz, a .csv "
        "or an image folder"
    )
