"""CINIC-10 from its image-folder layout: DATA_DIR/cinic-10/{train,test}/<class>/*.png."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fslsage.data.base import CLASSIFICATION, DataError, Dataset, DatasetInfo, DatasetSpec
from fslsage.data.files import ensure_present
from fslsage.data.registries import DATASETS

CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)  # the CIFAR-10 names, sorted: the label of a class is its position here

INFO = DatasetInfo(
    name="cinic10",
    task=CLASSIFICATION,
    num_classes=10,
    input_shape=(3, 32, 32),
    num_train=90000,
    num_test=90000,
    mean=(0.47889522, 0.47227842, 0.43047404),
    std=(0.24205776, 0.23828046, 0.25874835),
    augment="crop_flip",
)
LAYOUT = (
    "the CINIC-10 image folders DATA_DIR/cinic-10/{train,test}/<class>/*.png with classes "
    + ", ".join(CLASSES)
)


def _read_png(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            # CINIC's ImageNet part holds some greyscale images: convert everything to RGB
            arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"cinic10: unreadable image {path}: {exc}") from exc
    if arr.shape != (32, 32, 3):
        raise DataError(f"cinic10: image {path} is {arr.shape[1]}x{arr.shape[0]}, not 32x32")
    return arr


def _read_split(split_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    paths: list[Path] = []
    labels: list[int] = []
    for label, cls in enumerate(CLASSES):
        files = sorted((split_dir / cls).glob("*.png"))
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise DataError(f"cinic10: no *.png files under {split_dir}/<class>/; expected {LAYOUT}")
    # PNG decoding releases the GIL, so threads give a real speed-up on 180k small files
    with ThreadPoolExecutor(max_workers=8) as pool:
        images = list(pool.map(_read_png, paths))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(labels, dtype=torch.int64)


def describe() -> DatasetInfo:
    return INFO


def load(data_dir: Path, download: bool = False) -> Dataset:
    root = data_dir / "cinic-10"
    dirs = [root / split / cls for split in ("train", "test") for cls in CLASSES]

    def missing() -> Path | None:
        return next((d for d in dirs if not d.is_dir()), None)

    ensure_present("cinic10", missing, LAYOUT, download)
    train_x, train_y = _read_split(root / "train")
    test_x, test_y = _read_split(root / "test")
    info = dataclasses.replace(INFO, num_train=len(train_y), num_test=len(test_y))
    return Dataset(info, train_x, train_y, test_x, test_y)


DATASETS.register("cinic10")(DatasetSpec(describe=describe, loader=load))
