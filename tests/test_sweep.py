"""`python -m fslsage.sweep`: Ray Tune trials over the search block, results, MLflow, resume,
failures, and a real `ray job submit` to a cluster started on loopback."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from helpers import DEMO, ROOT

from fslsage import report, sweep
from fslsage.config import ConfigError, load_config, validate
from tune import space
from tune.resources import trial_bundles

PNG = b"\x89PNG\r\n\x1a\n"
TINY = {  # the demo config, small enough for a trial to take a second or two
    "rounds": 2, "num_clients": 4, "align_interval": 1, "align_epochs": 1,
    "align_buffer_size": 64, "align_batch_size": 64, "checkpoint_every": 1,
}  # fmt: skip


def write_config(path: Path, name: str, search: dict, **overrides) -> Path:
    raw = yaml.safe_load(DEMO.read_text())
    raw.update(TINY, name=name, search=search, **overrides)
    path.write_text(yaml.safe_dump(raw))
    return path


def runs(results: Path, name: str) -> tuple[pd.Series, pd.DataFrame]:
    """The sweep's parent run and its child runs, read back from the default SQLite store."""
    mlflow.set_tracking_uri(f"sqlite:///{results / 'mlflow.db'}")
    df = mlflow.search_runs(experiment_names=[name])
    parents = df[df["tags.fslsage.kind"] == "sweep"]
    assert len(parents) == 1
    parent = parents.iloc[0]
    return parent, df[df["tags.mlflow.parentRunId"] == parent.run_id]


def steps(run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in mlflow.MlflowClient().get_metric_history(run_id, key))


@pytest.fixture
def no_tracking_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_grid_sweep_lands_in_parquet_summary_plots_and_mlflow(
    ray_session, tmp_path, capsys, no_tracking_env
):
    cfg = write_config(tmp_path / "s.yaml", "grid",
                       {"algorithm": ["fedavg", "fsl_sage"], "alpha": [0.1, 1.0]})  # fmt: skip
    results = tmp_path / "results"
    assert sweep.main(["--config", str(cfg), "--results-dir", str(results)]) == 0
    out = results / "grid"

    metrics = pd.read_parquet(out / "metrics.parquet")
    assert len(metrics) == 4 * 2
    assert not metrics.duplicated(["trial_id", "round"]).any()
    assert {"trial", "trial_id", "algorithm", "alpha", "round", "test_acc", "comm_gib", "up_gib",
            "down_gib", "sim_time_s", "wall_s", "align_loss"} <= set(metrics.columns)  # fmt: skip
    assert set(zip(metrics.algorithm, metrics.alpha, strict=True)) == {
        (a, x) for a in ("fedavg", "fsl_sage") for x in (0.1, 1.0)
    }
    assert (metrics.comm_gib > 0).all()

    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 4 and (summary.status == "finished").all()
    assert {"final_acc", "best_acc", "acc_at_budget", "gib_to_target", "sim_s_to_target",
            "sim_time_s", "error"} <= set(summary)  # fmt: skip
    last = metrics.sort_values("round").groupby("trial_id").tail(1).set_index("trial_id")
    assert summary.set_index("trial_id").final_acc.to_dict() == pytest.approx(
        last.test_acc.to_dict()
    )
    assert summary.set_index("trial_id").sim_time_s.to_dict() == pytest.approx(
        last.sim_time_s.to_dict()
    )
    for png in ("acc_vs_comm.png", "acc_vs_time.png", "acc_vs_alpha.png"):
        assert (out / png).read_bytes()[:8] == PNG

    parent, children = runs(results, "grid")
    assert parent.status == "FINISHED" and len(children) == 4
    assert (children.status == "FINISHED").all()
    assert set(children["params.alpha"]) == {"0.1", "1.0"}
    assert set(children["params.algorithm"]) == {"fedavg", "fsl_sage"}
    for run_id, algorithm in zip(children.run_id, children["params.algorithm"], strict=True):
        for key in ("test_acc", "test_loss", "train_loss", "comm_gib", "up_gib", "sim_time_s",
                    "wall_s"):  # fmt: skip
            assert steps(run_id, key) == [1, 2]
        assert steps(run_id, "align_loss") == ([1, 2] if algorithm == "fsl_sage" else [])
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent.run_id)}
    assert {"acc_vs_comm.png", "acc_vs_time.png", "acc_vs_alpha.png", "summary.csv",
            "summary.md", "summary_seeds.csv"} <= artifacts  # fmt: skip
    for run_id, tid in zip(children.run_id, children["tags.trial_id"], strict=True):
        # each trial's run carries its own files: its rows and its partition
        files = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id)}
        assert files == {"config.json", "metrics.parquet", "partition.csv", "partition.png"}
        rows = pd.read_parquet(out / tid / "metrics.parquet")
        assert rows["round"].tolist() == [1, 2]
        assert rows.test_acc.tolist() == metrics[metrics.trial_id == tid].test_acc.tolist()

    printed = capsys.readouterr().out
    assert printed.count(" round   2  comm") == 4  # one line per trial and round
    # every round line says the trial's time left and how many trials are done, running, pending
    counted = r" round +\d  comm .* left \S+  \(trials: \d done, \d running, \d pending\)$"
    assert len(re.findall(counted, printed, flags=re.M)) == 4 * 2
    assert "final_acc" in printed and "acc_vs_comm.png" in printed and "mlflow.db" in printed
    # `fslsage.report` rebuilds the sweep's tables from its files
    assert report.main([str(out), "--out", str(tmp_path / "report")]) == 0
    for name in ("summary.csv", "summary_seeds.csv", "acc_vs_comm.csv"):
        assert (tmp_path / "report" / name).read_bytes() == (out / name).read_bytes()

    # the same sweep again replaces the first one's rows instead of adding to them; untracked
    assert sweep.main(["--config", str(cfg), "--results-dir", str(results),
                       "--set", "search.alpha=[0.5]", "--no-mlflow"]) == 0  # fmt: skip
    again = pd.read_parquet(out / "metrics.parquet")
    assert len(again) == 2 * 2 and set(again.alpha) == {0.5}
    assert not (out / "acc_vs_alpha.png").exists()
    assert len(runs(results, "grid")[1]) == 4  # no new runs


def test_a_diverging_trial_fails_with_its_reason_while_the_others_finish(
    ray_session, tmp_path, no_tracking_env
):
    cfg = write_config(tmp_path / "s.yaml", "nan", {"lr": [0.002, 1.0e6]}, algorithm="fedavg")
    results = tmp_path / "results"
    assert sweep.main(["--config", str(cfg), "--results-dir", str(results)]) == 0
    summary = pd.read_csv(results / "nan" / "summary.csv", keep_default_na=False)
    by_lr = summary.set_index("lr")
    assert by_lr.loc[0.002, "status"] == "finished" and by_lr.loc[0.002, "rounds"] == 2
    assert by_lr.loc[1e6, "status"] == "failed"
    assert by_lr.loc[1e6, "error"].startswith("TrainingDiverged: train_loss is")
    metrics = pd.read_parquet(results / "nan" / "metrics.parquet")
    assert set(metrics.lr) == {0.002}

    _, children = runs(results, "nan")
    failed = children[children["params.lr"] == "1000000.0"].iloc[0]
    assert failed.status == "FAILED"
    assert failed["tags.error"].startswith("TrainingDiverged: train_loss is")
    assert set(children.status) == {"FAILED", "FINISHED"}


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["search.alpha=3"], "search.alpha"),
        (["search.lr={normal: [1, 2]}"], "search.lr"),
        (["search.algorithm=[fedavg, splitfed]"], "search.algorithm"),
        (["search.bogus=[1]"], "search.bogus"),
        (["search.num_samples=0"], "search.num_samples"),
        (["search.scheduler=hyperband"], "search.scheduler"),
        (["search.scheduler=asha"], "search.grace_gib"),
        (["search.scheduler=asha", "search.grace_gib=1000"], "search.grace_gib"),
        (["search.metric=accuracy"], "search.metric"),
        (["search.grace_gib=1"], "search.grace_gib"),
    ],
)
def test_a_malformed_search_block_is_rejected_before_ray_starts(
    overrides, key, tmp_path, monkeypatch, capsys
):
    def no_ray(*a, **k):
        raise AssertionError("Ray started for a malformed config")

    monkeypatch.setattr(sweep, "connect_ray", no_ray)
    monkeypatch.setattr("ray.init", no_ray)
    argv = ["--config", str(DEMO), "--results-dir", str(tmp_path)]
    assert sweep.main(argv + [a for o in overrides for a in ("--set", o)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fslsage: config error: {key}: ") and err.count("\n") == 1


def test_resume_needs_an_interrupted_sweep_with_the_same_config(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweep, "connect_ray", lambda: pytest.fail("Ray started"))
    argv = ["--config", str(DEMO), "--results-dir", str(tmp_path), "--resume"]
    assert sweep.main(argv) == 2
    assert "--resume: no interrupted sweep" in capsys.readouterr().err
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "tuner.pkl").write_bytes(b"")
    base = load_config(DEMO).to_dict()
    (tmp_path / "demo" / "sweep.json").write_text(json.dumps({"config": base}))
    assert sweep.main(argv + ["--set", "lr=0.1"]) == 2
    assert "--resume: lr differs" in capsys.readouterr().err


class Forged:
    """A pickle that, unpickled, writes `marker`: what a forged tuner.pkl could run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


@pytest.mark.parametrize("case", ["others may write it", "a link", "another user's"])
def test_resume_unpickles_no_tune_state_another_user_could_have_written(tmp_path, monkeypatch,
                                                                        capsys, case):  # fmt: skip
    """Tune's restore unpickles tuner.pkl and its experiment state: --resume refuses a sweep
    folder whose files another user could have written, before reading any of them."""
    import pickle

    from fslsage import preflight

    monkeypatch.setattr(sweep, "connect_ray", lambda: pytest.fail("Ray started"))
    results, marker = tmp_path / "results", tmp_path / "ran"
    folder = results / "demo"
    folder.mkdir(parents=True)
    (folder / "sweep.json").write_text(json.dumps({"config": load_config(DEMO).to_dict()}))
    (folder / "tuner.pkl").write_bytes(pickle.dumps(Forged(marker)))
    os.chmod(folder, 0o755)
    os.chmod(folder / "tuner.pkl", 0o644)
    os.chmod(folder / "sweep.json", 0o644)
    if case == "others may write it":
        os.chmod(folder / "tuner.pkl", 0o646)
        expected = "writable by other users"
    elif case == "a link":
        real = tmp_path / "elsewhere"
        folder.rename(real)
        folder.symlink_to(real)
        expected = "is a link"
    else:  # the files are ours; the check is told we are someone else
        check = preflight.check_private
        monkeypatch.setattr(
            preflight, "check_private", lambda f, k: check(f, k, uid=os.getuid() + 1)
        )
        expected = "belongs to another user"
    argv = ["--config", str(DEMO), "--results-dir", str(results), "--resume"]
    assert sweep.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fslsage: config error: --resume: ") and expected in err, err
    assert not marker.exists()  # nothing was unpickled


def test_resume_accepts_a_private_sweep_folder(tmp_path):
    """The same folder as the test above, this user's and writable by no one else, passes; so
    does a group-writable file in this user's own private group (umask 002)."""
    from fslsage.preflight import check_private, shared

    (tmp_path / "tuner.pkl").write_bytes(b"")
    os.chmod(tmp_path, 0o700)
    os.chmod(tmp_path / "tuner.pkl", 0o600)
    check_private(tmp_path, "--resume")
    os.chmod(tmp_path / "tuner.pkl", 0o664)
    if shared(os.getgid()):
        with pytest.raises(ConfigError, match="writable by other users"):
            check_private(tmp_path, "--resume")
    else:
        check_private(tmp_path, "--resume")


def test_search_block_translates_to_tune_domains_schedulers_and_bundles():
    from ray.tune.schedulers import ASHAScheduler

    cfg = validate({"rounds": 4, "comm_budget_gib": 2.0, "search": {
        "alpha": [0.1, 1.0], "lr": {"loguniform": [1e-4, 1e-2]}, "rounds": {"randint": [1, 5]},
        "algorithm": {"choice": ["fedavg", "sl"]}, "batch_size": {"grid": [16, 32]},
        "num_clients": {"uniform": [2, 6]},
        "num_samples": 3, "scheduler": "asha", "grace_gib": 0.5, "metric": "test_loss",
    }})  # fmt: skip
    ps = space.param_space(cfg.search)
    assert set(ps) == {"alpha", "lr", "rounds", "algorithm", "batch_size", "num_clients"}
    assert ps["alpha"] == {"grid_search": [0.1, 1.0]} and ps["batch_size"] == {
        "grid_search": [16, 32]
    }
    sampled = {k: v.sample() for k, v in ps.items() if hasattr(v, "sample")}
    trial = space.trial_config(cfg.to_dict(), {**sampled, "alpha": 0.1, "batch_size": 16})
    assert 1e-4 <= trial.lr <= 1e-2 and isinstance(trial.num_clients, int) and trial.search == {}
    opts = space.options(cfg.search)
    assert (opts["num_samples"], opts["metric"], opts["mode"]) == (3, "test_loss", "min")
    asha = space.scheduler(cfg)
    assert isinstance(asha, ASHAScheduler) and asha._time_attr == "comm_gib"
    assert space.scheduler(validate({})) is None

    cluster = {"CPU": 4.0, "GPU": 2.0}
    assert trial_bundles(validate({}), cluster) == [{"CPU": 1.0}]
    ray_cfg = validate({"runtime": "ray", "server_gpus": 1.0, "client_gpus": 0.5})
    assert (
        trial_bundles(ray_cfg, cluster)
        == [{}, {"CPU": 1.0, "GPU": 1.0}] + [{"CPU": 1.0, "GPU": 0.5}] * 2
    )
    with pytest.raises(ConfigError, match="search.reduction_factor"):
        validate({"search": {"scheduler": "asha", "grace_gib": 1.0, "reduction_factor": 1}})


def _lines(stream) -> queue.Queue:
    q: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [q.put(line) for line in stream], daemon=True).start()
    return q


def start_sweep(ray_session, cfg: Path, results: Path) -> tuple[subprocess.Popen, list[str],
                                                                 queue.Queue]:  # fmt: skip
    """`python -m fslsage.sweep --config CFG --results-dir RESULTS` on the tests' Ray instance:
    (the process, its arguments, its output a line at a time)."""
    argv = ["--config", str(cfg), "--results-dir", str(results)]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "fslsage.sweep", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    return proc, argv, _lines(proc.stdout)


def test_resume_finishes_an_interrupted_sweep_with_every_row_once(
    ray_session, tmp_path, no_tracking_env
):
    """Interrupted (SIGINT, as Ctrl+C) in its second trial, the sweep is resumed: the finished
    trial is kept, the second goes on from its checkpoint, the third runs, and each (trial,
    round) appears exactly once in the results and in MLflow."""
    cfg = write_config(tmp_path / "s.yaml", "resume",
                       {"alpha": [0.1, 0.5, 1.0], "max_concurrent": 1},
                       algorithm="fedavg", rounds=3)  # fmt: skip
    results = tmp_path / "results"
    proc, argv, lines = start_sweep(ray_session, cfg, results)
    seen = []
    try:
        deadline = time.monotonic() + 120

        def wait_for(done) -> None:
            while not done():
                assert time.monotonic() < deadline, "".join(seen)
                seen.append(lines.get(timeout=deadline - time.monotonic()))

        # interrupted in the middle of the second trial, after its checkpoint of round 1
        wait_for(lambda: any(line.rstrip().endswith("] finished") for line in seen))
        first = len(seen)
        wait_for(lambda: any(" round   1 " in line for line in seen[first:]))
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=120)
        while not lines.empty():
            seen.append(lines.get())
        assert rc == 130, "".join(seen)
    finally:
        if proc.poll() is None:
            proc.kill()
    partial = pd.read_csv(results / "resume" / "summary.csv")
    assert list(partial.status) == ["finished", "interrupted"]  # written on the way out

    assert sweep.main([*argv, "--resume"]) == 0
    metrics = pd.read_parquet(results / "resume" / "metrics.parquet")
    assert len(metrics) == 3 * 3 and not metrics.duplicated(["trial_id", "round"]).any()
    assert sorted(metrics.groupby("trial_id")["round"].apply(list).tolist()) == [[1, 2, 3]] * 3
    summary = pd.read_csv(results / "resume" / "summary.csv")
    assert (summary.status == "finished").all() and sorted(summary.alpha) == [0.1, 0.5, 1.0]

    parent, children = runs(results, "resume")
    assert parent.status == "FINISHED" and len(children) == 3
    assert (children.status == "FINISHED").all()
    for run_id in children.run_id:
        assert steps(run_id, "test_acc") == [1, 2, 3]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def test_ray_job_submit_runs_a_sweep_on_a_cluster(tmp_path, no_tracking_env):
    """`ray start --head` on loopback (own ports and temp dir, token auth on), then the sweep as
    a job with the repository as working dir. The cluster is stopped by terminating its own
    `ray start --block` (not `ray stop`, which would stop every Ray on this machine)."""
    venv_bin = str(Path(sys.executable).parent)
    ray = [str(Path(venv_bin) / "ray")]
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    gcs, dash, client, agent_http, agent_grpc, runtime_env, metrics = _free_ports(7)
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths are limited
    head = subprocess.Popen(
        [*ray, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
         "--include-dashboard=true", "--ray-client-server-port", str(client),
         "--dashboard-agent-listen-port", str(agent_http),
         "--dashboard-agent-grpc-port", str(agent_grpc),
         "--runtime-env-agent-port", str(runtime_env), "--metrics-export-port", str(metrics),
         "--temp-dir", temp, "--num-cpus", "2", "--num-gpus", "0"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dash}"
    cfg = write_config(tmp_path / "s.yaml", "job", {"alpha": [0.1, 1.0]}, algorithm="fedavg",
                       rounds=1)  # fmt: skip
    results = tmp_path / "results"
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([*ray, "job", "list", "--address", address], env=env,
                             capture_output=True).returncode != 0:  # fmt: skip
            assert head.poll() is None and time.monotonic() < deadline, "cluster did not start"
            time.sleep(2)
        excludes = json.dumps({"excludes": ["/.venv", "/results", "/data", "/.git"]})
        submit = subprocess.run(
            [*ray, "job", "submit", "--address", address, "--submission-id", "sweep-test",
             "--working-dir", str(ROOT), "--runtime-env-json", excludes, "--",
             "python", "-m", "fslsage.sweep", "--config", str(cfg),
             "--results-dir", str(results)],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        logs = submit.stdout + submit.stderr
        status = subprocess.run(
            [*ray, "job", "status", "--address", address, "sweep-test"],
            env=env, capture_output=True, text=True,
        )  # fmt: skip
        assert "Job 'sweep-test' succeeded" in status.stdout, logs  # status SUCCEEDED
        assert "final_acc" in logs and "mlflow.db" in logs
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(temp, ignore_errors=True)
    summary = pd.read_csv(results / "job" / "summary.csv")
    assert len(summary) == 2 and (summary.status == "finished").all()
    assert len(pd.read_parquet(results / "job" / "metrics.parquet")) == 2
    _, children = runs(results, "job")
    assert len(children) == 2 and (children.status == "FINISHED").all()


@pytest.mark.timeout(180)
def test_ray_runtime_trials_run_their_actors_inside_the_trials_placement_group(
    ray_session, tmp_path, no_tracking_env
):
    """runtime: ray reserves {} + S-Server {CPU: 1} + one client actor {CPU: 1}: the whole
    2-CPU test instance, so the sweep only finishes if Tune places the actors in the trial's
    placement group. The numbers match the in-process runtime's."""
    search = {"runtime": ["ray", "local"]}
    cfg = write_config(tmp_path / "s.yaml", "rayrt", search, algorithm="fedavg", rounds=1)
    results = tmp_path / "results"
    assert sweep.main(["--config", str(cfg), "--results-dir", str(results)]) == 0
    metrics = pd.read_parquet(results / "rayrt" / "metrics.parquet").set_index("runtime")
    assert metrics.loc["ray", "test_acc"] == pytest.approx(metrics.loc["local", "test_acc"])
    assert metrics.loc["ray", "comm_gib"] == pytest.approx(metrics.loc["local", "comm_gib"])
