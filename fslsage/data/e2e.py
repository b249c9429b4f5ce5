"""E2E NLG (meaning representation -> restaurant description) as causal language modelling.

A sample is the text `mr || ref<eos>`, tokenised, cut/padded to `seq_len`; the loss is only on
the continuation (the reference text and its end-of-text), not on the prompt or the padding.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from fslsage.data.base import LANGUAGE_MODELING, DataError, Dataset, DatasetInfo, DatasetSpec
from fslsage.data.files import ensure_present
from fslsage.data.registries import DATASETS

IGNORE = -100  # label value that cross-entropy skips
NUM_TRAIN, NUM_TEST = 42061, 4693  # the standard E2E train/test sizes
GPT2_VOCAB = 50257
SEPARATOR = " ||"  # the prompt ends here; the continuation starts with the space before the ref
FOLDER = "e2e"
LAYOUT = (
    "DATA_DIR/e2e/trainset.csv and testset.csv (columns mr, ref; testset_w_refs.csv also "
    "accepted) or DATA_DIR/e2e/train.jsonl and test.jsonl (objects with keys mr, ref)"
)
CANDIDATES = {
    "train": ("trainset.csv", "train.jsonl"),
    "test": ("testset.csv", "testset_w_refs.csv", "test.jsonl"),
}


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, 256 = end-of-text: no files, no vocabulary to ship."""

    vocab_size = 257
    eos_id = 256

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A GPT-2 (BPE) tokenizer from a local directory, via transformers, never the network."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as exc:
            raise DataError(f"e2e: cannot load the tokenizer from {path}: {exc}") from exc
        if self.tok.eos_token_id is None:
            raise DataError(f"e2e: the tokenizer in {path} has no end-of-text token")
        self.vocab_size = len(self.tok)
        self.eos_id = int(self.tok.eos_token_id)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.tok(texts, add_special_tokens=False)["input_ids"]


def make_tokenizer(tokenizer: str) -> Tokenizer:
    """ "bytes" or a local directory holding a GPT-2 tokenizer."""
    if tokenizer == "bytes":
        return ByteTokenizer()
    return HFTokenizer(str(Path(tokenizer).expanduser()))


def describe(seq_len: int = 64, tokenizer: str = "bytes") -> DatasetInfo:
    """Static facts. The vocabulary of a tokenizer directory is read from it when it exists;
    a GPT-2 vocabulary is assumed otherwise so that --dry-run works without any files."""
    if seq_len < 2:
        raise ValueError(f"e2e: seq_len must be >= 2, got {seq_len}")
    if tokenizer == "bytes":
        vocab = ByteTokenizer.vocab_size
    elif Path(tokenizer).expanduser().is_dir():
        vocab = HFTokenizer(str(Path(tokenizer).expanduser())).vocab_size
    else:
        vocab = GPT2_VOCAB
    return DatasetInfo(
        name="e2e",
        task=LANGUAGE_MODELING,
        num_classes=vocab,
        input_shape=(seq_len,),
        num_train=NUM_TRAIN,
        num_test=NUM_TEST,
    )


def _read_csv(path: Path) -> list[tuple[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"mr", "ref"} <= set(reader.fieldnames):
                raise DataError(
                    f"e2e: {path} has columns {reader.fieldnames}; expected a header with mr, ref"
                )
            return [(row["mr"], row["ref"]) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"e2e: cannot read {path}: {exc}") from exc


def _read_jsonl(path: Path) -> list[tuple[str, str]]:
    pairs = []
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                obj = json.loads(line)
                if not isinstance(obj, dict) or "mr" not in obj or "ref" not in obj:
                    raise DataError(f"e2e: {path}:{lineno} is not an object with keys mr, ref")
                pairs.append((str(obj["mr"]), str(obj["ref"])))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"e2e: cannot read {path}: {exc}") from exc
    return pairs


READERS: dict[str, Callable[[Path], list[tuple[str, str]]]] = {
    ".csv": _read_csv,
    ".jsonl": _read_jsonl,
}


def encode_pairs(
    pairs: list[tuple[str, str]], tok: Tokenizer, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, seq_len) inputs and next-token labels; labels are IGNORE on prompt and padding.

    The prompt is `mr ||`, the continuation ` ref<eos>`: the space goes with the continuation
    because BPE tokenizers attach a word's leading space to the word. We build seq_len + 1
    tokens so that every input position has a next token: x = seq[:-1], y = seq[1:].
    """
    prompts = tok.encode_batch([mr + SEPARATOR for mr, _ in pairs])
    conts = tok.encode_batch([" " + ref for _, ref in pairs])
    seq = np.full((len(pairs), seq_len + 1), tok.eos_id, dtype=np.int64)
    labels = np.full((len(pairs), seq_len + 1), IGNORE, dtype=np.int64)
    for i, (p, c) in enumerate(zip(prompts, conts, strict=True)):
        ids = (p + c + [tok.eos_id])[: seq_len + 1]
        seq[i, : len(ids)] = ids
        labels[i, len(p) : len(ids)] = ids[len(p) :]
    return torch.from_numpy(seq[:, :-1].copy()), torch.from_numpy(labels[:, 1:].copy())


def _find(root: Path, split: str) -> Path | None:
    return next((root / n for n in CANDIDATES[split] if (root / n).is_file()), None)


def load(
    data_dir: Path, download: bool = False, seq_len: int = 64, tokenizer: str = "bytes"
) -> Dataset:
    info = describe(seq_len, tokenizer)
    root = data_dir / FOLDER

    def missing() -> Path | None:
        for split in CANDIDATES:
            if _find(root, split) is None:
                return root / CANDIDATES[split][0]
        return None

    ensure_present("e2e", missing, LAYOUT, download)
    tok = make_tokenizer(tokenizer)
    tensors: list[torch.Tensor] = []
    for split in CANDIDATES:
        path = _find(root, split)
        if path is None:  # only if it vanished after ensure_present looked
            raise DataError(f"e2e: missing {root / CANDIDATES[split][0]}; expected {LAYOUT}")
        pairs = READERS[path.suffix](path)
        if not pairs:
            raise DataError(f"e2e: {path} holds no samples")
        tensors += encode_pairs(pairs, tok, seq_len)
    info = dataclasses.replace(info, num_train=len(tensors[0]), num_test=len(tensors[2]))
    return Dataset(info, *tensors, extras={"eos_id": tok.eos_id, "tokenizer": tokenizer})


DATASETS.register("e2e")(DatasetSpec(describe=describe, loader=load))
