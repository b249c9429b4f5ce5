"""Fashion-MNIST from the idx files (plain or .gz) in DATA_DIR/fashion-mnist/."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from fslsage.data.base import CLASSIFICATION, DataError, Dataset, DatasetInfo, DatasetSpec
from fslsage.data.files import ensure_present, plain_or_gz, read_bytes
from fslsage.data.registries import DATASETS

INFO = DatasetInfo(
    name="fmnist",
    task=CLASSIFICATION,
    num_classes=10,
    input_shape=(1, 28, 28),
    num_train=60000,
    num_test=10000,
    mean=(0.2860,),
    std=(0.3530,),
    augment="none",
)
FOLDER = "fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
LAYOUT = (
    "the idx files train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
    f"t10k-labels-idx1-ubyte (each optionally .gz) under DATA_DIR/{FOLDER}"
)
_UBYTE = 0x08  # the only idx element type Fashion-MNIST uses


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an idx file: 2 zero bytes, type code, ndim, then ndim big-endian int32 sizes."""
    raw = read_bytes(path)
    header = 4 + 4 * ndim
    if len(raw) < header or raw[0] != 0 or raw[1] != 0 or raw[2] != _UBYTE or raw[3] != ndim:
        raise DataError(
            f"fmnist: bad idx magic in {path}: got {raw[:4].hex() or 'nothing'}, "
            f"expected 000008{ndim:02x} (uint8, {ndim}-d)"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    size = int(np.prod(dims))
    if len(raw) - header != size:
        raise DataError(f"fmnist: {path} holds {len(raw) - header} bytes, header says {dims}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _read_split(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    img_name, lbl_name = FILES[split]
    images = read_idx(_found(root / img_name), 3)
    labels = read_idx(_found(root / lbl_name), 1)
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise DataError(
            f"fmnist: {root / img_name} holds {images.shape}, {root / lbl_name} "
            f"{labels.shape}; expected N x 28 x 28 images and N labels"
        )
    if len(labels) and labels.max() >= INFO.num_classes:
        raise DataError(f"fmnist: {root / lbl_name} has labels outside 0..9")
    x = torch.from_numpy(images.copy()).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


def _found(path: Path) -> Path:
    found = plain_or_gz(path)
    if found is None:  # only if it vanished after ensure_present looked
        raise DataError(f"fmnist: missing {path}[.gz]; expected {LAYOUT}")
    return found


def describe() -> DatasetInfo:
    return INFO


def load(data_dir: Path, download: bool = False) -> Dataset:
    root = data_dir / FOLDER
    names = [n for pair in FILES.values() for n in pair]

    def missing() -> Path | None:
        for name in names:
            if plain_or_gz(root / name) is None:
                return root / f"{name}[.gz]"
        return None

    def fetch() -> None:
        from torchvision.datasets import FashionMNIST
        from torchvision.datasets.utils import download_url

        md5s = dict(FashionMNIST.resources)
        for name in names:
            if plain_or_gz(root / name) is None:
                gz = name + ".gz"
                download_url(FashionMNIST.mirrors[0] + gz, str(root), filename=gz, md5=md5s[gz])

    ensure_present("fmnist", missing, LAYOUT, download, fetch)
    train_x, train_y = _read_split(root, "train")
    test_x, test_y = _read_split(root, "test")
    info = dataclasses.replace(INFO, num_train=len(train_y), num_test=len(test_y))
    return Dataset(info, train_x, train_y, test_x, test_y)


DATASETS.register("fmnist")(DatasetSpec(describe=describe, loader=load))
