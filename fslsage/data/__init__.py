"""Datasets, client partitions and on-device client shards.

Importing this package registers every dataset (`DATASETS`) and partition (`PARTITIONS`).
"""

from __future__ import annotations

import inspect
from pathlib import Path

from fslsage.data import cifar, cinic, digits, e2e, fmnist, synthetic  # noqa: F401  (they register)
from fslsage.data.base import (
    CLASSIFICATION,
    LANGUAGE_MODELING,
    DataError,
    Dataset,
    DatasetInfo,
    DatasetSpec,
)
from fslsage.data.partition import client_sizes, label_histogram, partition
from fslsage.data.registries import DATASETS, PARTITIONS
from fslsage.data.shard import (
    BatchStream,
    ClientShard,
    local_batch_sizes,
    num_batches,
    prepare_inputs,
    random_crop_flip,
)

__all__ = [
    "CLASSIFICATION",
    "DATASETS",
    "LANGUAGE_MODELING",
    "PARTITIONS",
    "BatchStream",
    "ClientShard",
    "client_sizes",
    "DataError",
    "Dataset",
    "DatasetInfo",
    "DatasetSpec",
    "describe_dataset",
    "label_histogram",
    "load_dataset",
    "local_batch_sizes",
    "num_batches",
    "partition",
    "prepare_inputs",
    "random_crop_flip",
]


def _check_args(name: str, fn, dataset_args: dict) -> None:
    """Name the dataset and its accepted options instead of a bare TypeError from deep inside.
    A dataset that takes **kwargs (synthetic: they go to its `like` dataset) checks them itself."""
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(dataset_args) - set(params))
    if unknown:
        allowed = [p for p in params if p not in ("data_dir", "download")]
        raise TypeError(
            f"dataset {name!r} does not take {', '.join(unknown)}; "
            f"its options: {', '.join(allowed) or 'none'}"
        )


def describe_dataset(name: str, **dataset_args) -> DatasetInfo:
    """Static metadata of a registered dataset; reads no data files."""
    spec = DATASETS.get(name)
    _check_args(name, spec.describe, dataset_args)
    return spec.describe(**dataset_args)


def load_dataset(
    name: str, data_dir: str | Path, download: bool = False, **dataset_args
) -> Dataset:
    """Load a registered dataset from `data_dir` (a DataError names any missing/corrupt file)."""
    spec = DATASETS.get(name)
    _check_args(name, spec.loader, dataset_args)
    return spec.load(data_dir, download, **dataset_args)
