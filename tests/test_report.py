"""`python -m fslsage.report`: a fixture sweep's results files, written by the sweep's own code
(tune/summary.py, as `fslsage.sweep` writes them) from trial folders made here, are rebuilt by
the report from the files alone; the summary over seeds equals the numbers computed by hand."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml
from helpers import DEMO, ROOT

from fslsage import report
from tune import summary

ROUNDS = 3
GIB = {"fedavg": 0.2, "fsl_sage": 0.1}  # per round
SEARCH = {"algorithm": ["fedavg", "fsl_sage"], "alpha": [0.1, 1.0], "seed": [0, 1]}


def accuracy(algorithm: str, alpha: float, seed: int, t: int) -> float:
    return round(0.3 + 0.15 * t + (0.05 if algorithm == "fsl_sage" else 0) + 0.1 * alpha
                 + 0.03 * seed * (-1) ** t, 6)  # fmt: skip


def row(algorithm: str, alpha: float, seed: int, t: int) -> dict:
    gib = GIB[algorithm] * t
    return {"round": t, "test_acc": accuracy(algorithm, alpha, seed, t), "test_loss": 1.0 / t,
            "train_loss": 1.0 / t, "comm_gib": gib, "up_gib": gib / 2, "down_gib": gib / 2,
            "sim_time_s": 2.0 * t, "wall_s": 0.1 * t}  # fmt: skip


def fixture_sweep(root: Path) -> tuple[Path, dict]:
    """A sweep folder as `fslsage.sweep` leaves it: 8 trials (2 algorithms × 2 alphas × 2
    seeds) of 3 rounds and a failed one without rows, each trial folder with its Tune logs and
    the partition.csv the trial writes; then summary.collect_all / write_results /
    write_trial_files, as the sweep's driver calls them."""
    base = {**yaml.safe_load(DEMO.read_text()), "name": "fixture", "rounds": ROUNDS,
            "num_clients": 4, "search": SEARCH}  # fmt: skip
    sweep_dir = root / "fixture"
    sweep_dir.mkdir(parents=True)
    grid = []
    trials = [(a, x, s) for a in SEARCH["algorithm"] for x in SEARCH["alpha"] for s in (0, 1)]
    for i, (algorithm, alpha, seed) in enumerate([*trials, ("fedavg", 0.1, 2)]):
        tid = f"abc_{i:05d}"
        path = sweep_dir / tid
        path.mkdir()
        failed = seed == 2
        lines = [] if failed else [row(algorithm, alpha, seed, t) for t in range(1, ROUNDS + 1)]
        (path / "result.json").write_text("".join(json.dumps(r) + "\n" for r in lines))
        hist = pd.DataFrame({"client": range(4), "0": [5, 0, 3, 9], "1": [1, 7, 2, seed]})
        hist.to_csv(path / "partition.csv", index=False)
        grid.append(SimpleNamespace(
            path=str(path), config={"algorithm": algorithm, "alpha": alpha, "seed": seed},
            error="Traceback ...\nfslsage.experiment.TrainingDiverged: nan" if failed else None,
            metrics=lines[-1] if lines else {}, metrics_dataframe=pd.DataFrame(lines),
        ))  # fmt: skip
    metrics, table, configs = summary.collect_all(grid, base, list(SEARCH))
    summary.write_results(sweep_dir, metrics, table, configs)
    summary.write_trial_files(sweep_dir, metrics, configs)
    (sweep_dir / "sweep.json").write_text(json.dumps({"config": base}))
    return sweep_dir, base


def test_report_rebuilds_a_sweeps_summary_and_figures_from_its_files(tmp_path):
    sweep_dir, _ = fixture_sweep(tmp_path / "results")
    out = tmp_path / "report"
    assert report.main([str(sweep_dir), "--out", str(out)]) == 0
    for name in ("summary.csv", "summary_seeds.csv", "summary.md", "acc_vs_comm.csv",
                 "acc_vs_time.csv", "acc_vs_alpha.csv"):  # fmt: skip
        assert (out / name).read_bytes() == (sweep_dir / name).read_bytes(), name
    for name in ("acc_vs_comm.png", "acc_vs_time.png", "acc_vs_alpha.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    pd.testing.assert_frame_equal(pd.read_parquet(out / "metrics.parquet"),
                                  pd.read_parquet(sweep_dir / "metrics.parquet"))  # fmt: skip
    assert sorted(p.name for p in (out / "partitions").iterdir()) == [
        f"abc_{i:05d}.png" for i in range(9)
    ]
    table = pd.read_csv(out / "summary.csv", keep_default_na=False).set_index("trial_id")
    assert table.status["abc_00008"] == "failed"
    assert table.error["abc_00008"] == "TrainingDiverged: nan"
    # in place, without its config.json files: from sweep.json and the tables' columns
    before = (sweep_dir / "summary.csv").read_bytes()
    for tid in table.index:
        (sweep_dir / tid / "config.json").unlink()
    assert report.main([str(sweep_dir)]) == 0
    assert (sweep_dir / "summary.csv").read_bytes() == before


def test_the_summary_over_seeds_is_the_mean_and_std_computed_by_hand(tmp_path):
    sweep_dir, base = fixture_sweep(tmp_path / "results")
    seeds = pd.read_csv(sweep_dir / "summary_seeds.csv").set_index(["alpha", "algorithm"])
    trials = pd.read_csv(sweep_dir / "summary.csv")
    for algorithm in SEARCH["algorithm"]:
        for alpha in SEARCH["alpha"]:
            got = seeds.loc[(alpha, algorithm)]
            final = [accuracy(algorithm, alpha, s, ROUNDS) for s in (0, 1)]
            best = [max(accuracy(algorithm, alpha, s, t) for t in range(1, ROUNDS + 1))
                    for s in (0, 1)]  # fmt: skip
            # the common budget: the smaller of the algorithms' final GiB (fsl_sage's 0.3); the
            # best accuracy within it: fedavg's round 1 (0.2 GiB), fsl_sage's best
            budget = min(GIB.values()) * ROUNDS
            within = [max(accuracy(algorithm, alpha, s, t) for t in range(1, ROUNDS + 1)
                          if GIB[algorithm] * t <= budget + 1e-12) for s in (0, 1)]  # fmt: skip
            assert got.seeds == 2 and got.failed == (algorithm == "fedavg" and alpha == 0.1)
            assert got.common_budget_gib == pytest.approx(budget)
            for stat, values in (("final_acc", final), ("best_acc", best),
                                 ("acc_at_common_budget", within)):  # fmt: skip
                assert got[f"{stat}_mean"] == pytest.approx(sum(values) / 2), stat
                assert got[f"{stat}_std"] == pytest.approx(abs(values[0] - values[1])
                                                           / math.sqrt(2)), stat  # fmt: skip
            reached = [next((GIB[algorithm] * t for t in range(1, ROUNDS + 1)
                             if accuracy(algorithm, alpha, s, t) >= base["target_acc"]), None)
                       for s in (0, 1)]  # fmt: skip
            reached = [r for r in reached if r is not None]
            assert got.reached == len(reached)
            if reached:
                assert got.gib_to_target_mean == pytest.approx(sum(reached) / len(reached))
    assert trials.common_budget_gib.to_numpy() == pytest.approx([0.3] * 9)
    md = (sweep_dir / "summary.md").read_text()
    assert "| digits | 0.1 | FedAvg | 2 (1 failed) |" in md and " ± " in md
    # the α figure draws the best accuracy within the common budget, mean and std over seeds
    alpha = pd.read_csv(sweep_dir / "acc_vs_alpha.csv").set_index(["alpha", "curve"])
    assert alpha.loc[(1.0, "FSL-SAGE"), "mean"] == pytest.approx(
        seeds.loc[(1.0, "fsl_sage"), "acc_at_common_budget_mean"]
    )


def test_a_report_over_a_sweep_and_a_run_compares_them_without_ray_or_mlflow(tmp_path):
    sweep_dir, base = fixture_sweep(tmp_path / "results")
    run_dir = tmp_path / "results" / "single"  # a run's folder: metrics.parquet, config.json
    run_dir.mkdir()
    cfg = {k: v for k, v in base.items() if k != "search"}
    (run_dir / "config.json").write_text(json.dumps({**cfg, "algorithm": "gas", "alpha": 0.1}))
    pd.DataFrame([row("fsl_sage", 0.1, 0, t) for t in (1, 2)]).to_parquet(
        run_dir / "metrics.parquet")  # fmt: skip
    out = tmp_path / "compare"
    code = ("import sys; from fslsage import report; "
            f"rc = report.main([{str(tmp_path / 'results')!r}, '--out', {str(out)!r}]); "
            "assert 'ray' not in sys.modules and 'mlflow' not in sys.modules, 'imported'; "
            "sys.exit(rc)")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(out / "summary.csv")
    assert table.source.value_counts().to_dict() == {"fixture": 9, "single": 1}
    gas = table[table.source == "single"].iloc[0]
    assert gas.status == "interrupted" and gas.rounds == 2  # a run without its summary.csv
    curves = pd.read_csv(out / "acc_vs_comm.csv")
    assert set(curves[curves.alpha == 0.1].curve) == {"FedAvg", "FSL-SAGE", "GAS"}
    assert "| digits | 0.1 | GAS | 1 |" in proc.stdout


def test_a_folder_without_results_is_one_line_exit_2(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fslsage: config error: ") and err.count("\n") == 1
    assert "metrics.parquet" in err
