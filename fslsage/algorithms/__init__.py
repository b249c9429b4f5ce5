"""Registered federated split learning algorithms, one file each."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fslsage.registry import Registry

if TYPE_CHECKING:
    from fslsage.algorithms.base import Algorithm
    from fslsage.config import Config
    from fslsage.data.base import DatasetInfo

ALGORITHMS: Registry = Registry("algorithm")


def build_algorithm(cfg: Config, info: DatasetInfo) -> Algorithm:
    """The algorithm with its global initial model; seeded so every runtime starts identically
    (on the meta device too: the dry-run and the simulated clock build it there)."""
    import torch

    from fslsage.models import build_model
    from fslsage.precision import apply_memory_format

    torch.manual_seed(cfg.seed)
    split = build_model(cfg.model, info, **cfg.model_args)
    apply_memory_format(split, cfg)
    return ALGORITHMS.get(cfg.algorithm)(cfg, split)


# Importing registers them.
from fslsage.algorithms import (  # noqa: E402, F401
    cse_fsl,
    fedavg,
    fsl_sage,
    gas,
    sl,
    splitfed_v1,
    splitfed_v2,
)
