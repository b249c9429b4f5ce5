"""The figures, checked by the data they draw: seeds as mean ± std on a common GiB grid, the
log axis where the data spans more than two decades, the partition picture."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from fslsage import plots

PNG = b"\x89PNG\r\n\x1a\n"


def rows(trial: str, xs: list[float], ys: list[float], **ids) -> pd.DataFrame:
    return pd.DataFrame({"trial_id": trial, "round": range(1, len(xs) + 1), "comm_gib": xs,
                         "test_acc": ys, **ids})  # fmt: skip


def test_two_seeds_are_drawn_as_their_mean_and_std_on_a_common_gib_grid():
    """Seed A at 1, 2, 3 GiB and seed B at 1.5, 2.5, 3.5 GiB: both are interpolated on the
    GiB values in the range both cover (1.5, 2, 2.5, 3); the curve is their mean there and the
    band their sample standard deviation, |a − b| / √2 for two seeds."""
    ids = {"dataset": "digits", "alpha": 0.1, "curve": "FSL-SAGE"}
    metrics = pd.concat([rows("a", [1, 2, 3], [0.2, 0.4, 0.6], **ids),
                         rows("b", [1.5, 2.5, 3.5], [0.1, 0.5, 0.9], **ids)])  # fmt: skip
    series = plots.mean_std_series(metrics, "comm_gib")
    a = np.array([0.3, 0.4, 0.5, 0.6])  # seed A at 1.5, 2, 2.5, 3 (by hand)
    b = np.array([0.1, 0.3, 0.5, 0.7])  # seed B there
    assert series["comm_gib"].tolist() == [1.5, 2.0, 2.5, 3.0]
    assert series["mean"].to_numpy() == pytest.approx((a + b) / 2)
    assert series["std"].to_numpy() == pytest.approx(np.abs(a - b) / math.sqrt(2))
    assert (series["seeds"] == 2).all()


def test_seeds_on_the_same_rounds_are_the_plain_mean_and_std_of_their_rows(tmp_path):
    """Two panels (alpha), two curves; seeds that spent the same GiB per round (the usual case):
    the drawn series, saved next to the PNG, are the per-round mean and std of the rows."""
    parts = []
    rng = np.random.default_rng(0)
    for alpha in (0.1, 1.0):
        for curve, gib in (("FedAvg", 0.5), ("FSL-SAGE", 0.1)):
            for seed in (0, 1):
                ys = rng.uniform(0.1, 0.9, 4).round(3).tolist()
                parts.append(rows(f"{curve}{alpha}{seed}", [gib * t for t in range(1, 5)], ys,
                                  dataset="digits", alpha=alpha, curve=curve))  # fmt: skip
    metrics = pd.concat(parts, ignore_index=True)
    png = tmp_path / "acc_vs_comm.png"
    drawn = plots.plot_curves(plots.mean_std_series(metrics, "comm_gib"), png)
    assert png.read_bytes()[:8] == PNG
    saved = pd.read_csv(tmp_path / "acc_vs_comm.csv")
    pd.testing.assert_frame_equal(saved, drawn.reset_index(drop=True), check_dtype=False)
    expected = metrics.groupby(["alpha", "curve", "round"]).test_acc.agg(["mean", "std"])
    got = saved.assign(round=saved.groupby(["alpha", "curve"]).cumcount() + 1)
    got = got.set_index(["alpha", "curve", "round"]).sort_index()
    assert got["mean"].to_numpy() == pytest.approx(expected["mean"].to_numpy())
    assert got["std"].to_numpy() == pytest.approx(expected["std"].to_numpy())


def test_the_gib_axis_is_logarithmic_exactly_where_the_data_spans_more_than_two_decades(
    tmp_path,
):
    assert plots.x_scale([0.01, 0.5, 1.0]) == "linear"  # exactly two decades
    assert plots.x_scale([0.01, 1.001]) == "log"
    assert plots.x_scale([0.0, 0.002, 0.1]) == "linear"  # zero is not on a log axis
    assert plots.x_scale([0.01, 0.5], "log") == "log"
    assert plots.x_scale([0.001, 10.0], "linear") == "linear"
    ids = {"dataset": "digits", "curve": "FedAvg"}
    metrics = pd.concat(
        [
            rows("narrow", [0.01, 0.2, 1.0], [0.1, 0.2, 0.3], alpha=0.1, **ids),
            rows("wide", [0.001, 0.1, 1.0], [0.1, 0.2, 0.3], alpha=1.0, **ids),
        ]
    )
    series = plots.mean_std_series(metrics, "comm_gib")
    by_panel = plots.plot_curves(series, tmp_path / "a.png").groupby("alpha").x_scale.unique()
    assert by_panel.to_dict() == {0.1: ["linear"], 1.0: ["log"]}
    forced = plots.plot_curves(series, tmp_path / "b.png", scale="linear")
    assert set(forced.x_scale) == {"linear"}
    assert set(pd.read_csv(tmp_path / "b.csv").x_scale) == {"linear"}


def test_accuracy_against_alpha_and_the_partition_are_drawn(tmp_path):
    points = pd.DataFrame(
        {
            "dataset": "digits",
            "curve": ["FedAvg", "FedAvg", "GAS", "GAS"],
            "alpha": [0.1, 1.0, 0.1, 1.0],
            "mean": [0.5, 0.8, 0.6, 0.9],
            "std": [0.01, float("nan"), 0.02, 0.0],
            "seeds": [2, 1, 2, 2],
        }
    )
    plots.plot_acc_vs_alpha(points, tmp_path / "alpha.png")
    assert (tmp_path / "alpha.png").read_bytes()[:8] == PNG
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "alpha.csv"), points)
    hist = pd.DataFrame({"client": range(12), **{str(k): np.arange(12) * k for k in range(10)}})
    plots.plot_partition(hist, tmp_path / "partition.png", title="dirichlet")
    assert (tmp_path / "partition.png").read_bytes()[:8] == PNG
