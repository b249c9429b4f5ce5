"""Checkpoints by time as well as by rounds (`checkpoint_minutes`): paper rounds can take
minutes each, so a crash must cost at most a few minutes however large `checkpoint_every`."""

from __future__ import annotations

import pandas as pd
from test_checkpoint import SAME, run, small

from fslsage import checkpoint


def test_a_round_begun_after_the_interval_is_checkpointed_as_well_as_every_nth():
    now = [0.0]
    cadence = checkpoint.Cadence(every=10, minutes=5, clock=lambda: now[0])
    due = []
    for t in range(1, 31):
        now[0] += 100.0  # rounds of 100 s: 5 minutes after the last checkpoint in round 3
        if cadence.due(t):
            due.append(t)
            cadence.saved()
    assert due == [3, 6, 9, 10, 13, 16, 19, 20, 23, 26, 29, 30]
    by_rounds = checkpoint.Cadence(every=10, minutes=0, clock=lambda: now[0])
    assert [t for t in range(1, 31) if by_rounds.due(t)] == [10, 20, 30]
    never = checkpoint.Cadence(every=0, minutes=5, clock=lambda: now[0])
    now[0] += 1e6
    assert not any(never.due(t) for t in range(1, 31))


def test_a_ray_run_checkpointed_by_time_resumes_from_it(ray_session, tmp_path):
    """checkpoint_every far beyond the run, and an interval every round outlasts: each round is
    checkpointed (the newest two kept), the Ray runtime keeps the state at that round's end
    (not the last by rounds), and a run resumed from it equals the uninterrupted one."""
    by_time = {"checkpoint_every": 100, "checkpoint_minutes": 1e-6}
    ray_cfg = small("fsl_sage", runtime="ray", num_client_actors=2, **by_time)
    whole = run(small("fsl_sage"), tmp_path / "whole")
    run(ray_cfg.replace(rounds=3), tmp_path / "cut")
    folder = tmp_path / "cut" / "checkpoints"
    assert checkpoint.rounds(folder) == [2, 3]
    assert checkpoint.load(folder)["runtime"]["round"] == 3
    resumed = run(ray_cfg, tmp_path / "cut", resume=True)
    pd.testing.assert_frame_equal(resumed[SAME], whole[SAME], atol=1e-6, rtol=0)
    untimed = small("fsl_sage", checkpoint_every=100, checkpoint_minutes=0)
    run(untimed, tmp_path / "untimed")
    assert checkpoint.rounds(tmp_path / "untimed" / "checkpoints") == []
