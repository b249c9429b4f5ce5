"""Synthetic data shaped like a named dataset: random tensors, no files, never a download.

`dataset: synthetic` with `dataset_args: {like: cifar10}` describes itself as `cifar10` does
(task, input shape, classes, normalisation, augmentation, sizes) and loads random tensors of
that shape, so benchmarks and GPU checks run a paper's shapes (and plan its exact ledger)
without its data. Images are uint8 (N, C, H, W) and labels int64, as the real loaders give
them; labels are balanced over the classes (every class appears once there are at least as
many samples as classes) and shuffled. For a language-modelling `like` (e2e) samples are
random token ids of the sequence length laid out as e2e lays out a sample: a prompt, a
continuation ending in the end-of-text token, end-of-text padding, labels IGNORE on the prompt
and the padding. The inputs carry no signal about the labels: accuracy stays at chance.

Everything comes from one `torch.Generator` seeded with `seed`, so the same arguments give the
same tensors on every machine. `num_train` / `num_test` shrink (or grow) the splits; any other
dataset_arg goes to the `like` dataset (e.g. `seq_len`, `tokenizer` of e2e).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from fslsage.data.base import CLASSIFICATION, Dataset, DatasetInfo, DatasetSpec
from fslsage.data.e2e import IGNORE
from fslsage.data.registries import DATASETS
from fslsage.registry import UnknownNameError

NAME = "synthetic"
OWN_ARGS = ("like", "seed", "num_train", "num_test")
MAX_SEED = 2**63 - 1  # what torch.Generator.manual_seed takes


def _like_info(like: str, like_args: dict) -> DatasetInfo:
    """The `like` dataset's description, its arguments checked against its own options."""
    from fslsage.data import describe_dataset  # the package imports this module first

    if like == NAME:
        raise ValueError(f"dataset {NAME!r}: like must name a real dataset, not {NAME!r}")
    if like not in DATASETS:  # a ValueError, as for every bad dataset_arg value
        real = [n for n in DATASETS.names() if n != NAME]
        raise ValueError(f"dataset {NAME!r}: like: {UnknownNameError('dataset', like, real)}")
    try:
        return describe_dataset(like, **like_args)
    except TypeError as err:
        raise TypeError(
            f"dataset {NAME!r}: its own options are {', '.join(OWN_ARGS)}, the rest go to "
            f"like={like!r}: {err}"
        ) from None


def _size(key: str, value: int | None, default: int) -> int:
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"dataset {NAME!r}: {key} must be an int >= 1, got {value!r}")
    return value


def describe(
    like: str = "cifar10",
    seed: int = 0,
    num_train: int | None = None,
    num_test: int | None = None,
    **like_args,
) -> DatasetInfo:
    """The `like` dataset's description under the name `synthetic(<like>)`, with the sizes
    overridden where given. Reads no file (unless `like_args` point the like dataset at one,
    e.g. an e2e tokenizer directory, whose vocabulary size it reads)."""
    if not isinstance(like, str):
        raise ValueError(f"dataset {NAME!r}: like must be a dataset name, got {like!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"dataset {NAME!r}: seed must be an int in [0, 2**63 - 1], got {seed!r}")
    info = _like_info(like, like_args)
    return dataclasses.replace(
        info,
        name=f"{NAME}({like})",
        num_train=_size("num_train", num_train, info.num_train),
        num_test=_size("num_test", num_test, info.num_test),
    )


def _images(n: int, info: DatasetInfo, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, 256, (n, *info.input_shape), generator=g, dtype=torch.uint8)
    balanced = torch.arange(n, dtype=torch.int64) % info.num_classes
    return x, balanced[torch.randperm(n, generator=g)]


def _tokens(n: int, info: DatasetInfo, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """e2e's layout (`fslsage.data.e2e.encode_pairs`) with random ids: a sequence of T + 1
    tokens — a prompt of p >= 1 tokens, a continuation ending in end-of-text at position
    length - 1, end-of-text padding after it; x = seq[:-1], y = labels[1:] with labels IGNORE
    on the prompt and the padding, so every sample has at least one labelled target."""
    (t,) = info.input_shape
    eos = info.num_classes - 1  # GPT-2's <|endoftext|> (50256) and the byte tokenizer's 256
    seq = torch.randint(0, max(eos, 1), (n, t + 1), generator=g, dtype=torch.int64)
    prompt = torch.randint(1, max(t // 2, 1) + 1, (n, 1), generator=g)
    # total length in prompt + 1 .. t + 1: uniform draws scaled into each sample's own range
    frac = torch.rand((n, 1), generator=g, dtype=torch.float64)
    length = prompt + 1 + (frac * (t + 1 - prompt)).long().clamp(max=t - prompt)
    pos = torch.arange(t + 1)
    seq = torch.where(pos >= length - 1, torch.full_like(seq, eos), seq)
    labels = torch.where((pos >= prompt) & (pos < length), seq, torch.full_like(seq, IGNORE))
    return seq[:, :-1].contiguous(), labels[:, 1:].contiguous()


def load(
    data_dir: Path | None = None,
    download: bool = False,
    like: str = "cifar10",
    seed: int = 0,
    num_train: int | None = None,
    num_test: int | None = None,
    **like_args,
) -> Dataset:
    """Random tensors as `describe` describes them; `data_dir` and `download` are accepted for
    a uniform interface and ignored: nothing is read, written or fetched."""
    info = describe(like, seed, num_train, num_test, **like_args)
    make = _images if info.task == CLASSIFICATION else _tokens
    g = torch.Generator().manual_seed(seed)
    train_x, train_y = make(info.num_train, info, g)
    test_x, test_y = make(info.num_test, info, g)
    extras: dict = {"like": like, "seed": seed}
    if info.task != CLASSIFICATION:
        extras["eos_id"] = info.num_classes - 1
    return Dataset(info, train_x, train_y, test_x, test_y, extras=extras)


DATASETS.register(NAME)(DatasetSpec(describe=describe, loader=load))
