"""`make demo`'s entry point end to end: the demo sweep, one round per trial to keep it quick."""

from __future__ import annotations

import pandas as pd

from fslsage import demo

DEMO_ALGORITHMS = ["cse_fsl", "fedavg", "fsl_sage", "splitfed_v2"]


def test_demo_sweep_writes_table_metrics_and_plots(ray_session, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert demo.main(["--set", "rounds=1", "--results-dir", str(tmp_path)]) == 0
    out = tmp_path / "demo_sweep"
    metrics = pd.read_parquet(out / "metrics.parquet")
    assert sorted(metrics.algorithm.unique()) == DEMO_ALGORITHMS
    assert sorted(metrics.alpha.unique()) == [0.1, 1.0] and len(metrics) == 8
    assert (metrics.comm_gib > 0).all()
    for name in ("acc_vs_comm.png", "acc_vs_alpha.png"):
        png = (out / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    printed = capsys.readouterr().out
    for algorithm in DEMO_ALGORITHMS:
        assert algorithm in printed
    assert "final_acc" in printed and "demo finished" in printed
    assert f"sqlite:///{tmp_path}/mlflow.db" in printed


def test_demo_rejects_a_bad_override(capsys):
    assert demo.main(["--set", "rounds=zero"]) == 2
    assert "rounds" in capsys.readouterr().err
