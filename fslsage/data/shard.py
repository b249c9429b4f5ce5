"""A client's data kept as tensors on the client's device, batched, normalised and augmented
there: the training hot path has no per-sample Python and no host-device copies."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import torch

from fslsage.data.base import DatasetInfo

PAD = 4  # pixels of zero padding around the image before the random crop


def num_batches(n: int, batch_size: int) -> int:
    """Batches per epoch over n samples; the last partial batch is kept."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return math.ceil(n / batch_size)


def local_batch_sizes(num_samples: int, batch_size: int, epochs: int) -> list[int]:
    """Batch size of every local iteration k of a round (the last batch of an epoch is partial),
    as `ClientShard.batches` yields them."""
    full, rest = divmod(num_samples, batch_size)
    return ([batch_size] * full + ([rest] if rest else [])) * epochs


def _is_image(x: torch.Tensor, info: DatasetInfo) -> bool:
    return len(info.mean) > 0 and x.dim() == 4


def _stats(info: DatasetInfo, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(info.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(info.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return mean, std


def prepare_inputs(x: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """Model inputs without augmentation (evaluation): uint8 images -> (x/255 - mean) / std as
    float32 on x's device; token ids pass through unchanged."""
    if not _is_image(x, info):
        return x
    mean, std = _stats(info, x.device)
    return (x.float() / 255.0 - mean) / std


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = PAD) -> torch.Tensor:
    """Per sample: zero-pad by `pad`, take a random HxW crop and flip it horizontally with
    probability 1/2, for the whole batch at once with one advanced-indexing gather.

    Random numbers come from `generator` (on its device) and are then moved to x's device.
    """
    b, c, h, w = x.shape
    padded = x.new_zeros(b, c, h + 2 * pad, w + 2 * pad)
    padded[:, :, pad : pad + h, pad : pad + w] = x
    gdev = generator.device
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=gdev).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=gdev).to(x.device)
    flip = (torch.rand(b, generator=generator, device=gdev) < 0.5).to(x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = dx[:, None] + torch.arange(w, device=x.device)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # flipping a crop = reading it backwards
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


class ClientShard:
    """One client's samples, moved to `device` once at construction."""

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        info: DatasetInfo,
        device: str | torch.device = "cpu",
    ):
        if len(x) != len(y):
            raise ValueError(f"{len(x)} inputs but {len(y)} labels")
        self.device = torch.device(device)
        self.x = x.to(self.device)
        self.y = y.to(self.device)
        self.info = info
        self._image = _is_image(self.x, info)
        # kept on the device so that a batch needs no host-to-device copy of the statistics
        self._mean, self._std = _stats(info, self.device)

    def __len__(self) -> int:
        return len(self.y)

    def batches(
        self, batch_size: int, epochs: int, generator: torch.Generator, *, augment: bool = True
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(inputs, labels) minibatches, reshuffled every epoch with `generator`; the last
        partial batch is kept. Inputs are prepared (normalised, augmented when the dataset asks
        for "crop_flip" and `augment` is true). The first `epochs` epochs of a `BatchStream`."""
        stream = BatchStream(self, batch_size, generator, augment=augment)
        return itertools.islice(stream, epochs * stream.steps)

    def permutation(self, generator: torch.Generator) -> torch.Tensor:
        """An epoch's sample order, drawn from `generator`."""
        n = len(self)
        return torch.randperm(n, generator=generator, device=generator.device).to(self.device)

    def batch(
        self, idx: torch.Tensor, generator: torch.Generator, augment: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The samples `idx`, prepared as `batches` yields them."""
        xb = self.x[idx]
        if augment and self._image and self.info.augment == "crop_flip":
            xb = random_crop_flip(xb, generator)
        if self._image:
            xb = (xb.float() / 255.0 - self._mean) / self._std
        return xb, self.y[idx]


class BatchStream:
    """`ClientShard.batches` without end (a GAS client steps until its schedule stops it), whose
    position is plain state — the epoch's permutation and the next step — so a checkpoint can
    hold it and a restored client goes on with the batch it would have drawn (a generator
    cannot be pickled). The random numbers come from `generator`, the client's own."""

    def __init__(
        self, shard: ClientShard, batch_size: int, generator: torch.Generator, augment: bool = True
    ):
        self.shard, self.batch_size, self.generator = shard, batch_size, generator
        self.augment = augment
        self.steps = num_batches(len(shard), batch_size)
        self.perm: torch.Tensor | None = None  # None: the next batch opens an epoch
        self.step = 0

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.perm is None or self.step == self.steps:
            self.perm, self.step = self.shard.permutation(self.generator), 0
        s, self.step = self.step, self.step + 1
        idx = self.perm[s * self.batch_size : (s + 1) * self.batch_size]
        return self.shard.batch(idx, self.generator, self.augment)

    def position(self) -> tuple[torch.Tensor | None, int]:
        return (None if self.perm is None else self.perm.cpu()), self.step

    def seek(self, position: tuple[torch.Tensor | None, int]) -> None:
        perm, self.step = position
        self.perm = None if perm is None else perm.to(self.shard.device)
