"""Every paper configuration plans (issue 19 item 4): each file in configs/paper/ loads, plans its
ledger with `--dry-run --json` from an empty data_dir, and plans the same ledger on the
`synthetic` dataset shaped like its own; the search blocks are the papers' figures. The
`synthetic` dataset: the named dataset's description, seeded tensors in the real loaders'
layout, no file read or written, and a training round on it."""

from __future__ import annotations

import builtins
import io
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_cli import dry_json

from fslsage.config import ConfigError, load_config
from fslsage.data import DATASETS, describe_dataset, load_dataset
from fslsage.data.base import CLASSIFICATION, LANGUAGE_MODELING
from fslsage.data.e2e import IGNORE
from fslsage.models import MODELS, build_model
from fslsage.run import main
from tune.space import trial_config, trial_count

ROOT = Path(__file__).resolve().parents[1]
PAPER_DIR = ROOT / "configs" / "paper"
PAPER_CONFIGS = sorted(PAPER_DIR.glob("*.yaml"))
DEMO = ROOT / "configs" / "demo.yaml"

# The FSL-SAGE paper's comparison (SPEC §9) and the alphas of its heterogeneity figure.
PAPER_ALGORITHMS = {"fsl_sage", "cse_fsl", "splitfed_v1", "splitfed_v2", "fedavg"}
ALPHAS = [0.1, 1.0, 10.0]
IMAGE_CONFIGS = ["cifar100_resnet18", "cinic10_resnet18", "fmnist_simple_conv"]
NEW_CONFIGS = [*IMAGE_CONFIGS, "e2e_gpt2_medium"]
REAL_DATASETS = ["cifar10", "cifar100", "cinic10", "digits", "e2e", "fmnist"]
# small enough to generate in milliseconds, large enough that every CIFAR-100 class appears
SMALL = {"num_train": 300, "num_test": 120}


def sets(*pairs: str) -> list[str]:
    return [a for p in pairs for a in ("--set", p)]


# ----------------------------------------------------------------------------- the configs
def test_every_paper_setup_has_a_config():
    assert {p.stem for p in PAPER_CONFIGS} >= {"cifar10_resnet18", "cifar10_gas", *NEW_CONFIGS}


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: p.stem)
def test_paper_config_plans_without_data_and_on_synthetic_data(path, capsys, tmp_path):
    """Loads, plans two rounds from an empty data_dir, and `--set dataset=synthetic --set
    dataset_args.like=<its dataset>` plans exactly the same ledger and simulated time."""
    empty = tmp_path / "no_data_here"
    empty.mkdir()
    cfg = load_config(path)
    assert cfg.name == path.stem
    argv = ["--config", str(path), *sets(f"data_dir={empty}", "rounds=2")]
    real = dry_json(capsys, argv)
    assert real["algorithm"] == cfg.algorithm
    assert [r["round"] for r in real["rounds"]] == [1, 2]
    assert all(r["up_bytes"] > 0 and r["down_bytes"] > 0 for r in real["rounds"])
    synthetic = dry_json(
        capsys, [*argv, *sets("dataset=synthetic", f"dataset_args.like={cfg.dataset}")]
    )
    assert synthetic == real
    assert list(empty.iterdir()) == []  # nothing fetched, nothing written


@pytest.mark.parametrize("name", IMAGE_CONFIGS)
def test_image_search_blocks_are_the_papers_figures(name):
    """Every algorithm of the comparison × alpha from heterogeneous to near-iid: 15 trials,
    each a valid config."""
    cfg = load_config(PAPER_DIR / f"{name}.yaml")
    assert set(cfg.search["algorithm"]) == PAPER_ALGORITHMS
    assert cfg.search["alpha"] == ALPHAS
    assert trial_count(cfg.search) == len(PAPER_ALGORITHMS) * len(ALPHAS)
    base = cfg.to_dict()
    trials = [
        trial_config(base, {"algorithm": a, "alpha": alpha})
        for a in cfg.search["algorithm"]
        for alpha in ALPHAS
    ]
    assert {(t.algorithm, t.alpha) for t in trials} == {
        (a, alpha) for a in PAPER_ALGORITHMS for alpha in ALPHAS
    }
    assert {t.network_profile for t in trials} == {"equal"}  # no gas: equal clients


def test_gpt2_config_is_the_papers_split_and_searches_the_algorithms():
    """GPT-2 medium as SPEC §4 splits it; alpha does not apply to E2E (one class), so the
    search varies the algorithm only, ranked by test loss."""
    cfg = load_config(PAPER_DIR / "e2e_gpt2_medium.yaml")
    assert (cfg.model, cfg.dataset, cfg.batch_size, cfg.lr, cfg.weight_decay) == (
        "gpt2", "e2e", 8, 2e-4, 0.01,
    )  # fmt: skip
    assert cfg.model_args == {
        "n_layer": 24, "n_embd": 1024, "n_head": 16, "client_layers": 1, "aux_layers": 3,
        "lora_rank": 4, "lora_alpha": 32, "lora_dropout": 0.1,
    }  # fmt: skip
    assert "pretrained" not in cfg.model_args  # a dry-run must not need the weights
    assert set(cfg.search["algorithm"]) == PAPER_ALGORITHMS and "alpha" not in cfg.search
    assert cfg.search["metric"] == "test_loss"
    assert trial_count(cfg.search) == len(PAPER_ALGORITHMS)
    # LoRA's E2E training, now expressed as keys rather than listed as missing
    assert (cfg.optimizer, cfg.lr_schedule, cfg.label_smoothing) == (
        "adamw", "warmup_linear", 0.1,
    )  # fmt: skip
    header = (PAPER_DIR / "e2e_gpt2_medium.yaml").read_text().split("\nname:")[0]
    assert "not yet expressible" not in header


# ----------------------------------------------------------------------------- synthetic data
@pytest.mark.parametrize("like", REAL_DATASETS)
def test_synthetic_describes_itself_as_the_named_dataset(like):
    real, synthetic = describe_dataset(like), describe_dataset("synthetic", like=like)
    assert synthetic.name == f"synthetic({like})"
    for field in ("task", "num_classes", "input_shape", "num_train", "num_test", "mean", "std"):
        assert getattr(synthetic, field) == getattr(real, field), field
    assert synthetic.augment == real.augment
    small = describe_dataset("synthetic", like=like, **SMALL)
    assert (small.num_train, small.num_test) == (300, 120)
    assert small.input_shape == real.input_shape


def test_synthetic_defaults_and_like_arguments():
    assert describe_dataset("synthetic") == describe_dataset("synthetic", like="cifar10")
    e2e = describe_dataset("synthetic", like="e2e", seq_len=32)
    assert e2e.input_shape == (32,) and e2e.num_classes == 257  # e2e's byte tokenizer
    # a tokenizer that is not a local directory: GPT-2's vocabulary, as e2e itself assumes
    gpt2 = describe_dataset("synthetic", like="e2e", seq_len=8, tokenizer="gpt2-medium")
    assert gpt2.num_classes == describe_dataset("e2e", tokenizer="gpt2-medium").num_classes


@pytest.mark.parametrize("like", ["digits", "cifar10", "cifar100", "cinic10", "fmnist"])
def test_synthetic_images_are_shaped_like_the_real_loaders(like, tmp_path):
    info = describe_dataset(like)
    ds = load_dataset("synthetic", tmp_path / "absent", like=like, **SMALL)
    assert ds.info == describe_dataset("synthetic", like=like, **SMALL)
    for x, y, n in ((ds.train_x, ds.train_y, 300), (ds.test_x, ds.test_y, 120)):
        assert x.shape == (n, *info.input_shape) and x.dtype == torch.uint8  # (N, C, H, W)
        assert x.is_contiguous()
        assert y.shape == (n,) and y.dtype == torch.int64
        assert set(y.tolist()) == set(range(info.num_classes))  # every class appears
    counts = torch.bincount(ds.train_y, minlength=info.num_classes)
    assert counts.max() - counts.min() <= 1  # balanced, as CIFAR is
    assert ds.train_x.float().std() > 50  # noise over the whole 0..255 range
    assert int(ds.train_x.min()) == 0 and int(ds.train_x.max()) == 255


def test_synthetic_tokens_follow_the_e2e_layout(tmp_path):
    """As e2e.encode_pairs lays a sample out: labels are the next tokens of the continuation,
    IGNORE on the prompt and the padding, the continuation ends in end-of-text and end-of-text
    pads the rest; every sample has a labelled target."""
    seq_len = 24
    info = describe_dataset("synthetic", like="e2e", seq_len=seq_len, **SMALL)
    assert (info.task, info.input_shape, info.num_classes) == (LANGUAGE_MODELING, (24,), 257)
    ds = load_dataset("synthetic", tmp_path / "absent", like="e2e", seq_len=seq_len, **SMALL)
    eos = ds.extras["eos_id"]
    assert eos == 256  # the byte tokenizer's end-of-text
    for x, y in ((ds.train_x, ds.train_y), (ds.test_x, ds.test_y)):
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (len(x), seq_len)
        assert int(x.min()) >= 0 and int(x.max()) <= eos
        labelled = y != IGNORE
        assert labelled.any(dim=1).all()
        assert ((y >= 0) | ~labelled).all() and int(y[labelled].max()) <= eos
        # next-token targets: y[t] is x[t + 1] wherever both are inside the sequence
        inner = labelled[:, :-1]
        assert torch.equal(y[:, :-1][inner], x[:, 1:][inner])
        for xi, yi, mi in zip(x, y, labelled, strict=True):
            idx = mi.nonzero().flatten()
            first, last = int(idx[0]), int(idx[-1])
            assert torch.equal(idx, torch.arange(first, last + 1))  # one contiguous run
            assert int(yi[last]) == eos  # the continuation ends in end-of-text
            assert (xi[last + 1 :] == eos).all()  # padding after it
            assert (xi[: first + 1] != eos).all()  # a prompt of real tokens before it
    lengths = labelled.sum(dim=1)
    assert len(set(lengths.tolist())) > 5  # lengths vary as real references do


@pytest.mark.parametrize("like", ["cifar10", "e2e"])
def test_synthetic_is_seeded(like, tmp_path):
    args = {"like": like, **SMALL}

    def load(**extra):
        ds = load_dataset("synthetic", tmp_path / "absent", **args, **extra)
        return [ds.train_x, ds.train_y, ds.test_x, ds.test_y]

    first, again, other = load(), load(seed=0), load(seed=1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(first[::2], other[::2], strict=True))
    assert not torch.equal(first[1], other[1])
    assert not torch.equal(first[0][:120], first[2])  # train and test are different draws


@pytest.mark.parametrize("like", ["cifar10", "e2e"])
def test_synthetic_reads_and_writes_no_file(like, tmp_path, monkeypatch):
    """A data_dir that does not exist stays so, the working directory stays empty, download
    asks for nothing, and no file is opened while the tensors are made."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    absent = tmp_path / "absent"

    def no_files(*args, **kwargs):
        raise AssertionError(f"synthetic opened a file: {args}")

    monkeypatch.setattr(builtins, "open", no_files)
    monkeypatch.setattr(io, "open", no_files)
    ds = load_dataset("synthetic", absent, download=True, like=like, **SMALL)
    monkeypatch.undo()
    assert len(ds.train_y) == 300
    assert not absent.exists()
    assert list(work.iterdir()) == []


def test_synthetic_rejects_bad_arguments(tmp_path):
    def config_error(*pairs: str) -> str:
        with pytest.raises(ConfigError) as err:
            load_config(DEMO, ["dataset=synthetic", *pairs])
        return str(err.value)

    assert "did you mean 'cifar10'" in config_error("dataset_args.like=cifar-10")
    assert "synthetic" in config_error("dataset_args.like=synthetic")
    message = config_error("dataset_args.like=cifar10", "dataset_args.seq_len=8")
    assert "like, seed, num_train, num_test" in message and "seq_len" in message
    assert "num_train" in config_error("dataset_args.num_train=0")
    assert "seed" in config_error("dataset_args.seed=-1")
    assert "seed" in config_error("dataset_args.seed=18446744073709551616")  # 2**64
    # the clients must fit in the shrunk split, as for a real dataset
    assert "num_clients" in config_error("dataset_args.like=digits", "dataset_args.num_train=4")
    with pytest.raises(ValueError, match="like"):
        load_dataset("synthetic", tmp_path, like="nope")


# (model, model_args) that build quickly on meta: every registered model
MODEL_CASES = {
    "resnet18": {},
    "simple_conv": {},
    "alexnet_gas": {},
    "digits_cnn": {},
    "gpt2": {"n_layer": 2, "n_embd": 32, "n_head": 2},
}


@pytest.mark.parametrize("like", REAL_DATASETS)
def test_models_take_synthetic_data_where_they_take_the_named_dataset(like):
    """Models check a dataset by its description, so synthetic(<like>) is accepted (or refused,
    with the same reason) exactly where <like> is."""
    assert set(MODEL_CASES) == set(MODELS.names())
    args = {"seq_len": 16} if like == "e2e" else {}
    real, synthetic = (
        describe_dataset(like, **args),
        describe_dataset("synthetic", like=like, **args),
    )

    def outcome(info):
        try:
            with torch.device("meta"):
                split = build_model(model, info, **MODEL_CASES[model])
        except ValueError as err:
            return "refused: " + str(err).replace(repr(info.name), "<dataset>")
        return [tuple(p.shape) for p in split.client.parameters()]

    for model in MODEL_CASES:
        assert outcome(synthetic) == outcome(real), model


# ----------------------------------------------------------------------------- training on it
def test_one_round_on_synthetic_digits(tmp_path, capsys):
    """The demo-sized model trains a round on synthetic digits in-process; no data_dir needed."""
    absent, out = tmp_path / "absent", tmp_path / "run"
    argv = ["--config", str(DEMO), "--out", str(out)]
    argv += sets("dataset=synthetic", "dataset_args.like=digits", "rounds=1", f"data_dir={absent}")
    assert main(argv) == 0
    capsys.readouterr()
    df = pd.read_parquet(out / "metrics.parquet")
    assert df["round"].tolist() == [1]
    assert 0.0 <= df.test_acc.iloc[0] <= 1.0 and df.comm_gib.iloc[0] > 0
    hist = pd.read_csv(out / "partition.csv")
    clients, n = load_config(DEMO).num_clients, describe_dataset("digits").num_train
    assert hist.drop(columns="client").to_numpy().sum() == clients * (n // clients)  # equal shards
    assert not absent.exists()


def test_one_round_of_a_tiny_gpt2_on_synthetic_e2e(tmp_path, capsys):
    """The language-model path: IGNORE labels and end-of-text padding train and evaluate (the
    test loss of random tokens is about log(vocabulary))."""
    absent, out = tmp_path / "absent", tmp_path / "run"
    argv = ["--config", str(DEMO), "--out", str(out)]
    argv += sets(
        "model=gpt2", "model_args={n_layer: 2, n_embd: 32, n_head: 2, aux_layers: 1}",
        "dataset=synthetic", "dataset_args={like: e2e, seq_len: 16, num_train: 64, num_test: 16}",
        "partition=iid", "batch_size=8", "rounds=1", f"data_dir={absent}",
    )  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    df = pd.read_parquet(out / "metrics.parquet")
    assert df["round"].tolist() == [1]
    assert abs(df.test_loss.iloc[0] - torch.log(torch.tensor(257.0)).item()) < 1.0
    assert not absent.exists()


def test_synthetic_is_registered():
    assert "synthetic" in DATASETS
    assert describe_dataset("synthetic", like="digits").task == CLASSIFICATION
