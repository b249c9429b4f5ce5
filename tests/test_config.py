"""Config: `--set` overrides, flatten() and replace(), the shipped configs. Every malformed input
is in the table of tests/test_bad_input.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from pydantic import TypeAdapter, ValidationError

from fslsage.config import (
    FIELD_TYPES,
    MAX_ROUNDS,
    SEARCH_METRICS,
    SEARCH_OPTIONS,
    Config,
    ConfigError,
    SearchOptions,
    flatten,
    load_config,
    parse_overrides,
    validate,
)
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


# ----------------------------------------------------------------------- the declared schema
SCHEMA = TypeAdapter(Config).json_schema()["properties"]
NUMERIC = [k for k, tp in FIELD_TYPES.items() if tp in (int, float)]


def test_every_numeric_key_declares_its_limits():
    """Limits live on the key's declaration, where the schema (and `python -c`) shows them."""
    bounds = ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")
    assert len(NUMERIC) > 40
    assert [k for k in NUMERIC if not set(bounds) & set(SCHEMA[k])] == []
    assert (SCHEMA["rounds"]["minimum"], SCHEMA["rounds"]["maximum"]) == (1, MAX_ROUNDS)
    assert SCHEMA["lr"]["exclusiveMinimum"] == 0 and SCHEMA["checkpoint_minutes"]["minimum"] == 0
    assert SCHEMA["optimizer"]["enum"] == ["adam", "adamw", "sgd"]
    assert SCHEMA["name"]["default"] == "experiment"


@pytest.mark.parametrize("key", NUMERIC)
def test_a_declared_limit_is_what_validation_enforces(key):
    prop, base = SCHEMA[key], {"num_clients": MAX_ROUNDS}  # room for active_clients
    outside = [prop["minimum"] - 1] if "minimum" in prop else []
    outside += [prop["exclusiveMinimum"]] if "exclusiveMinimum" in prop else []
    outside += [prop["maximum"] + 1] if "maximum" in prop else []
    outside += [prop["exclusiveMaximum"]] if "exclusiveMaximum" in prop else []
    for value in outside:
        with pytest.raises(ConfigError) as e:
            validate({**base, key: value}, check_registries=False)
        assert e.value.key == key and e.value.message.startswith("must be "), e.value
    edge = prop.get("minimum", prop.get("exclusiveMinimum", 0) + 1)
    assert getattr(validate({**base, key: edge}, check_registries=False), key) == edge


@pytest.mark.parametrize("key", list(FIELD_TYPES))
def test_types_are_strict(key):
    """An int key takes no bool or float, a float key an int (widened) but no bool or NaN, a
    str key no number, a block no scalar."""
    tp = FIELD_TYPES[key]
    wrong = {int: [True, 2.5, "3"], float: [True, "0.5", float("inf")], str: [3, None],
             bool: [1, "yes"], dict: [5, [1]]}.get(tp, [True, 3])  # fmt: skip
    for value in wrong:
        with pytest.raises(ConfigError) as e:
            validate({key: value}, check_registries=False)
        assert e.value.key == key, (value, e.value)
    if tp is float:
        widened = validate({key: SCHEMA[key].get("minimum", 1)}, check_registries=False)
        assert isinstance(getattr(widened, key), float)


def test_config_itself_rejects_what_validate_rejects():
    """The rules are the class's, not a separate pass: building a Config directly checks them."""
    assert Config(rounds=3).rounds == 3
    for bad in ({"rounds": 0}, {"rounds": True}, {"optimizer": "adamww"}, {"name": ".."},
                {"lr_schedule": "warmup_linear", "warmup_rounds": 10}, {"bogus": 1},
                {"search": {"lr": {"uniform": [5, 1]}}}):  # fmt: skip
        with pytest.raises(ValidationError):
            Config(**bad)
    cfg = Config()
    with pytest.raises(ValidationError):
        dataclasses.replace(cfg, active_clients=cfg.num_clients + 1)


def test_search_options_are_declared_with_their_defaults():
    assert SEARCH_OPTIONS == tuple(SearchOptions.model_fields)
    defaults = SearchOptions()
    assert (defaults.num_samples, defaults.scheduler, defaults.metric) == (1, "fifo", "test_acc")
    assert set(SearchOptions.model_fields["metric"].annotation.__args__) == set(SEARCH_METRICS)
    for option, value, says in [
        ("num_samples", 1.5, "expected int"), ("max_concurrent", -1, "must be >= 0"),
        ("mode", "maxx", "did you mean 'max'"), ("reduction_factor", True, "expected float"),
    ]:  # fmt: skip
        with pytest.raises(ConfigError) as e:
            validate({"search": {option: value}}, check_registries=False)
        assert e.value.key == f"search.{option}" and says in e.value.message, e.value


def test_every_value_a_search_can_give_passes_the_keys_own_rules():
    """A searched value is checked as if it were set alone, against the other keys too."""
    with pytest.raises(ConfigError) as e:
        validate({"lr_schedule": "warmup_linear", "warmup_rounds": 5, "search": {"rounds": [2]}},
                 check_registries=False)  # fmt: skip
    assert e.value.key == "search.rounds" and "warmup_rounds: must be < rounds=2" in str(e.value)
    with pytest.raises(ConfigError) as e:
        validate({"search": {"name": ["ok", "../up"]}}, check_registries=False)
    assert e.value.key == "search.name" and "plain folder name" in str(e.value)
    with pytest.raises(ConfigError) as e:
        validate({"search": {"rounds": {"uniform": [0.5, 3]}}}, check_registries=False)
    assert e.value.key == "search.rounds" and "expected int, got float 0.5" in str(e.value)
