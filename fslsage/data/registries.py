"""The dataset and partition registries, in their own module so that the dataset modules can
register themselves while `fslsage.data` is still importing them (no circular import)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fslsage.data.base import DatasetSpec
from fslsage.registry import Registry

# fn(labels, num_clients, *, alpha, shards_per_client, seed) -> one index array per client
PartitionFn = Callable[..., list[np.ndarray]]

DATASETS: Registry[DatasetSpec] = Registry[DatasetSpec]("dataset")
PARTITIONS: Registry[PartitionFn] = Registry[PartitionFn]("partition")
