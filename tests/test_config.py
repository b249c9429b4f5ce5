"""Config: every malformed config ends, through the real CLI, in one stderr line naming the key
and what is allowed (exit code 2, no traceback); `--set` overrides, flatten() and replace()."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fslsage.config import Config, ConfigError, flatten, load_config, parse_overrides, validate
from fslsage.run import main

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
PAPER = ROOT / "configs" / "paper" / "cifar10_resnet18.yaml"
MISSING = "<missing>"  # --config names a file that does not exist


@dataclasses.dataclass(frozen=True)
class Bad:
    """A malformed config: `args` after `--config FILE` (FILE is `file` text written to a temp
    file, MISSING, or the demo config), the key the error must name and fragments it must hold."""

    args: tuple[str, ...]
    key: str
    says: tuple[str, ...]
    file: str | None = None
    dry_run: bool = True


def sets(*pairs: str) -> tuple[str, ...]:
    return tuple(a for p in pairs for a in ("--set", p))


ALGOS = "allowed: cse_fsl, fedavg, fsl_sage, gas, sl, splitfed_v1, splitfed_v2"
BAD = {
    # unknown and misspelt keys: did-you-mean plus the list of keys
    "unknown key": Bad(sets("bogus_key=1"), "bogus_key", ("unknown key", "allowed: name,")),
    "misspelt key": Bad(
        sets("algoritm=fsl_sage"), "algoritm", ("did you mean 'algorithm'?", "allowed: name,")
    ),
    "misspelt key in file": Bad(
        (), "num_client", ("did you mean 'num_clients'?",), file="num_client: 4\n"
    ),
    # wrong types
    "string for rounds": Bad(sets("rounds=ten"), "rounds", ("expected int", "got str 'ten'")),
    "float for batch_size": Bad(sets("batch_size=3.5"), "batch_size", ("expected int", "3.5")),
    "bool for lr": Bad(sets("lr=true"), "lr", ("expected float", "got bool")),
    "list for alpha": Bad(sets("alpha=[0.1, 1]"), "alpha", ("expected float", "got list")),
    "bool for rounds": Bad(sets("rounds=yes"), "rounds", ("expected int", "got bool")),
    "nan lr": Bad(sets("lr=.nan"), "lr", ("must be finite",)),
    "scalar for a block": Bad(sets("model_args=5"), "model_args", ("expected dict",)),
    "dotted key into a scalar": Bad(sets("rounds.x=1"), "rounds", ("expected int", "got dict")),
    # out of range
    "alpha 0": Bad(sets("alpha=0"), "alpha", ("must be > 0",)),
    "negative lr": Bad(sets("lr=-1e-3"), "lr", ("must be > 0", "-0.001")),
    "rounds 0": Bad(sets("rounds=0"), "rounds", ("must be >= 1",)),
    "client_gpus 2": Bad(sets("client_gpus=2"), "client_gpus", ("at most 1 GPU",)),
    "target_acc 1.5": Bad(sets("target_acc=1.5"), "target_acc", ("must be in [0, 1]", "1.5")),
    "more clients than samples": Bad(
        sets("num_clients=5000"), "num_clients", ("5000 clients", "digits has 1437 samples")
    ),
    "empty name": Bad(sets("name="), "name", ("non-empty",)),
    # unknown registry names: did-you-mean plus the list of names
    "unknown algorithm": Bad(
        sets("algorithm=fsl_sag"), "algorithm", ("did you mean 'fsl_sage'?", ALGOS)
    ),
    "unknown model": Bad(
        sets("model=resnet"), "model", ("did you mean 'resnet18'?", "allowed: alexnet_gas,")
    ),
    "unknown dataset": Bad(
        sets("dataset=cifar"), "dataset", ("did you mean 'cifar10'?", "allowed: cifar10,")
    ),
    "unknown partition": Bad(
        sets("partition=dirichlett"), "partition", ("did you mean 'dirichlet'?", "allowed:")
    ),
    # Literal keys
    "align_targets sometimes": Bad(
        sets("align_targets=sometimes"), "align_targets", ("'sometimes'", "'lazy' | 'eager'")
    ),
    "server_batching misspelt": Bad(
        sets("server_batching=coalese"),
        "server_batching",
        ("did you mean 'coalesce'?", "'exact' | 'coalesce'"),
    ),
    "runtime": Bad(sets("runtime=slurm"), "runtime", ("'local' | 'ray'",)),
    # builder arguments
    "unknown model_arg": Bad(
        sets("model_args.nope=1"), "model_args", ("unknown model_arg 'nope'", "allowed: none")
    ),
    "misspelt model_arg": Bad(
        sets("model_args.aux_varient=x"),
        "model_args",
        ("did you mean 'aux_variant'?", "allowed: aux_variant"),
        file=PAPER.read_text(),
    ),
    "bad model_arg value": Bad(
        sets("model_args.aux_variant=huge"),
        "model_args",
        ("aux_variant 'huge'", "allowed:"),
        file=PAPER.read_text(),
    ),
    "unknown dataset_arg": Bad(sets("dataset_args.foo=1"), "dataset_args", ("foo",)),
    "bad dataset_arg value": Bad(
        sets("dataset=e2e", "model=gpt2", "dataset_args.seq_len=1"),
        "dataset_args",
        ("seq_len must be >= 2",),
    ),
    # model and dataset that do not fit
    "gpt2 on digits": Bad(
        sets("model=gpt2"), "model", ("cannot be used with dataset 'digits'", "language-model")
    ),
    "resnet18 on e2e": Bad(
        sets("model=resnet18", "dataset=e2e"),
        "model",
        ("'resnet18' cannot be used with dataset 'e2e'", "classification"),
    ),
    # search blocks
    "unknown key in search": Bad(
        sets("search.bogus=[1]"), "search.bogus", ("unknown key", "num_samples")
    ),
    "misspelt key in search": Bad(
        sets("search.algoritm=[sl]"), "search.algoritm", ("did you mean 'algorithm'?",)
    ),
    "search value not a list": Bad(
        sets("search.alpha=3"), "search.alpha", ("expected a list of values or {sampler: args}",)
    ),
    "unknown sampler": Bad(
        sets("search.lr={normal: [1, 2]}"),
        "search.lr",
        ("unknown sampler 'normal'", "allowed: grid, choice, uniform, loguniform, randint"),
    ),
    "uniform high < low": Bad(
        sets("search.lr={uniform: [5, 1]}"), "search.lr", ("low < high", "[5, 1]")
    ),
    "uniform bounds not numbers": Bad(
        sets("search.lr={uniform: [a, 1]}"), "search.lr", ("[low, high] numbers",)
    ),
    "loguniform from 0": Bad(sets("search.lr={loguniform: [0, 1]}"), "search.lr", ("0 < low",)),
    "search value of the wrong type": Bad(
        sets("search.rounds=[1, two]"), "search.rounds", ("expected int", "'two'")
    ),
    "search value out of range": Bad(sets("search.alpha=[0, 1]"), "search.alpha", ("must be > 0",)),
    "unknown algorithm in search": Bad(
        sets("search.algorithm=[fsl_sage, splitfed]"),
        "search.algorithm",
        ("unknown algorithm 'splitfed'", "did you mean", ALGOS),
    ),
    "unknown key in the file's search block": Bad(
        (), "search.alpah", ("did you mean 'alpha'?",), file="search:\n  alpah: [0.1, 1.0]\n"
    ),
    # the command line and the file itself
    "--set without =": Bad(sets("rounds"), "rounds", ("key=value",)),
    "--set value not YAML": Bad(sets("rounds=[1"), "rounds", ("not valid YAML", "column")),
    "invalid YAML file": Bad(
        (), "--config", ("not valid YAML", "line 2"), file="rounds: [1\nalpha: 2\n"
    ),
    "YAML file not a mapping": Bad((), "--config", ("mapping",), file="- rounds\n- alpha\n"),
    "missing config file": Bad((), "--config", ("no such file", "missing.yaml"), file=MISSING),
    "--json without --dry-run": Bad(
        ("--json", *sets("rounds=1")), "--json", ("--dry-run",), dry_run=False
    ),
}


def argv_for(case: Bad, tmp_path: Path) -> list[str]:
    if case.file == MISSING:
        config = tmp_path / "missing.yaml"
    elif case.file is not None:
        config = tmp_path / "config.yaml"
        config.write_text(case.file)
    else:
        config = DEMO
    return ["--config", str(config), *case.args, *(["--dry-run"] if case.dry_run else [])]


def assert_config_error(case: Bad, rc: int, out: str, err: str) -> None:
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in err
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(f"fslsage: config error: {case.key}: "), line
    for fragment in case.says:
        assert fragment in line, (fragment, line)


def test_table_is_big_enough():
    assert len(BAD) >= 14


@pytest.mark.parametrize("name", list(BAD))
def test_malformed_config_in_process(name, tmp_path, capsys):
    case = BAD[name]
    rc = main(argv_for(case, tmp_path))
    out, err = capsys.readouterr()
    assert_config_error(case, rc, out, err)


@pytest.mark.parametrize("name", ["misspelt key", "invalid YAML file"])
def test_malformed_config_subprocess(name, tmp_path):
    case = BAD[name]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "fslsage.run", *argv_for(case, tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_config_error(case, proc.returncode, proc.stdout, proc.stderr)


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
