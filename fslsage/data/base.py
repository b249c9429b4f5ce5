"""What every dataset provides: metadata (no loading needed) and tensors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

CLASSIFICATION = "classification"
LANGUAGE_MODELING = "language_modeling"


class DataError(RuntimeError):
    """A dataset file is missing or corrupt; the message names the path and the expected layout."""


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset, known without reading any file (used by --dry-run)."""

    name: str
    task: str  # CLASSIFICATION | LANGUAGE_MODELING
    num_classes: int  # classes, or vocabulary size for language modelling
    input_shape: tuple[int, ...]  # one sample: (C, H, W) for images, (T,) for token sequences
    num_train: int
    num_test: int
    # images are stored as uint8 and normalised on the device: x/255 then (x - mean) / std
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    augment: str = "none"  # "none" | "crop_flip" (random 4-pixel-padded crop + horizontal flip)


@dataclass
class Dataset:
    """Loaded tensors. Images: uint8 (N, C, H, W); tokens: int64 (N, T); label -100 = ignore."""

    info: DatasetInfo
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    extras: dict = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetSpec:
    """A registry entry.

    `describe(**dataset_args)` returns the metadata without touching any file (dry-run, validation);
    `load(data_dir, download, **dataset_args)` reads the real on-disk format.
    """

    describe: Callable[..., DatasetInfo]
    loader: Callable[..., Dataset]

    def load(self, data_dir: str | Path, download: bool = False, **dataset_args) -> Dataset:
        return self.loader(Path(data_dir).expanduser(), download, **dataset_args)
