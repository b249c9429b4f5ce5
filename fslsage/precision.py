"""How the maths runs on an accelerator, apart from what it computes (issue 19.2): bf16 autocast
(`amp`) and the channels-last memory format (`channels_last`). Neither changes what travels:
smashed data goes up as float32, exactly as the dry-run ledger plans it."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from fslsage.config import Config
    from fslsage.models.base import SplitModel

REDUCED = (torch.bfloat16, torch.float16)


def autocast(cfg: Config, device: torch.device | str) -> AbstractContextManager:
    """Client, aux and server compute (and evaluation) under bf16 autocast with `amp: bf16`:
    matmuls and convolutions in bf16, losses, norms and optimizer steps in float32. Without
    autocast's weight cache: a context spans many optimizer steps here (a client's round, the
    S-Server's requests inside it in-process), and cached bf16 weights would go stale after the
    first (the server then trains on its first weights)."""
    if cfg.amp == "off":
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, cache_enabled=False)


def full_precision(device: torch.device | str) -> AbstractContextManager:
    """No autocast inside, even within `autocast`: statistics that bf16 matmuls would spoil
    (gas's covariances and their Cholesky factors)."""
    return torch.autocast(device_type=torch.device(device).type, enabled=False)


def as_sent(z: Tensor) -> Tensor:
    """Smashed data as it travels: float32 whatever autocast computed it in, so the bytes are
    the dry-run's."""
    return z.float() if z.dtype in REDUCED else z


def apply_memory_format(split: SplitModel, cfg: Config) -> None:
    """With `channels_last`, every 4-D weight of the global initial model in channels-last
    layout: the copies clients and servers make of it keep that layout, and convolutions with
    a channels-last weight run in it (tensor cores on a GPU)."""
    if cfg.channels_last:
        for module in (split.client, split.server, split.aux):
            module.to(memory_format=torch.channels_last)
