"""scikit-learn's handwritten digits: the embedded default dataset (ships with sklearn, no files).

8x8 greyscale images with values 0..16, rescaled to uint8 0..255 so that they are normalised
like every other image dataset. The train/test split is fixed (seed 0, stratified 80/20) and does
not depend on the experiment seed, so test accuracy is comparable across runs and seeds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fslsage.data.base import CLASSIFICATION, Dataset, DatasetInfo, DatasetSpec
from fslsage.data.registries import DATASETS

SPLIT_SEED = 0
TEST_FRACTION = 0.2

INFO = DatasetInfo(
    name="digits",
    task=CLASSIFICATION,
    num_classes=10,
    input_shape=(1, 8, 8),
    num_train=1437,
    num_test=360,
    # of x/255 over the train split (computed once; tests/test_data.py re-checks them)
    mean=(0.30543369,),
    std=(0.37595716,),
    augment="none",
)


def describe() -> DatasetInfo:
    return INFO


def load(data_dir: Path | None = None, download: bool = False) -> Dataset:
    """`data_dir` and `download` are accepted for a uniform interface and ignored."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (N, 1, 8, 8)
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)),
        test_size=TEST_FRACTION,
        stratify=labels,
        random_state=SPLIT_SEED,
    )
    return Dataset(
        INFO,
        torch.from_numpy(images[train_idx]),
        torch.from_numpy(labels[train_idx]),
        torch.from_numpy(images[test_idx]),
        torch.from_numpy(labels[test_idx]),
    )


DATASETS.register("digits")(DatasetSpec(describe=describe, loader=load))
