"""Progress lines: the time left from the recent rounds (and the GiB budget), a sweep's trial
counts, and a long alignment that says where it stands at most every few seconds."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import demo_config

from fslsage import progress
from fslsage.experiment import LocalRuntime, prepare, progress_line, run_experiment


def rows(walls: list[float], gib_per_round: float = 0.1) -> list[dict]:
    return [{"round": t, "wall_s": w, "comm_gib": gib_per_round * t}
            for t, w in enumerate(walls, start=1)]  # fmt: skip


def test_the_time_left_is_the_rounds_left_at_the_recent_pace():
    # rounds of 1 s: 7 rounds left
    assert progress.eta_seconds(rows([1, 2, 3]), rounds=10, budget_gib=100) == pytest.approx(7)
    # only the last RECENT_ROUNDS count: a slow first round (setup) is forgotten
    walls = [30, 31, 32, 33, 34, 35, 36]
    assert progress.eta_seconds(rows(walls), rounds=10, budget_gib=100) == pytest.approx(3)
    # the budget comes first: 0.3 GiB spent at 0.1 a round, 0.45 → 2 rounds more
    assert progress.eta_seconds(rows([1, 2, 3]), rounds=10, budget_gib=0.45) == pytest.approx(2)
    assert progress.eta_seconds(rows([1, 2, 3]), rounds=3, budget_gib=100) == 0
    assert progress.eta_seconds([], rounds=3, budget_gib=100) is None
    assert [progress.format_duration(s) for s in (None, 4.4, 65, 3725)] == [
        "?", "4s", "1m05s", "1h02m"]  # fmt: skip


def test_a_round_line_says_the_time_left():
    cfg = demo_config(rounds=10)
    line = progress_line(cfg, [{**r, "test_acc": 0.5, "test_loss": 1.0, "sim_time_s": 1.0}
                               for r in rows([2, 4])])  # fmt: skip
    assert "round   2/10" in line and line.endswith("left 16s")


def test_a_sweeps_lines_count_its_trials_done_running_and_pending():
    from tune.callbacks import trial_counts

    trials = [SimpleNamespace(status=s) for s in ("TERMINATED", "ERROR", "RUNNING", "RUNNING",
                                                  "PENDING")]  # fmt: skip
    assert trial_counts(trials, total=8) == "trials: 2 done, 2 running, 4 pending"
    assert trial_counts(trials, total=3) == "trials: 2 done, 2 running, 1 pending"  # more made


def test_a_phase_reports_at_most_every_few_seconds():
    now = [0.0]
    said: list[str] = []
    report = progress.Throttled(said.append, every_s=5.0, clock=lambda: now[0])
    for t in range(0, 21):
        now[0] = float(t)
        report(f"epoch {t}")
    assert said == [f"epoch {t} ({t}s into the round)" for t in (5, 10, 15, 20)]
    progress.report_phase("nobody listens")  # outside a run: nothing, no error


def test_fsl_sages_alignment_says_where_it_stands_inside_a_round(monkeypatch):
    """Every alignment epoch reports its phase; with no pause required, each one is a line of
    round 1 (the default pause, PHASE_EVERY_S, keeps a short one silent)."""
    cfg = demo_config(rounds=1, num_clients=2, align_epochs=3, align_buffer_size=32,
                      align_batch_size=32, first_align_round=1)  # fmt: skip
    lines: list[str] = []
    monkeypatch.setattr(progress, "PHASE_EVERY_S", 0.0)
    runtime = LocalRuntime(prepare(cfg))
    try:
        run_experiment(cfg, runtime, progress=lines.append)
    finally:
        runtime.close()
    phases = [ln for ln in lines if "aligning an aux model" in ln]
    assert len(phases) == 2 * 3  # two clients, three epochs each
    assert all(re.match(r"\[demo\] round 1/1: aligning an aux model: epoch [1-3]/3 \(", ln)
               for ln in phases)  # fmt: skip
    monkeypatch.setattr(progress, "PHASE_EVERY_S", 5.0)
    lines.clear()
    runtime = LocalRuntime(prepare(cfg))
    try:
        run_experiment(cfg, runtime, progress=lines.append)
    finally:
        runtime.close()
    assert not [ln for ln in lines if "aligning" in ln]


def test_on_ray_the_s_server_says_where_its_alignment_stands(ray_session):
    """On the Ray runtime the S-Server aligns in its own process: it prints the same phase
    lines, throttled as the driver asks, and Ray forwards its output to the driver's (read
    here from the actor's log file, since the tests' Ray does not forward it); a run printing
    nothing gets nothing."""
    from actors.runtime import RayRuntime

    cfg = demo_config(rounds=2, num_clients=2, align_epochs=3, align_buffer_size=32,
                      align_batch_size=32, first_align_round=1, num_client_actors=1)  # fmt: skip
    runtime = RayRuntime(prepare(cfg))
    try:
        pid = ray_session.get(runtime.server.where.remote())["pid"]
        with progress.phases_reported(print, every_s=0.0):
            runtime.run_round(1)
        runtime.run_round(2)  # nobody listens: no phase lines
    finally:
        runtime.close()
    logs = Path(ray_session._private.worker.global_worker.node.get_logs_dir_path())
    (log,) = logs.glob(f"worker-*-{pid}.out")
    phases = [ln for ln in log.read_text().splitlines() if "aligning an aux model" in ln]
    assert len(phases) == 2 * 3, phases  # round 1's two clients, three epochs each; not round 2
    assert all(re.match(r"\[demo\] round 1/2: aligning an aux model: epoch [1-3]/3 \(", ln)
               for ln in phases)  # fmt: skip
