"""`make demo`'s entry point end to end (one round per algorithm to keep it quick)."""

from __future__ import annotations

import pandas as pd
from helpers import DEMO

from fslsage import demo
from fslsage.algorithms import ALGORITHMS


def test_demo_writes_table_metrics_and_plot(tmp_path, capsys):
    assert demo.main(["--config", str(DEMO), "--set", "rounds=1", "--out", str(tmp_path)]) == 0
    metrics = pd.read_parquet(tmp_path / "metrics.parquet")
    assert sorted(metrics.algorithm.unique()) == ALGORITHMS.names()
    assert (metrics.comm_gib > 0).all()
    png = (tmp_path / "acc_vs_comm.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    out = capsys.readouterr().out
    for algorithm in ALGORITHMS.names():
        assert algorithm in out
    assert "demo finished" in out


def test_demo_rejects_a_bad_override(capsys):
    assert demo.main(["--config", str(DEMO), "--set", "rounds=zero"]) == 2
    assert "rounds" in capsys.readouterr().err
