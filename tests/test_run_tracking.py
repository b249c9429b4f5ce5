"""`python -m fslsage.run` is tracked as a sweep's trial is: one MLflow run, params, a metric
point per round, its files as artifacts; FAILED with the reason, KILLED by Ctrl+C; the store
checked before anything starts; `--no-mlflow` (run and sweep) tracks nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from helpers import DEMO

from fslsage import report, sweep
from fslsage.config import ConfigError, load_config
from fslsage.run import RunRecord, main

ARTIFACTS = {"metrics.parquet", "partition.csv", "partition.png", "config.json", "summary.csv",
             "summary.md", "acc_vs_comm.png", "acc_vs_time.png"}  # fmt: skip


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def runs_of(uri: str, name: str) -> list:
    c = client(uri)
    experiment = c.get_experiment_by_name(name)
    return [] if experiment is None else c.search_runs([experiment.experiment_id])


def steps(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client(uri).get_metric_history(run_id, key))


def run(out: Path, *pairs: str, extra: tuple[str, ...] = ()) -> int:
    sets = [a for p in pairs for a in ("--set", p)]
    return main(["--config", str(DEMO), *sets, "--out", str(out), *extra])


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory) -> str:
    """One SQLite store for the tests that need not check the default one (making a store
    costs seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


def test_a_run_is_one_mlflow_run_with_a_point_per_round(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "results" / "demo"
    assert run(out, "rounds=3") == 0
    printed = capsys.readouterr().out
    assert printed.count("left ") >= 3  # every round line says the time left

    uri = f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}"  # the default: beside the results
    (tracked,) = runs_of(uri, "demo")
    assert tracked.info.status == "FINISHED"
    assert tracked.data.tags["fslsage.kind"] == "run"
    assert tracked.data.params["algorithm"] == "fsl_sage" and tracked.data.params["rounds"] == "3"
    metrics = pd.read_parquet(out / "metrics.parquet")
    for key in ("test_acc", "comm_gib", "sim_time_s", "train_loss"):
        assert steps(uri, tracked.info.run_id, key) == list(zip(metrics["round"], metrics[key],
                                                                strict=True)), key  # fmt: skip
    artifacts = {a.path for a in client(uri).list_artifacts(tracked.info.run_id)}
    assert ARTIFACTS <= artifacts
    assert (tmp_path / "results" / "mlartifacts").is_dir()  # beside the results, not the CWD
    assert uri in printed

    saved = json.loads((out / "config.json").read_text())
    assert saved == load_config(DEMO, ["rounds=3"]).to_dict()
    table = pd.read_csv(out / "summary.csv", keep_default_na=False)
    assert table.status.tolist() == ["finished"] and table.rounds.tolist() == [3]
    # the report of the run's folder rebuilds the same summary
    assert report.main([str(out), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "summary.csv").read_bytes() == (out / "summary.csv").read_bytes()


def test_a_diverging_run_is_failed_with_its_reason(tmp_path, monkeypatch, shared_store, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", shared_store)
    assert run(tmp_path / "nan", "name=nan", "algorithm=fedavg", "lr=1.0e6", "rounds=2") == 1
    assert "training diverged" in capsys.readouterr().err
    (tracked,) = runs_of(shared_store, "nan")
    assert tracked.info.status == "FAILED"
    assert tracked.data.tags["error"].startswith("TrainingDiverged: train_loss is nan")


def test_ctrl_c_leaves_the_run_killed_and_its_rounds_so_far(tmp_path, monkeypatch,
                                                            shared_store, capsys):  # fmt: skip
    monkeypatch.setenv("MLFLOW_TRACKING_URI", shared_store)
    logged = RunRecord.on_round

    def then_ctrl_c(self, row):
        logged(self, row)
        if row["round"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunRecord, "on_round", then_ctrl_c)
    out = tmp_path / "cut"
    assert run(out, "name=cut", "rounds=5") == 130
    assert capsys.readouterr().err == "fslsage: interrupted\n"
    (tracked,) = runs_of(shared_store, "cut")
    assert tracked.info.status == "KILLED"
    assert [s for s, _ in steps(shared_store, tracked.info.run_id, "test_acc")] == [1, 2]
    table = pd.read_csv(out / "summary.csv")
    assert table.status.tolist() == ["interrupted"] and table.rounds.tolist() == [2]


def test_a_bad_store_is_one_line_before_anything_and_no_mlflow_skips_it(
    tmp_path, monkeypatch, capsys
):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{blocker}/mlflow.db")
    out = tmp_path / "results" / "run"
    assert run(out, "rounds=1") == 2
    err = capsys.readouterr().err
    assert err.startswith("fslsage: config error: MLFLOW_TRACKING_URI: ") and err.count("\n") == 1
    assert not out.exists() and not (tmp_path / "results").exists()

    assert run(out, "rounds=1", extra=("--no-mlflow",)) == 0
    assert (out / "summary.csv").is_file() and (out / "config.json").is_file()
    assert not list(tmp_path.rglob("mlflow.db")) and not (tmp_path / "results/mlartifacts").exists()

    # a sweep checks the same store before Ray starts, unless --no-mlflow
    config = ["--config", str(DEMO), "--set", "search={alpha: [0.1]}",
              "--results-dir", str(tmp_path / "sweeps")]  # fmt: skip
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI"):
        sweep.plan(sweep.build_parser().parse_args(config))
    given, _, state = sweep.plan(sweep.build_parser().parse_args([*config, "--no-mlflow"]))
    assert given["name"] == "demo" and state is None
