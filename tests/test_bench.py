"""The benchmark scripts run end to end and print their figures (tiny settings; the figures
themselves are measured with `make bench`, never asserted here)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_bench(*args: str) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout.strip().splitlines()


def test_overhead_bench_prints_the_steady_state_and_the_whole_run_ratio():
    lines = run_bench("bench/overhead.py", "--rounds", "4", "--repeats", "1", "--chunk", "1")
    steady = re.fullmatch(r"steady state \(rounds 3–4, after the warm-up\): paired ratios "
                          r".*; ray/local (\d+\.\d\d)", lines[-2])  # fmt: skip
    figure = re.fullmatch(r"ray/local throughput ratio: (\d+\.\d\d)", lines[-1])
    assert steady and figure, lines[-3:]
    assert float(steady[1]) > 0 and float(figure[1]) > 0
    paired = [line for line in lines if line.startswith("local, ")]
    assert paired and all("paired ratios" in line for line in paired), lines


def test_server_batching_bench_prints_its_ratio():
    lines = run_bench("bench/server_batching.py", "--clients", "4", "--requests", "5")
    assert re.fullmatch(r"coalesce/exact requests/s: \d+\.\d\d", lines[-1]), lines[-3:]


def test_paper_round_bench_prints_its_table_and_figures():
    lines = run_bench("bench/paper_round.py", "--algorithms", "fsl_sage",
                      "--set", "dataset_args.num_train=80", "--set", "dataset_args.num_test=16",
                      "--set", "num_clients=2", "--set", "align_buffer_size=16",
                      "--set", "align_batch_size=16")  # fmt: skip
    report = json.loads(lines[-1])
    assert any(line.startswith("fsl_sage     local ") for line in lines), lines
    assert any("coalesce / exact" in line for line in lines), lines
    assert report["full"] is False and report["num_train"] == 80
    sage = report["results"]["fsl_sage"]
    for runtime in ("local", "ray_exact", "ray_coalesce"):
        row = sage[runtime]
        assert len(row["round_s"]) == 2 and all(s > 0 for s in row["round_s"]), row
        assert row["samples_per_s"] > 0 and row["samples_per_round"] == 80
        assert row["peak_mem_mb"] > 0
    assert sage["ray_exact"]["startup_s"] > 0
    assert sage["ray_speedup"] > 0 and sage["coalesce_vs_exact"] > 0
    assert set(report["goals"]) == {"fsl_sage_full_round_s_on_h100_h200", "ray_speedup_on_gpu"}


def test_gpu_check_on_cpu_prints_one_json_object_with_every_part_ok():
    # the benchmark parts run bench/paper_round.py's code, which the test above runs
    lines = run_bench("bench/gpu_check.py", "--cpu", "--skip", "paper_round,paper_round_bf16")
    report = json.loads(lines[-1])
    assert report["paper_round"] == report["paper_round_bf16"] == {"skipped": True}
    parts = ["environment", "fractional_gpu", "recovery", "parity"]
    assert all(report[p]["ok"] for p in parts), {p: report[p] for p in parts}
    assert report["ok"] and report["mode"] == "cpu"
    assert report["environment"]["ray"] and report["environment"]["cluster_resources"]["CPU"] > 0
    assert [row["round"] for row in report["fractional_gpu"]["metrics"]] == [1, 2, 3]
    assert report["recovery"]["restarted"] and report["recovery"]["max_metric_diff"] <= 1e-6
    assert report["parity"]["fsl_sage"]["equal"]


def test_ab_runs_each_revision_in_its_own_tree_in_turn():
    """bench/ab.py runs a script on a committed revision (a temporary worktree, removed after)
    and on this working tree, in turn, each run started in its tree with that tree's code: a
    run that imported the other tree's `actors` would print 0."""
    own_code = "import os, actors; print('ours:', float(actors.__file__.startswith(os.getcwd())))"
    before = subprocess.run(["git", "worktree", "list"], cwd=ROOT, capture_output=True, text=True)
    lines = run_bench("bench/ab.py", "HEAD", ".", "--runs", "2", "--", "-c", own_code)
    assert lines[:4] == ["run 1, A (HEAD): 1", "run 1, B (.): 1", "run 2, A (HEAD): 1",
                         "run 2, B (.): 1"], lines  # fmt: skip
    assert lines[-1] == "median B / median A: 1.000", lines
    after = subprocess.run(["git", "worktree", "list"], cwd=ROOT, capture_output=True, text=True)
    assert after.stdout == before.stdout  # its worktree is gone
