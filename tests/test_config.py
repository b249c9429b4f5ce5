"""Config: `--set` overrides, flatten() and replace(), the shipped configs. Every malformed input
is in the table of tests/test_bad_input.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fslsage.config import Config, ConfigError, flatten, load_config, parse_overrides, validate
from fslsage.run import main

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
PAPER = ROOT / "configs" / "paper" / "cifar10_resnet18.yaml"


def test_bad_config_fails_before_anything_runs(tmp_path, capsys):
    out_dir = tmp_path / "out"
    rc = main(["--config", str(DEMO), "--set", "lr=0", "--out", str(out_dir)])
    assert rc == 2
    assert not out_dir.exists()
    assert capsys.readouterr().out == ""


def test_config_error_is_one_line():
    e = ConfigError("model", "first line\n   second line\n\n")
    assert str(e) == "model: first line second line"
    assert e.key == "model"


# ----------------------------------------------------------------------------- good configs
def test_shipped_configs_load():
    demo = load_config(DEMO)
    assert (demo.dataset, demo.model, demo.num_clients, demo.device) == (
        "digits",
        "digits_cnn",
        8,
        "cpu",
    )
    paper = load_config(PAPER)
    # the paper's setup (FSL-SAGE, ICML 2025, §5)
    assert (paper.algorithm, paper.model, paper.dataset, paper.partition) == (
        "fsl_sage",
        "resnet18",
        "cifar10",
        "dirichlet",
    )
    assert (paper.num_clients, paper.batch_size, paper.local_epochs) == (10, 256, 1)
    assert (paper.server_update_interval, paper.align_interval) == (5, 10)
    assert (paper.optimizer, paper.lr, paper.weight_decay) == ("adam", 1e-3, 1e-4)
    assert (paper.alpha, paper.comm_budget_gib, paper.align_targets) == (1.0, 200.0, "lazy")
    assert "fsl_sage" in paper.search["algorithm"]


def test_defaults_without_a_file():
    assert load_config(None) == Config()


def test_set_values_parse_as_yaml():
    cfg = load_config(
        DEMO,
        [
            "rounds=7",
            "lr=1e-3",  # a float, as in YAML 1.2 (PyYAML alone reads a string)
            "alpha=0.5",
            "download=false",
            "name=a=b",  # only the first '=' separates key and value
            "comm_budget_gib=2E1",
            "target_acc=1",  # an int where a float goes is widened
        ],
    )
    assert cfg.rounds == 7 and isinstance(cfg.rounds, int)
    assert cfg.lr == 1e-3 and isinstance(cfg.lr, float)
    assert cfg.alpha == 0.5
    assert cfg.download is False
    assert cfg.name == "a=b"
    assert cfg.comm_budget_gib == 20.0
    assert cfg.target_acc == 1.0 and isinstance(cfg.target_acc, float)


def test_later_set_wins():
    assert load_config(DEMO, ["rounds=3", "rounds=4"]).rounds == 4


def test_parse_overrides_nests_dotted_keys():
    assert parse_overrides(["search.alpha=[0.1,1.0]", "search.lr={loguniform: [1e-4, 1e-2]}"]) == {
        "search": {"alpha": [0.1, 1.0], "lr": {"loguniform": [1e-4, 1e-2]}}
    }


def test_dotted_set_merges_into_the_files_block():
    cfg = load_config(PAPER, ["search.alpha=[0.1,1.0]"])
    assert cfg.search == {
        "algorithm": ["fsl_sage", "cse_fsl", "splitfed_v1", "splitfed_v2", "fedavg"],
        "alpha": [0.1, 1.0],
    }
    cfg = load_config(PAPER, ["search.algorithm=[sl]", "model_args.aux_variant=linear"])
    assert cfg.search == {"algorithm": ["sl"]}
    assert cfg.model_args == {"aux_variant": "linear"}


def test_search_samplers_and_options_validate():
    cfg = validate(
        {
            "search": {
                "lr": {"loguniform": [1e-4, 1e-2]},
                "alpha": {"uniform": [0.1, 10]},
                "rounds": {"randint": [1, 5]},
                "align_targets": {"choice": ["lazy", "eager"]},
                "batch_size": [16, 32],
                "num_samples": 4,
                "metric": "test_acc",
            }
        }
    )
    assert cfg.search["batch_size"] == [16, 32]


def test_flatten():
    assert flatten({"a": 1, "b": {"c": 2, "d": {"e": [3]}}, "empty": {}}) == {
        "a": 1,
        "b.c": 2,
        "b.d.e": [3],
        "empty": {},
    }
    flat = flatten(load_config(PAPER, ["search.alpha=[0.1,1.0]"]).to_dict())
    assert flat["search.alpha"] == [0.1, 1.0]
    assert flat["search.algorithm"][0] == "fsl_sage"
    assert "search" not in flat
    assert flat["model_args"] == {}  # an empty block stays one column
    assert flat["rounds"] == 1000
    assert set(flat) - {"search.alpha", "search.algorithm"} == {
        f.name for f in dataclasses.fields(Config) if f.name != "search"
    }


def test_replace_validates():
    cfg = load_config(DEMO)
    new = cfg.replace(rounds=3, lr=1)
    assert (new.rounds, new.lr) == (3, 1.0) and isinstance(new.lr, float)
    assert cfg.rounds == 15  # the original is untouched
    with pytest.raises(ConfigError) as e:
        cfg.replace(rounds=0)
    assert e.value.key == "rounds"
    with pytest.raises(ConfigError) as e:
        cfg.replace(algorithm="fsl_sag")
    assert e.value.key == "algorithm" and "did you mean 'fsl_sage'" in str(e.value)
    with pytest.raises(ConfigError) as e:
        cfg.replace(algoritm="sl")
    assert e.value.key == "algoritm" and "did you mean 'algorithm'" in str(e.value)
    with pytest.raises(ConfigError) as e:
        cfg.replace(model="resnet18", dataset="e2e")
    assert e.value.key == "model"
