"""A sweep's status is honest: Ctrl+C exits 130 with its trials "interrupted" and MLflow runs
KILLED; a trial whose logged results went missing is failed, with its reason; Tune's per-trial
files are read without a traceback and without unpickling; a full disk is one line, exit 1."""

from __future__ import annotations

import errno
import json
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml
from helpers import DEMO
from test_sweep import (
    TINY,
    no_tracking_env,  # noqa: F401 (a fixture, used by name)
    runs,
    start_sweep,
    steps,
    write_config,
)

from fslsage import sweep
from tune import summary, tracking

TRACEBACK = (
    "Failure # 1 (occurred at 2026-01-01_00-00-00)\n"
    "ray::ImplicitFunc.train() (pid=1, ip=127.0.0.1, actor_id=ab, repr=run_trial)\n"
    '  File "fslsage/experiment.py", line 269, in run_experiment\n'
    '    raise TrainingDiverged(f"train_loss is {outcome.train_loss} in round {t}")\n'
    "fslsage.experiment.TrainingDiverged: train_loss is nan in round 1\n"
)


def _row(t: int) -> dict:
    return {"round": t, "test_acc": 0.5 + t / 100, "test_loss": 1.0, "train_loss": 1.0,
            "comm_gib": 0.01 * t, "up_gib": 0.005 * t, "down_gib": 0.005 * t,
            "sim_time_s": 0.2 * t, "wall_s": 0.5 * t, "trial_id": "x", "done": False,
            "config": {"alpha": 0.1}}  # fmt: skip


def _result_json(rounds: range) -> str:
    return "".join(json.dumps(_row(t)) + "\n" for t in rounds)


def _progress_csv(rounds: range) -> str:
    columns = ["round", "test_acc", "comm_gib", "sim_time_s", "wall_s", "trial_id"]
    lines = [",".join(columns)]
    lines += [",".join(str(_row(t)[c]) for c in columns) for t in rounds]
    return "\n".join(lines) + "\n"


def _trial(
    root: Path, tid: str, alpha: float, last_round: int | None, files: dict
) -> SimpleNamespace:
    """A trial directory with the given files, and the Result that Tune's ResultGrid builds for
    it: `metrics_dataframe` as Tune reads it (empty when any line of result.json is bad)."""
    path = root / tid
    path.mkdir()
    for name, content in files.items():
        (path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    try:
        frame = pd.DataFrame([json.loads(ln) for ln in (path / "result.json").open()])
    except (OSError, ValueError):
        frame = pd.DataFrame()
    return SimpleNamespace(path=str(path), config={"alpha": alpha}, error=None,
                           metrics={} if last_round is None else _row(last_round),
                           metrics_dataframe=frame)  # fmt: skip


def test_trials_whose_logged_results_are_missing_or_cut_short_are_failed_with_a_reason(tmp_path):
    """Tune saw 3 rounds from each trial (its last result), but a full disk cut the files it
    logged them to: what can be read is kept, the trial is failed with the reason, no
    traceback; a trial whose progress.csv holds what result.json lost is complete."""
    base = {**yaml.safe_load(DEMO.read_text()), **TINY, "rounds": 3, "algorithm": "fedavg"}
    base["search"] = {"alpha": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]}
    whole, csv = _result_json(range(1, 4)), _progress_csv(range(1, 4))
    lines = whole.splitlines(keepends=True)
    cut = "".join(lines[:2]) + lines[2][:40]  # the third line cut mid-way
    grid = [
        _trial(tmp_path, "t_0", 0.1, 3, {"result.json": whole, "progress.csv": csv}),
        _trial(tmp_path, "t_1", 0.2, 3, {"result.json": cut}),
        _trial(tmp_path, "t_2", 0.3, 3, {}),
        _trial(tmp_path, "t_3", 0.4, 3, {"result.json": cut, "progress.csv": csv}),
        _trial(tmp_path, "t_4", 0.5, 3, {"result.json": b"\x00" * 64 + b"\xff\n",
                                         "progress.csv": csv[:-9]}),  # a hole; a cut line
        _trial(tmp_path, "t_5", 0.6, None, {"result.json": ""}),  # never started
    ]  # fmt: skip
    metrics, table = summary.collect(grid, base, ["alpha"])
    by_id = table.set_index("trial_id")
    assert by_id.status.to_dict() == {
        "t_0": "finished",
        "t_1": "failed",
        "t_2": "failed",
        "t_3": "finished",
        "t_4": "failed",
        "t_5": "stopped",
    }
    assert by_id.error["t_1"] == (
        "no results recorded: round 3 of the 3 it reported "
        "(result.json: 1 unreadable line; progress.csv missing)"
    )
    assert by_id.error["t_2"] == (
        "no results recorded: rounds 1-3 of the 3 it reported "
        "(result.json missing; progress.csv missing)"
    )
    assert by_id.error["t_4"] == (
        "no results recorded: round 3 of the 3 it reported "
        "(result.json: 1 unreadable line; progress.csv: 1 unreadable line)"
    )
    assert by_id.rounds.to_dict() == {"t_0": 3, "t_1": 2, "t_2": 0, "t_3": 3, "t_4": 2, "t_5": 0}
    rounds = metrics.groupby("trial_id")["round"].apply(list).to_dict()
    assert rounds == {"t_0": [1, 2, 3], "t_1": [1, 2], "t_3": [1, 2, 3], "t_4": [1, 2]}
    assert metrics.test_acc.notna().all()
    # Ctrl+C: the unfinished trials are interrupted, not stopped; failed ones stay failed
    _, table = summary.collect(grid, base, ["alpha"], interrupted=True)
    assert table.status.tolist() == ["finished", "failed", "failed", "finished", "failed",
                                     "interrupted"]  # fmt: skip


def test_a_trials_error_is_read_from_error_txt_and_never_unpickled(tmp_path, monkeypatch):
    """error.pkl may be empty (a full disk) and is never unpickled (its writer's code would run):
    the reason comes from error.txt, and says so when that is unreadable too."""
    import pickle

    import cloudpickle
    import ray.cloudpickle

    def no_unpickling(*a, **k):
        raise AssertionError("a trial's error was unpickled")

    for module in (pickle, cloudpickle, ray.cloudpickle):
        monkeypatch.setattr(module, "loads", no_unpickling)
        monkeypatch.setattr(module, "load", no_unpickling)
    (tmp_path / "error.pkl").write_bytes(b"")
    (tmp_path / "error.txt").write_text(TRACEBACK)
    trial = SimpleNamespace(path=str(tmp_path), error_file=str(tmp_path / "error.txt"),
                            pickled_error_file=str(tmp_path / "error.pkl"))  # fmt: skip
    reason = tracking.error_reason(tracking.trial_error(trial))
    assert reason == "TrainingDiverged: train_loss is nan in round 1"

    (tmp_path / "error.pkl").write_bytes(pickle.dumps(ValueError("from a pickle")))
    assert tracking.error_reason(tracking.trial_error(trial)) == reason
    # the driver-side copy lost, the one in storage is read; both lost or garbage: a reason
    trial.error_file = str(tmp_path / "gone" / "error.txt")
    assert tracking.error_reason(tracking.trial_error(trial)) == reason
    (tmp_path / "error.txt").write_bytes(b"")
    assert tracking.error_reason(tracking.trial_error(trial)) == tracking.UNREADABLE_ERROR
    (tmp_path / "error.txt").write_bytes(b"Failure # 1\n\xff\xfe garbage")
    assert tracking.error_reason(tracking.trial_error(trial)) == "\ufffd\ufffd garbage"


def _empty_error_pkl(monkeypatch) -> None:
    """Tune writes a failed trial's error.pkl as a full disk would leave it: empty."""
    import ray.tune.experiment.trial as trial_module

    real = trial_module.cloudpickle
    monkeypatch.setattr(trial_module, "cloudpickle", SimpleNamespace(
        dump=lambda obj, f: None, dumps=real.dumps, loads=real.loads))  # fmt: skip


def _cut_logged_round(monkeypatch, lr: float, round_: int) -> None:
    """The lines Tune logs for this round of the trial with this lr are cut short, as a full
    disk leaves them; Tune goes on (the round reached its callbacks, MLflow included)."""
    from ray.tune.logger.csv import CSVLoggerCallback
    from ray.tune.logger.json import JsonLoggerCallback

    for cls in (JsonLoggerCallback, CSVLoggerCallback):

        def log(self, iteration, trial, result, original=cls.log_trial_result):
            original(self, iteration, trial, result)
            if trial.config.get("lr") == lr and result.get("round") == round_:
                f = self._trial_files[trial]
                f.truncate(os.fstat(f.fileno()).st_size - 20)

        monkeypatch.setattr(cls, "log_trial_result", log)


@pytest.mark.usefixtures("no_tracking_env")
def test_after_a_full_disk_a_trial_without_its_rows_is_failed_and_counted_on_resume(
    ray_session, tmp_path, capsys, monkeypatch
):
    """A full disk leaves a diverging trial's error.pkl empty and cuts the lines Tune logged
    for the other trial's last round: the error is read from error.txt, the other trial is
    failed (its rows are missing, though Tune and MLflow saw them), the sweep says 2 failed and
    exits 1, and so it does again after --resume (which retries the failed trial)."""
    _empty_error_pkl(monkeypatch)
    _cut_logged_round(monkeypatch, lr=0.002, round_=2)
    cfg = write_config(tmp_path / "s.yaml", "lost", {"lr": [0.002, 1.0e6]}, algorithm="fedavg")
    results = tmp_path / "results"
    argv = ["--config", str(cfg), "--results-dir", str(results)]
    lost = (
        "no results recorded: round 2 of the 2 it reported "
        "(result.json: 1 unreadable line; progress.csv: 1 unreadable line)"
    )
    for resume in ([], ["--resume"]):
        assert sweep.main(argv + resume) == 1
        printed = capsys.readouterr().out  # (Tune logs the diverged trial's traceback itself)
        assert "2 trials, 2 failed" in printed and "Traceback" not in printed
        by_lr = pd.read_csv(results / "lost" / "summary.csv", keep_default_na=False)
        by_lr = by_lr.set_index("lr")
        assert by_lr.status.to_dict() == {0.002: "failed", 1e6: "failed"}
        assert by_lr.loc[0.002, "error"] == lost and by_lr.loc[0.002, "rounds"] == 1
        assert by_lr.loc[1e6, "error"].startswith("TrainingDiverged: train_loss is nan")
        assert pd.read_parquet(results / "lost" / "metrics.parquet")["round"].tolist() == [1]

    parent, children = runs(results, "lost")
    assert parent.status == "FAILED"
    assert (children.status == "FAILED").all()
    kept = children[children["params.lr"] == "0.002"].iloc[0]
    assert kept["tags.error"] == lost and steps(kept.run_id, "test_acc") == [1, 2]


@pytest.mark.usefixtures("no_tracking_env")
def test_a_full_disk_is_one_line_exit_1_and_the_previous_results_stay(
    ray_session, tmp_path, capsys, monkeypatch
):
    cfg = write_config(tmp_path / "s.yaml", "full", {"alpha": [0.5]}, algorithm="fedavg",
                       rounds=1)  # fmt: skip
    results = tmp_path / "results"
    argv = ["--config", str(cfg), "--results-dir", str(results)]
    assert sweep.main(argv) == 0
    out = results / "full"
    before = {f: (out / f).read_bytes() for f in ("metrics.parquet", "summary.csv")}
    capsys.readouterr()

    def full_disk(self, path, **kwargs):
        Path(path).write_bytes(b"PAR1 half a file")  # what got written before the disk filled
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", full_disk)
    assert sweep.main([*argv, "--resume"]) == 1
    err = capsys.readouterr().err
    assert err == (f"fslsage: disk full: could not write {out / 'metrics.parquet'}: "
                   "No space left on device\n")  # fmt: skip
    assert {f: (out / f).read_bytes() for f in before} == before
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    parent, _ = runs(results, "full")
    assert parent.status == "FAILED"


@pytest.mark.usefixtures("no_tracking_env")
def test_ctrl_c_exits_130_with_trials_interrupted_and_runs_killed_then_resume_finishes(
    ray_session, tmp_path
):
    """SIGINT (Ctrl+C) while every trial of the sweep is running: Tune stops them and returns
    as if the sweep had ended; the sweep says it was interrupted (exit 130, the command to
    resume it), its unfinished trials read "interrupted" and their MLflow runs and the parent
    run are KILLED. --resume then finishes it."""
    rounds = 6
    cfg = write_config(tmp_path / "s.yaml", "ctrlc", {"alpha": [0.1, 1.0]}, algorithm="fedavg",
                       rounds=rounds)  # fmt: skip
    results = tmp_path / "results"
    proc, argv, lines = start_sweep(ray_session, cfg, results)
    seen = []
    try:
        deadline = time.monotonic() + 120
        # both trials (the test instance's two CPUs) have reported their first round
        while sum(" round   1 " in line for line in seen) < 2:
            assert time.monotonic() < deadline, "".join(seen)
            seen.append(lines.get(timeout=deadline - time.monotonic()))
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=120)
        time.sleep(0.2)
        while not lines.empty():
            seen.append(lines.get())
    finally:
        if proc.poll() is None:
            proc.kill()
    printed = "".join(seen)
    assert rc == 130, printed
    assert "interrupted — continue with the same command plus --resume: " in printed
    assert f"-m fslsage.sweep --config {cfg} --results-dir {results} --resume" in printed
    assert "Traceback" not in printed

    partial = pd.read_csv(results / "ctrlc" / "summary.csv")
    assert set(partial.status) <= {"interrupted", "finished"}, printed
    assert "interrupted" in set(partial.status), printed
    parent, children = runs(results, "ctrlc")
    assert parent.status == "KILLED"
    statuses = dict(zip(children["tags.trial_id"], children.status, strict=True))
    expected = {"interrupted": "KILLED", "finished": "FINISHED"}
    assert statuses == {t: expected[s] for t, s in zip(partial.trial_id, partial.status,
                                                         strict=True)}  # fmt: skip

    assert sweep.main([*argv, "--resume"]) == 0
    summary_csv = pd.read_csv(results / "ctrlc" / "summary.csv")
    assert (summary_csv.status == "finished").all() and (summary_csv.rounds == rounds).all()
    metrics = pd.read_parquet(results / "ctrlc" / "metrics.parquet")
    assert len(metrics) == 2 * rounds and not metrics.duplicated(["trial_id", "round"]).any()
    parent, children = runs(results, "ctrlc")
    assert parent.status == "FINISHED" and (children.status == "FINISHED").all()
    for run_id in children.run_id:
        assert steps(run_id, "test_acc") == list(range(1, rounds + 1))


@pytest.mark.usefixtures("no_tracking_env")
def test_a_sweep_started_afresh_over_a_killed_one_ends_the_runs_it_left_running(
    ray_session, tmp_path
):
    """A sweep whose driver was SIGKILLed left its parent run and a trial's run RUNNING; started
    afresh instead of resumed, it ends them KILLED (a run that had ended keeps its status), and
    its own parent run is a new one."""
    from fslsage.config import load_config

    given = load_config(DEMO).to_dict()
    sweep_dir = tmp_path / "results" / given["name"]
    killed = sweep.start(given, sweep_dir)  # what the killed driver had opened
    uri, experiment_id, parent = (killed[k] for k in ("tracking_uri", "experiment_id",
                                                      "parent_run_id"))  # fmt: skip
    client = tracking._client(uri)
    trials = {
        tid: tracking.create_run(client, experiment_id, tid,
                                 {tracking.PARENT_TAG: parent, "trial_id": tid}, {})
        for tid in ("running", "finished")
    }  # fmt: skip
    tracking.end_run(client, trials["finished"], "FINISHED")
    fresh = sweep.start(given, sweep_dir)
    status = {name: client.get_run(run_id).info.status
              for name, run_id in [("parent", parent), *trials.items()]}  # fmt: skip
    assert status == {"parent": "KILLED", "running": "KILLED", "finished": "FINISHED"}
    assert fresh["parent_run_id"] != parent
    assert client.get_run(fresh["parent_run_id"]).info.status == "RUNNING"
