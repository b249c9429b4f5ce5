"""What every split model provides: a client part, a server part and an auxiliary head."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from fslsage.data.base import DatasetInfo  # noqa: F401  (builders take one; kept for importers)
from fslsage.registry import Registry


@dataclass
class SplitModel:
    """client(x) -> z (smashed data); server(z) -> logits; aux(z) -> logits (a client-side
    stand-in for the server). Logits are (B, classes) or (B, T, vocab) for language models."""

    client: nn.Module
    server: nn.Module
    aux: nn.Module


# builder(info, **model_args) -> SplitModel; raises ValueError for an incompatible dataset.
ModelBuilder = Callable[..., SplitModel]


# Name → builder. Defined here rather than in __init__ so that the model modules can register
# themselves without an import cycle; `fslsage.models.MODELS` re-exports it.
MODELS: Registry[ModelBuilder] = Registry("model")
