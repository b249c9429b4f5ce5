"""Data layer: every on-disk format written tiny here and read back, partitions, client shards."""

from __future__ import annotations

import gzip
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fslsage.data as data
from fslsage.data import (
    DATASETS,
    LANGUAGE_MODELING,
    PARTITIONS,
    BatchStream,
    ClientShard,
    DataError,
    DatasetInfo,
    describe_dataset,
    label_histogram,
    load_dataset,
    num_batches,
    partition,
    prepare_inputs,
)
from fslsage.data.cinic import CLASSES
from fslsage.data.e2e import IGNORE
from fslsage.registry import UnknownNameError

RNG = np.random.default_rng(1234)


# ----------------------------------------------------------------------------- format writers
def write_cifar_batch(path: Path, n: int, label_key: bytes, num_classes: int) -> dict:
    batch = {
        b"batch_label": b"test batch",
        b"data": RNG.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        label_key: RNG.integers(0, num_classes, size=n).tolist(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(batch, protocol=2))
    return batch


def write_cifar10(root: Path) -> list[dict]:
    d = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    return [write_cifar_batch(d / n, 4 if n != "test_batch" else 3, b"labels", 10) for n in names]


def write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + np.array(arr.shape, dtype=">i4").tobytes()
    raw = header + arr.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)


def write_fmnist(root: Path, gz: bool) -> dict[str, np.ndarray]:
    arrays = {
        "train-images-idx3-ubyte": RNG.integers(0, 256, (5, 28, 28)),
        "train-labels-idx1-ubyte": RNG.integers(0, 10, 5),
        "t10k-images-idx3-ubyte": RNG.integers(0, 256, (2, 28, 28)),
        "t10k-labels-idx1-ubyte": RNG.integers(0, 10, 2),
    }
    for name, arr in arrays.items():
        write_idx(root / "fashion-mnist" / (name + (".gz" if gz else "")), arr)
    return arrays


# ----------------------------------------------------------------------------- datasets
def test_registry_lists_every_dataset_and_partition():
    assert DATASETS.names() == [
        "cifar10", "cifar100", "cinic10", "digits", "e2e", "fmnist", "synthetic",
    ]  # fmt: skip
    assert PARTITIONS.names() == ["dirichlet", "dirichlet_by_class", "iid", "shards"]
    with pytest.raises(UnknownNameError, match="did you mean 'cifar10'"):
        describe_dataset("cifar-10")
    with pytest.raises(TypeError, match="seq_len"):
        describe_dataset("cifar10", seq_len=3)


def test_describe_needs_no_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing here
    infos = {name: describe_dataset(name) for name in DATASETS}
    assert infos["cifar10"].num_train == 50000 and infos["cifar10"].num_test == 10000
    assert infos["cifar100"].num_classes == 100 and infos["cifar100"].augment == "crop_flip"
    assert (infos["cinic10"].num_train, infos["cinic10"].num_test) == (90000, 90000)
    assert infos["fmnist"].input_shape == (1, 28, 28) and infos["fmnist"].num_train == 60000
    e2e = describe_dataset("e2e", seq_len=32)
    assert (e2e.task, e2e.num_classes, e2e.input_shape) == (LANGUAGE_MODELING, 257, (32,))
    assert (e2e.num_train, e2e.num_test) == (42061, 4693)


def test_digits_matches_its_description_and_is_fixed():
    ds = load_dataset("digits", "/nonexistent")
    info = describe_dataset("digits")
    assert ds.info == info
    assert (info.num_train, info.num_test) == (1437, 360)
    assert ds.train_x.shape == (1437, 1, 8, 8) and ds.train_x.dtype == torch.uint8
    assert ds.test_x.shape == (360, 1, 8, 8) and ds.train_y.dtype == torch.int64
    assert int(ds.train_x.max()) == 255 and set(ds.train_y.tolist()) == set(range(10))
    x = ds.train_x.double() / 255
    assert x.mean().item() == pytest.approx(info.mean[0], abs=1e-6)
    assert x.std(unbiased=False).item() == pytest.approx(info.std[0], abs=1e-6)
    # the split does not depend on any global seed
    torch.manual_seed(99)
    np.random.seed(99)
    assert torch.equal(load_dataset("digits", ".").test_y, ds.test_y)


def test_cifar10_roundtrip(tmp_path):
    batches = write_cifar10(tmp_path)
    ds = load_dataset("cifar10", tmp_path)
    assert ds.train_x.shape == (20, 3, 32, 32) and ds.test_x.shape == (3, 3, 32, 32)
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64
    want_x = np.concatenate([b[b"data"] for b in batches[:5]]).reshape(20, 3, 32, 32)
    assert np.array_equal(ds.train_x.numpy(), want_x)
    # channel-major rows: pixel (c, h, w) of sample 6 is byte c*1024 + h*32 + w of its row
    assert ds.train_x[6, 2, 5, 7] == batches[1][b"data"][2, 2 * 1024 + 5 * 32 + 7]
    assert ds.train_y.tolist() == sum((b[b"labels"] for b in batches[:5]), [])
    assert ds.test_y.tolist() == batches[5][b"labels"]
    assert (ds.info.num_train, ds.info.num_test, ds.info.augment) == (20, 3, "crop_flip")


def test_cifar100_uses_fine_labels(tmp_path):
    d = tmp_path / "cifar-100-python"
    train = write_cifar_batch(d / "train", 6, b"fine_labels", 100)
    test = write_cifar_batch(d / "test", 2, b"fine_labels", 100)
    for path in (d / "train", d / "test"):  # add the coarse labels the real files carry
        batch = pickle.loads(path.read_bytes())
        batch[b"coarse_labels"] = [0] * len(batch[b"fine_labels"])
        path.write_bytes(pickle.dumps(batch))
    ds = load_dataset("cifar100", tmp_path)
    assert ds.train_y.tolist() == train[b"fine_labels"]
    assert ds.test_y.tolist() == test[b"fine_labels"]
    assert np.array_equal(ds.test_x.numpy().reshape(2, -1), test[b"data"])


def test_cinic10_image_folders(tmp_path):
    want: dict[str, list[tuple[np.ndarray, int]]] = {"train": [], "test": []}
    for split in ("train", "test"):
        for label, cls in enumerate(CLASSES):
            folder = tmp_path / "cinic-10" / split / cls
            folder.mkdir(parents=True)
            for j in range(2 if label < 2 else 1):
                img = RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(img).save(folder / f"img{j}.png")
                want[split].append((img, label))
    grey = RNG.integers(0, 256, (32, 32), dtype=np.uint8)  # CINIC has some greyscale images
    Image.fromarray(grey).save(tmp_path / "cinic-10" / "test" / "truck" / "zgrey.png")
    ds = load_dataset("cinic10", tmp_path)
    assert ds.train_x.shape == (12, 3, 32, 32) and ds.test_x.shape == (13, 3, 32, 32)
    assert ds.train_y.tolist() == [lbl for _, lbl in want["train"]]
    for i, (img, _) in enumerate(want["train"]):
        assert np.array_equal(ds.train_x[i].permute(1, 2, 0).numpy(), img)
    assert ds.test_y[-1] == 9 and all(
        torch.equal(ds.test_x[-1, c], torch.from_numpy(grey)) for c in range(3)
    )


@pytest.mark.parametrize("gz", [False, True])
def test_fmnist_idx_plain_and_gz(tmp_path, gz):
    arrays = write_fmnist(tmp_path, gz)
    ds = load_dataset("fmnist", tmp_path)
    assert ds.train_x.shape == (5, 1, 28, 28) and ds.train_x.dtype == torch.uint8
    assert np.array_equal(ds.train_x[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(ds.test_x[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    assert ds.train_y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert ds.test_y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()


E2E_ROWS = [
    ("name[The Eagle], food[Thai]", 'The Eagle serves Thai food, "cheap".'),
    ("name[Café Z]", "hi"),
    ("name[X]", "Y"),
]


def write_e2e_csv(root: Path) -> None:
    import csv

    (root / "e2e").mkdir(parents=True, exist_ok=True)
    for name, rows in (("trainset.csv", E2E_ROWS), ("testset.csv", E2E_ROWS[1:])):
        with (root / "e2e" / name).open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["mr", "ref"])
            writer.writerows(rows)


def check_lm_sample(x: torch.Tensor, y: torch.Tensor, mr: str, ref: str, eos: int) -> None:
    """Exact bytes-tokenizer layout: x = `mr || ref<eos>` padded with eos; y = next token on the
    continuation ` ref<eos>`, IGNORE elsewhere."""
    prompt = list((mr + " ||").encode())
    full = prompt + list((" " + ref).encode()) + [eos]
    seq_len = len(x)
    padded = (full + [eos] * (seq_len + 1))[: seq_len + 1]
    assert x.tolist() == padded[:seq_len]
    want_y = [
        tok if len(prompt) <= t + 1 < len(full) else IGNORE for t, tok in enumerate(padded[1:])
    ]
    assert y.tolist() == want_y


def test_e2e_csv_bytes_tokenizer(tmp_path):
    write_e2e_csv(tmp_path)
    ds = load_dataset("e2e", tmp_path, seq_len=80)
    assert ds.train_x.shape == (3, 80) and ds.train_x.dtype == torch.int64
    assert ds.test_x.shape == (2, 80) and ds.info.num_classes == 257
    for i, (mr, ref) in enumerate(E2E_ROWS):
        check_lm_sample(ds.train_x[i], ds.train_y[i], mr, ref, eos=256)
    check_lm_sample(ds.test_x[0], ds.test_y[0], *E2E_ROWS[1], eos=256)
    # x[t] predicts y[t] = x[t + 1] wherever a label is set
    mask = ds.train_y[:, :-1] != IGNORE
    assert torch.equal(ds.train_y[:, :-1][mask], ds.train_x[:, 1:][mask])
    # truncation: a short window keeps only the start; labels stay consistent
    short = load_dataset("e2e", tmp_path, seq_len=33)
    check_lm_sample(short.train_x[0], short.train_y[0], *E2E_ROWS[0], eos=256)


def test_e2e_jsonl(tmp_path):
    (tmp_path / "e2e").mkdir()
    for name, rows in (("train.jsonl", E2E_ROWS), ("test.jsonl", E2E_ROWS[:1])):
        lines = [json.dumps({"mr": mr, "ref": ref}) for mr, ref in rows]
        (tmp_path / "e2e" / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    ds = load_dataset("e2e", tmp_path, seq_len=16)
    assert ds.train_x.shape == (3, 16) and ds.test_x.shape == (1, 16)
    check_lm_sample(ds.train_x[2], ds.train_y[2], *E2E_ROWS[2], eos=256)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (for writing a tiny BPE vocabulary)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def test_e2e_with_a_local_gpt2_tokenizer(tmp_path):
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    vocab = {ch: i for i, ch in enumerate(_bytes_to_unicode().values())}
    merges = ["Ġ h", "Ġh i", "| |"]
    for m in merges:
        vocab[m.replace(" ", "")] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}
    config = {"tokenizer_class": "GPT2Tokenizer", "unk_token": "<|endoftext|>", **special}
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(config))
    write_e2e_csv(tmp_path)
    ds = load_dataset("e2e", tmp_path, seq_len=24, tokenizer=str(tok_dir))
    eos = vocab["<|endoftext|>"]
    assert (
        ds.info.num_classes
        == len(vocab)
        == describe_dataset("e2e", tokenizer=str(tok_dir)).num_classes
    )
    # test row 0 is ("name[Café Z]", "hi"): the merges make "||" and " hi" single tokens
    x, y = ds.test_x[0].tolist(), ds.test_y[0].tolist()
    b2u = _bytes_to_unicode()
    prompt = [vocab[b2u[b]] for b in "name[Café Z] ".encode()] + [vocab["||"]]
    n_prompt = len(prompt)
    assert x[:n_prompt] == prompt and len(x) == 24
    assert x[n_prompt] == vocab["Ġhi"] and x[n_prompt + 1] == eos
    assert y[: n_prompt - 1] == [IGNORE] * (n_prompt - 1)
    assert y[n_prompt - 1 : n_prompt + 1] == [vocab["Ġhi"], eos]
    assert set(y[n_prompt + 1 :]) <= {IGNORE}


# ----------------------------------------------------------------------------- errors
def test_missing_files_name_path_and_layout(tmp_path):
    cases = {
        "cifar10": "cifar-10-batches-py/data_batch_1",
        "cifar100": "cifar-100-python/train",
        "cinic10": "cinic-10/train/airplane",
        "fmnist": "fashion-mnist/train-images-idx3-ubyte",
        "e2e": "e2e/trainset.csv",
    }
    for name, rel in cases.items():
        with pytest.raises(DataError) as err:
            load_dataset(name, tmp_path)
        msg = str(err.value)
        assert str(tmp_path / rel) in msg and "expected" in msg, msg
        assert msg.count("\n") == 0


def test_missing_file_after_partial_layout(tmp_path):
    write_cifar10(tmp_path)
    os.remove(tmp_path / "cifar-10-batches-py" / "test_batch")
    with pytest.raises(DataError, match="test_batch"):
        load_dataset("cifar10", tmp_path)


def test_failed_download_is_one_clear_error(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tvu

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(tvu, "download_and_extract_archive", offline)
    monkeypatch.setattr(tvu, "download_url", offline)
    for name, rel in (("cifar10", "data_batch_1"), ("fmnist", "train-images-idx3-ubyte")):
        with pytest.raises(DataError, match="download failed") as err:
            load_dataset(name, tmp_path, download=True)
        assert rel in str(err.value) and "network is unreachable" in str(err.value)


def test_corrupt_files_name_the_path(tmp_path):
    # truncated pickle
    write_cifar10(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(DataError, match=str(bad)):
        load_dataset("cifar10", tmp_path)
    # a pickle that would run code is refused, not executed
    bad.write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(DataError, match="refusing"):
        load_dataset("cifar10", tmp_path)
    # wrong idx magic, in a plain and in a gzipped file
    write_fmnist(tmp_path, gz=False)
    lbl = tmp_path / "fashion-mnist" / "t10k-labels-idx1-ubyte"
    lbl.write_bytes(b"\x00\x00\x0d\x01" + lbl.read_bytes()[4:])
    with pytest.raises(DataError, match=f"magic in {lbl}"):
        load_dataset("fmnist", tmp_path)
    lbl.unlink()
    gz = lbl.with_name(lbl.name + ".gz")
    gz.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=str(gz)):
        load_dataset("fmnist", tmp_path)
    # unreadable png
    for split in ("train", "test"):
        for cls in CLASSES:
            (tmp_path / "cinic-10" / split / cls).mkdir(parents=True)
    png = tmp_path / "cinic-10" / "train" / "cat" / "broken.png"
    png.write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match=str(png)):
        load_dataset("cinic10", tmp_path)
    # csv without mr/ref columns
    (tmp_path / "e2e").mkdir()
    (tmp_path / "e2e" / "trainset.csv").write_text("meaning,text\na,b\n")
    (tmp_path / "e2e" / "testset.csv").write_text("mr,ref\na,b\n")
    with pytest.raises(DataError, match=str(tmp_path / "e2e" / "trainset.csv")):
        load_dataset("e2e", tmp_path)


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


# ----------------------------------------------------------------------------- partitions
@pytest.fixture(scope="module")
def digit_labels() -> np.ndarray:
    return load_dataset("digits", ".").train_y.numpy()


@pytest.mark.parametrize("name", ["iid", "dirichlet", "shards"])
def test_partitions_equal_disjoint_reproducible(name, digit_labels):
    kw = dict(alpha=0.5, shards_per_client=2)
    parts = partition(name, digit_labels, 10, seed=3, **kw)
    sizes = {len(p) for p in parts}
    assert len(parts) == 10 and len(sizes) == 1
    size = sizes.pop()
    assert size == (len(digit_labels) // 10 if name != "shards" else 2 * (len(digit_labels) // 20))
    flat = np.concatenate(parts)
    assert len(np.unique(flat)) == len(flat) and flat.min() >= 0 and flat.max() < len(digit_labels)
    assert all(p.dtype == np.int64 for p in parts)
    same = partition(name, digit_labels, 10, seed=3, **kw)
    other = partition(name, digit_labels, 10, seed=4, **kw)
    assert all(np.array_equal(a, b) for a, b in zip(parts, same, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def top_share(hist: np.ndarray, k: int) -> np.ndarray:
    return np.sort(hist, axis=1)[:, ::-1][:, :k].sum(1) / hist.sum(1)


def test_dirichlet_small_alpha_concentrates(digit_labels):
    parts = partition("dirichlet", digit_labels, 10, alpha=0.01, seed=0)
    hist = label_histogram(digit_labels, parts, 10)
    assert hist.shape == (10, 10) and (hist.sum(1) == len(digit_labels) // 10).all()
    assert top_share(hist, 2).mean() >= 0.9


def test_dirichlet_large_alpha_is_near_uniform():
    # balanced labels and few clients: a client's proportions ~ Dir(1000) deviate ~3% per class
    # and the last client takes the (accumulated) leftovers; over 100 seeds the worst max/min
    # class-count ratio seen was 1.37, so 1.6 is a sound bound (alpha=0.01 gives ratio inf)
    labels = np.repeat(np.arange(10), 20000)
    for seed in range(3):
        hist = label_histogram(labels, partition("dirichlet", labels, 4, alpha=1000, seed=seed), 10)
        assert (hist.max(1) / hist.min(1)).max() < 1.6, hist
    skewed = label_histogram(labels, partition("dirichlet", labels, 4, alpha=0.01, seed=0), 10)
    assert (skewed.min(1) == 0).any()


def test_dirichlet_single_class_and_lm_labels():
    parts = partition("dirichlet", np.zeros(103), 5, alpha=0.1, seed=0)
    assert [len(p) for p in parts] == [20] * 5
    assert len(np.unique(np.concatenate(parts))) == 100
    with pytest.raises(ValueError, match="np.zeros"):
        partition("iid", np.zeros((10, 4)), 2, seed=0)
    with pytest.raises(UnknownNameError):
        partition("dirichlett", np.zeros(10), 2, seed=0)


def test_shards_give_about_s_labels(digit_labels):
    for s in (1, 2):
        parts = partition("shards", digit_labels, 10, shards_per_client=s, seed=0)
        hist = label_histogram(digit_labels, parts, 10)
        # a shard (71 samples) is smaller than any class (>= 139), so it spans <= 2 labels
        assert ((hist > 0).sum(1) <= 2 * s).all()
        assert top_share(hist, s).mean() >= 0.85


# ----------------------------------------------------------------------------- client shards
IMG_INFO = DatasetInfo(
    "img", "classification", 10, (3, 6, 6), 10, 0, (0.5, 0.25, 0.0), (0.5, 1.0, 2.0)
)


def test_batches_cover_each_sample_once_per_epoch():
    x = torch.from_numpy(RNG.integers(0, 256, (10, 3, 6, 6), dtype=np.uint8))
    shard = ClientShard(x, torch.arange(10), IMG_INFO)
    assert len(shard) == 10 and num_batches(10, 4) == 3 and num_batches(8, 4) == 2
    gen = torch.Generator().manual_seed(0)
    batches = list(shard.batches(4, epochs=2, generator=gen))
    assert [len(yb) for _, yb in batches] == [4, 4, 2, 4, 4, 2]
    for epoch in (batches[:3], batches[3:]):
        assert sorted(torch.cat([yb for _, yb in epoch]).tolist()) == list(range(10))
    assert not torch.equal(batches[0][1], batches[3][1])  # reshuffled
    mean = torch.tensor(IMG_INFO.mean).view(1, 3, 1, 1)
    std = torch.tensor(IMG_INFO.std).view(1, 3, 1, 1)
    for xb, yb in batches:
        assert xb.dtype == torch.float32
        torch.testing.assert_close(xb, (x[yb].float() / 255 - mean) / std)
        torch.testing.assert_close(prepare_inputs(x[yb], IMG_INFO), xb)


def reference_crops(img: torch.Tensor, pad: int = 4) -> list[torch.Tensor]:
    """Every padded crop and its mirror, with plain loops."""
    c, h, w = img.shape
    padded = torch.zeros(c, h + 2 * pad, w + 2 * pad, dtype=img.dtype)
    for i in range(h):
        for j in range(w):
            padded[:, i + pad, j + pad] = img[:, i, j]
    out = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            out += [crop, torch.stack([crop[:, :, w - 1 - j] for j in range(w)], dim=2)]
    return out


def test_crop_flip_is_a_shifted_or_flipped_copy_and_reproducible():
    info = DatasetInfo(
        "c", "classification", 10, (3, 6, 6), 12, 0, (0.0,) * 3, (1.0,) * 3, "crop_flip"
    )
    x = torch.from_numpy(RNG.integers(1, 256, (12, 3, 6, 6), dtype=np.uint8))
    shard = ClientShard(x, torch.arange(12), info)
    run = list(shard.batches(5, 1, torch.Generator().manual_seed(7)))
    again = list(shard.batches(5, 1, torch.Generator().manual_seed(7)))
    other = list(shard.batches(5, 1, torch.Generator().manual_seed(8)))
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(run, again, strict=True)
    )
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(run, other, strict=True))
    changed = 0
    for xb, yb in run:
        assert xb.shape == (len(yb), 3, 6, 6)
        for out, i in zip(xb, yb.tolist(), strict=True):
            raw = torch.round(out * 255).to(torch.uint8)
            assert any(torch.equal(raw, ref) for ref in reference_crops(x[i]))
            changed += not torch.equal(raw, x[i])
    assert changed > 0
    # no augmentation when asked (e.g. for a probe pass), and none at evaluation
    plain = next(shard.batches(12, 1, torch.Generator().manual_seed(0), augment=False))
    torch.testing.assert_close(plain[0], x[plain[1]].float() / 255)


def test_batch_stream_goes_on_like_batches_and_resumes_from_its_position():
    """GAS's endless stream yields what `batches` yields (crops included), and a stream rebuilt
    from a pickled client generator and its position goes on with the same batches."""
    info = DatasetInfo(
        "c", "classification", 10, (3, 6, 6), 10, 0, (0.0,) * 3, (1.0,) * 3, "crop_flip"
    )
    x = torch.from_numpy(RNG.integers(0, 256, (10, 3, 6, 6), dtype=np.uint8))
    shard = ClientShard(x, torch.arange(10), info)
    expected = list(shard.batches(4, 3, torch.Generator().manual_seed(5)))  # 3 a epoch
    stream = BatchStream(shard, 4, torch.Generator().manual_seed(5))
    got = [next(stream) for _ in range(4)]  # into the second epoch
    saved = pickle.dumps((stream.generator, stream.position()))
    got += [next(stream) for _ in range(5)]
    generator, position = pickle.loads(saved)
    resumed = BatchStream(shard, 4, generator)
    resumed.seek(position)
    again = [next(resumed) for _ in range(5)]
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for a, b in zip(again, got[4:], strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    fresh = BatchStream(shard, 4, torch.Generator().manual_seed(5))
    fresh.seek(BatchStream(shard, 4, torch.Generator()).position())  # not begun: a new epoch
    assert torch.equal(next(fresh)[1], expected[0][1])


def test_tokens_pass_through():
    info = DatasetInfo("lm", LANGUAGE_MODELING, 257, (5,), 7, 0)
    x = torch.randint(0, 257, (7, 5))
    y = torch.randint(0, 257, (7, 5))
    shard = ClientShard(x, y, info)
    for xb, yb in shard.batches(3, 1, torch.Generator().manual_seed(0)):
        assert xb.dtype == torch.int64
        idx = [int(torch.nonzero((x == row).all(1))[0]) for row in xb]
        assert torch.equal(xb, x[idx]) and torch.equal(yb, y[idx])
    assert prepare_inputs(x, info) is x


def test_public_api_exports():
    for name in ("load_dataset", "describe_dataset", "partition", "label_histogram", "ClientShard"):
        assert hasattr(data, name)
