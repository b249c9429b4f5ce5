"""Durable runs (issue 22): the whole experiment checkpointed to disk as plain data, and a
resumed run equal to the uninterrupted one, round for round — for every algorithm, and through a
driver killed with SIGKILL."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from helpers import demo_config

from fslsage import checkpoint
from fslsage.config import ConfigError
from fslsage.experiment import prepare, run_experiment
from fslsage.run import make_runtime

ROOT = Path(__file__).resolve().parents[1]
SAME = ["round", "test_acc", "test_loss", "train_loss", "comm_gib", "sim_time_s"]
ALGORITHMS = ["fedavg", "sl", "splitfed_v1", "splitfed_v2", "cse_fsl", "fsl_sage", "gas"]


def run(cfg, out: Path, resume: bool = False) -> pd.DataFrame:
    """A run on the config's runtime (in-process, or Ray actors), in `out`."""
    runtime = make_runtime(prepare(cfg))
    try:
        return run_experiment(cfg, runtime, out_dir=out, progress=None, resume=resume)
    finally:
        runtime.close()


def small(algorithm: str, **changes):
    base = {"algorithm": algorithm, "num_clients": 4, "align_epochs": 2, "checkpoint_every": 2,
            "rounds": 4, "local_iters": 3, "model_buffer": 2, "activation_buffer": 2}  # fmt: skip
    return demo_config(**{**base, **changes})


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_resumed_run_equals_the_uninterrupted_one(tmp_path, algorithm):
    """Stopped after round 2 (its checkpoint) and resumed to round 4: the same four rows as a run
    that never stopped, bit for bit — clients, S-Server, generators and (gas) the schedule and
    data streams all come back."""
    whole = run(small(algorithm), tmp_path / "whole")
    run(small(algorithm, rounds=2), tmp_path / "cut")
    assert checkpoint.rounds(tmp_path / "cut" / "checkpoints") == [2]
    resumed = run(small(algorithm), tmp_path / "cut", resume=True)
    pd.testing.assert_frame_equal(resumed[SAME], whole[SAME])
    on_disk = pd.read_parquet(tmp_path / "cut" / "metrics.parquet")
    assert on_disk["round"].tolist() == [1, 2, 3, 4]  # each round once


def test_checkpoints_are_plain_data_and_only_the_newest_stay(tmp_path):
    run(small("fsl_sage", rounds=5, checkpoint_every=1), tmp_path)
    folder = tmp_path / "checkpoints"
    assert checkpoint.rounds(folder) == [4, 5]  # the last two
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary left
    saved = checkpoint.load(folder)  # torch.load(weights_only=True): tensors and containers
    assert saved["round"] == 5 and len(saved["rows"]) == 5


class Payload:
    """What a forged checkpoint would run when unpickled: it creates a file."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_forged_checkpoint_is_refused_and_runs_nothing(tmp_path):
    run(small("splitfed_v2", rounds=2), tmp_path)
    marker = tmp_path / "pwned"
    forged = tmp_path / "checkpoints" / "round-000099.pt"
    forged.write_bytes(pickle.dumps({"round": 99, "x": Payload(str(marker))}))
    with pytest.raises(ConfigError, match="^--resume: .* is not plain data"):
        run(small("splitfed_v2"), tmp_path, resume=True)
    assert not marker.exists()


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path):
    run(small("fsl_sage", rounds=2), tmp_path)
    with pytest.raises(ConfigError, match="^--resume: .*written with lr=0.002, this run has 0.5"):
        run(small("fsl_sage", lr=0.5), tmp_path, resume=True)
    with pytest.raises(ConfigError, match="^--resume: no checkpoint in"):
        run(small("fsl_sage"), tmp_path / "elsewhere", resume=True)


@pytest.mark.parametrize("runtime", ["local", "ray"])
def test_the_driver_killed_with_sigkill_resumes_where_its_checkpoint_left(tmp_path, runtime,
                                                                          request):  # fmt: skip
    """`python -m fslsage.run` killed mid-run (SIGKILL: no clean-up at all), then the same
    command with `--resume`: every round once in metrics.parquet, equal to a run never killed.
    On Ray the driver joins the tests' instance; its actors die with it (Ray ends a dead
    driver's job) and the resumed run starts fresh ones from the checkpoint on disk."""
    sets = ["--set", "rounds=6", "--set", "checkpoint_every=2", "--set", "num_clients=4",
            "--set", "align_epochs=2", "--set", f"runtime={runtime}"]  # fmt: skip
    cmd = [sys.executable, "-m", "fslsage.run", "--config", str(ROOT / "configs" / "demo.yaml"),
           *sets, "--out", str(tmp_path / "killed"), "--no-mlflow"]  # fmt: skip
    address = {}
    if runtime == "ray":  # first: starting Ray sets what a process needs to join it
        ray = request.getfixturevalue("ray_session")
        address = {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}
        cmd += ["--set", "num_client_actors=2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), **address}
    log = tmp_path / "stderr.txt"  # a file: Ray's lines would fill a pipe nobody reads yet
    with open(log, "w") as stderr:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    folder = tmp_path / "killed" / "checkpoints"
    deadline = time.monotonic() + 120
    while not checkpoint.rounds(folder) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, log.read_text()  # killed mid-run
    done = pd.read_parquet(tmp_path / "killed" / "metrics.parquet")["round"].tolist()
    assert checkpoint.rounds(folder) and done[-1] < 6
    resumed = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True,
                             timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed after round" in resumed.stdout
    cfg = demo_config(rounds=6, checkpoint_every=2, num_clients=4, align_epochs=2)
    whole = run(cfg, tmp_path / "whole")
    after = pd.read_parquet(tmp_path / "killed" / "metrics.parquet")
    pd.testing.assert_frame_equal(after[SAME], whole[SAME], atol=1e-6, rtol=0)


def test_a_restored_tune_trial_resumes_from_its_experiment_checkpoint(tmp_path, monkeypatch):
    """A trial's Tune checkpoint carries the experiment's checkpoint file; restored (a retry,
    or the sweep's --resume), it lands in the trial's checkpoint folder, from which the trial's
    run resumes rather than starting again from round 1."""
    from ray import tune

    from tune import trainable

    run(small("cse_fsl", rounds=2), tmp_path / "run")
    tune_dir = tmp_path / "tune_checkpoint"
    tune_dir.mkdir()
    (tune_dir / trainable.CHECKPOINT_FILE).write_text('{"round": 2, "rows": []}')
    (tune_dir / "round-000002.pt").write_bytes(
        (tmp_path / "run" / "checkpoints" / "round-000002.pt").read_bytes()
    )
    monkeypatch.setattr(tune, "get_checkpoint", lambda: tune.Checkpoint.from_directory(tune_dir))
    folder = tmp_path / "trial" / "checkpoints"
    folder.mkdir(parents=True)  # a newer one, written before Tune got its round: not used
    (folder / "round-000003.pt").write_bytes(b"from after Tune's last checkpoint")
    assert trainable.restored_round(folder) == 2
    assert checkpoint.rounds(folder) == [2]
    resumed = run(small("cse_fsl"), tmp_path / "trial", resume=True)
    whole = run(small("cse_fsl"), tmp_path / "whole")
    pd.testing.assert_frame_equal(resumed[SAME], whole[SAME])


@pytest.mark.parametrize("algorithm", ["fsl_sage"])  # gas's schedule: in-process tests above
def test_a_ray_run_resumes_from_its_disk_checkpoint(ray_session, tmp_path, algorithm):
    """The Ray runtime writes its checkpoint (the actors' states, as plain data) to the run's
    folder; a new runtime with fresh actors resumes from it, and its rows equal the
    uninterrupted in-process run's (the runtimes agree with `exact` batching)."""
    ray_cfg = small(algorithm, runtime="ray", server_batching="exact", num_client_actors=2)
    whole = run(small(algorithm), tmp_path / "whole")
    run(ray_cfg.replace(rounds=2), tmp_path / "cut")
    assert checkpoint.rounds(tmp_path / "cut" / "checkpoints") == [2]
    resumed = run(ray_cfg, tmp_path / "cut", resume=True)
    pd.testing.assert_frame_equal(resumed[SAME], whole[SAME], atol=1e-6, rtol=0)
