"""Faults a long sweep meets (issue 22): its driver killed with SIGKILL and resumed, a node of the
cluster lost under a running trial. Either way each (trial, round) is in the results and in
MLflow exactly once, and the trials go on from their checkpoints."""

from __future__ import annotations

import json
import pickle
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pandas as pd
import pytest
from helpers import DEMO
from test_ray_runtime import run_script
from test_sweep import (
    no_tracking_env,  # noqa: F401 (a fixture, used by name)
    runs,
    start_sweep,
    steps,
    write_config,
)

from fslsage import sweep
from fslsage.config import load_config


def tune_rows(trial_dir: Path) -> list[dict]:
    """The reports Tune logged for a trial (result.json), in the order it logged them."""
    lines = (trial_dir / "result.json").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@pytest.mark.timeout(180)
@pytest.mark.usefixtures("no_tracking_env")
def test_a_sweep_driver_killed_with_sigkill_resumes_with_every_round_once(ray_session, tmp_path):
    """The sweep's driver is SIGKILLed (no clean-up, no summary, MLflow runs left RUNNING) once a
    trial has reported round 5, past its checkpoint of round 3. `--resume` goes on from the
    checkpoints: that trial's rounds 4 and 5, run and reported again, are in metrics.parquet and
    in MLflow once, MLflow keeping the values they first had (the same: the resumed run equals an
    uninterrupted one), and rounds 1-3 are not run again."""
    rounds = 8
    cfg = write_config(tmp_path / "s.yaml", "killed", {"alpha": [0.1, 1.0]}, algorithm="fedavg",
                       rounds=rounds, checkpoint_every=3)  # fmt: skip
    results = tmp_path / "results"
    proc, argv, lines = start_sweep(ray_session, cfg, results)
    seen = []
    try:
        deadline = time.monotonic() + 120
        # Tune's callbacks take a result at a time, in order: when round 5's line is printed,
        # round 4 is in MLflow
        while not any(" round   5 " in line for line in seen):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(seen)
            seen.append(lines.get(timeout=deadline - time.monotonic()))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    ahead = next(line for line in seen if " round   5 " in line)[1:].split()[0]  # its trial id
    out = results / "killed"
    assert not (out / "summary.csv").exists()  # killed mid-sweep: nothing written on the way out
    parent, children = runs(results, "killed")
    assert parent.status == "RUNNING" and (children.status == "RUNNING").all()
    first = children.set_index("tags.trial_id").run_id.to_dict()  # the trials that had started
    # past its checkpoint of round 3 (round 5 too, if MLflow's turn came before the kill)
    assert steps(first[ahead], "test_acc") in ([1, 2, 3, 4], [1, 2, 3, 4, 5])

    # tracked as it started: --no-mlflow cannot take over a tracked sweep
    assert sweep.main([*argv, "--resume", "--no-mlflow"]) == 2
    assert sweep.main([*argv, "--resume"]) == 0
    metrics = pd.read_parquet(out / "metrics.parquet")
    by_trial = metrics.groupby("trial_id")["round"].apply(list).to_dict()
    assert list(by_trial.values()) == [list(range(1, rounds + 1))] * 2
    summary = pd.read_csv(out / "summary.csv")
    assert (summary.status == "finished").all() and (summary.rounds == rounds).all()
    # resumed from round 3's checkpoint, not from the start: rounds 1-3 reported once
    reported = [row["round"] for row in tune_rows(out / ahead)]
    assert [reported.count(t) for t in (1, 2, 3)] == [1, 1, 1] and reported[-1] == rounds

    parent, children = runs(results, "killed")
    assert parent.status == "FINISHED" and (children.status == "FINISHED").all()
    tracked = children.set_index("tags.trial_id").run_id.to_dict()
    assert tracked.keys() == by_trial.keys() and first.items() <= tracked.items()  # reused
    client = mlflow.MlflowClient()
    for tid, run_id in tracked.items():
        assert steps(run_id, "test_acc") == list(range(1, rounds + 1))
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "test_acc"))
        rows = metrics[metrics.trial_id == tid].sort_values("round")
        assert [v for _, v in logged] == pytest.approx(rows.test_acc.tolist(), abs=1e-12)


NODE_LOSS_SCRIPT = """
import json, threading, time
import ray
from ray.cluster_utils import Cluster
from fslsage import sweep
from tune import callbacks

# the head (where this driver runs) has no CPU: the trial can only run on the worker node
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
worker = cluster.add_node(num_cpus=1)
ray.init(address=cluster.address, log_to_driver=False)

reported = [0]  # the last round the driver's callbacks saw
progress = callbacks.Progress.on_trial_result
def on_trial_result(self, iteration, trials, trial, result, **info):
    progress(self, iteration, trials, trial, result, **info)
    reported[0] = result.get("round", reported[0])
callbacks.Progress.on_trial_result = on_trial_result

# the sweep in a thread: Ray starts a node from the main thread only
done = {}
thread = threading.Thread(daemon=True, target=lambda: done.update(code=sweep.main(
    ["--config", CONFIG, "--results-dir", RESULTS, "--no-mlflow"])))
thread.start()
deadline = time.monotonic() + 120
while reported[0] < AFTER and thread.is_alive() and time.monotonic() < deadline:
    time.sleep(0.01)
after = reported[0]
cluster.remove_node(worker)  # the trial's process dies with it
cluster.add_node(num_cpus=1)  # a replacement, where Tune retries the trial
thread.join(timeout=120)
print(json.dumps({"code": done.get("code"), "after": after}))
ray.shutdown()
cluster.shutdown()
"""


@pytest.mark.timeout(240)
def test_a_trial_whose_node_is_lost_is_retried_on_another_from_its_checkpoint(tmp_path):
    """A two-node cluster of its own; the trial runs on the only node with CPUs, which is
    removed once the sweep's driver has the trial's round 3, and a replacement joins. Tune
    retries the trial (search.max_failures) there, from its checkpoint: its reports after the
    loss come from a new process and start after a checkpointed round, not at round 1, and the
    results hold each round once. Its checkpoints are taken by time only (`checkpoint_minutes`
    of 0.06 s, `checkpoint_every` past the last round), and reach Tune as those by rounds do.
    Untracked (--no-mlflow): no MLflow store at all."""
    rounds = 12
    search = {"alpha": [1.0], "max_failures": 1}
    cfg = write_config(tmp_path / "s.yaml", "nodeloss", search, algorithm="fedavg",
                       rounds=rounds, checkpoint_every=100, checkpoint_minutes=0.001)  # fmt: skip
    results = tmp_path / "results"
    header = f"RESULTS = {str(results)!r}\nCONFIG = {str(cfg)!r}\nAFTER = 3\n"
    done = run_script(header + NODE_LOSS_SCRIPT, timeout=200)
    assert done["code"] == 0 and 3 <= done["after"] < rounds, done

    out = results / "nodeloss"
    metrics = pd.read_parquet(out / "metrics.parquet")
    assert metrics["round"].tolist() == list(range(1, rounds + 1))
    assert pd.read_csv(out / "summary.csv").status.tolist() == ["finished"]
    (trial_dir,) = [p for p in out.iterdir() if (p / "result.json").is_file()]
    rows = tune_rows(trial_dir)
    pids = list(dict.fromkeys(row["pid"] for row in rows))
    assert len(pids) == 2, rows  # the trial's process died with its node; a new one went on
    before = [row["round"] for row in rows if row["pid"] == pids[0]]
    after = [row["round"] for row in rows if row["pid"] == pids[1]]
    # (on the retry Tune puts back the result.json it last saved, at a checkpoint)
    assert before == list(range(1, len(before) + 1)) and len(before) >= 2
    # resumed after a round it had reported (a checkpointed one: round 1 is not), to the end
    assert 2 <= after[0] - 1 <= before[-1], (before, after)
    assert after == list(range(after[0], rounds + 1))
    assert not list(results.rglob("mlflow.db")) and not (results / "mlartifacts").exists()


def test_mlflow_logs_each_round_once_across_a_driver_restart_warm_start_included(tmp_path):
    """The sweep's MLflow callback, then the one a resumed driver unpickles from Tune's saved
    state (it remembers nothing): a warm-start trial's round 0 is logged like any round, and
    the rounds a restored trial reports again keep the one point they first had."""
    from tune import tracking
    from tune.callbacks import MlflowTrials

    base = load_config(DEMO, ["algorithm=fsl_sage", "warm_start=true"]).to_dict()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id, parent = tracking.start_sweep_run(uri, "warm", tmp_path / "mlartifacts",
                                                     base, tmp_path)  # fmt: skip
    trial = SimpleNamespace(trial_id="t_0", config={})

    def report(callback: MlflowTrials, t: int, acc: float) -> None:
        callback.on_trial_result(0, [trial], trial, {"round": t, "test_acc": acc})

    first = MlflowTrials(uri, experiment_id, parent, base, [])
    first.on_trial_start(0, [trial], trial)
    for t in (0, 1, 2):
        report(first, t, t / 10)
    resumed = pickle.loads(pickle.dumps(first))
    for t in (1, 2, 3):  # restored from round 0's checkpoint: rounds 1 and 2 again
        report(resumed, t, 0.5 + t / 10)
    (run,) = tracking._client(uri).search_runs([experiment_id], "tags.trial_id = 't_0'")
    history = tracking._client(uri).get_metric_history(run.info.run_id, "test_acc")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.0), (1, 0.1), (2, 0.2), (3, 0.8)]
