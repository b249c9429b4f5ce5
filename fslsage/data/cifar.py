"""CIFAR-10 and CIFAR-100 from the standard python-pickle batches (one shared reader)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fslsage.data.base import CLASSIFICATION, DataError, Dataset, DatasetInfo, DatasetSpec
from fslsage.data.files import ensure_present, load_pickle
from fslsage.data.registries import DATASETS


@dataclass(frozen=True)
class _CifarFormat:
    """Everything that differs between the two CIFAR releases."""

    info: DatasetInfo
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    torchvision_class: str  # the torchvision dataset whose url/md5 we download with


def _read_batches(paths: list[Path], label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for path in paths:
        batch = load_pickle(path)
        if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
            raise DataError(f"corrupt batch {path}: expected a dict with b'data' and {label_key!r}")
        data = np.asarray(batch[b"data"])
        labels = np.asarray(batch[label_key], dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(f"corrupt batch {path}: data is {data.dtype} {data.shape}, not Nx3072")
        if labels.shape != (data.shape[0],):
            raise DataError(f"corrupt batch {path}: {len(labels)} labels for {len(data)} images")
        xs.append(data.reshape(-1, 3, 32, 32))  # rows are stored R-plane, G-plane, B-plane
        ys.append(labels)
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def _make_spec(fmt: _CifarFormat) -> DatasetSpec:
    name = fmt.info.name
    layout = (
        f"the python-pickle batches {', '.join(fmt.train_files + fmt.test_files)} "
        f"under DATA_DIR/{fmt.folder}"
    )

    def describe() -> DatasetInfo:
        return fmt.info

    def load(data_dir: Path, download: bool = False) -> Dataset:
        root = data_dir / fmt.folder
        files = [root / f for f in fmt.train_files + fmt.test_files]

        def missing() -> Path | None:
            return next((p for p in files if not p.is_file()), None)

        def fetch() -> None:
            import torchvision.datasets as tvd
            from torchvision.datasets.utils import download_and_extract_archive

            cls = getattr(tvd, fmt.torchvision_class)
            download_and_extract_archive(
                cls.url, str(data_dir), filename=cls.filename, md5=cls.tgz_md5, remove_finished=True
            )

        ensure_present(name, missing, layout, download, fetch)
        train_x, train_y = _read_batches(files[: len(fmt.train_files)], fmt.label_key)
        test_x, test_y = _read_batches(files[len(fmt.train_files) :], fmt.label_key)
        for y, split in ((train_y, "train"), (test_y, "test")):
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= fmt.info.num_classes):
                raise DataError(f"{name}: {split} labels outside 0..{fmt.info.num_classes - 1}")
        info = dataclasses.replace(fmt.info, num_train=len(train_y), num_test=len(test_y))
        return Dataset(info, train_x, train_y, test_x, test_y)

    return DatasetSpec(describe=describe, loader=load)


CIFAR10 = _CifarFormat(
    info=DatasetInfo(
        name="cifar10",
        task=CLASSIFICATION,
        num_classes=10,
        input_shape=(3, 32, 32),
        num_train=50000,
        num_test=10000,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        augment="crop_flip",
    ),
    folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    label_key=b"labels",
    torchvision_class="CIFAR10",
)

CIFAR100 = _CifarFormat(
    info=DatasetInfo(
        name="cifar100",
        task=CLASSIFICATION,
        num_classes=100,
        input_shape=(3, 32, 32),
        num_train=50000,
        num_test=10000,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        augment="crop_flip",
    ),
    folder="cifar-100-python",
    train_files=("train",),
    test_files=("test",),
    label_key=b"fine_labels",
    torchvision_class="CIFAR100",
)

for _fmt in (CIFAR10, CIFAR100):
    DATASETS.register(_fmt.info.name)(_make_spec(_fmt))
