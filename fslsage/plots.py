"""Result plots: accuracy against communication (the paper's figure), against simulated time
(SPEC §6) and against alpha."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers or CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from fslsage.results import write_atomic  # noqa: E402

PAPER_LABELS = {
    "fsl_sage": "FSL-SAGE",
    "cse_fsl": "CSE-FSL",
    "splitfed_v1": "SplitFed-MS",
    "splitfed_v2": "SplitFed-SS",
    "fedavg": "FedAvg",
    "sl": "SL",
    "gas": "GAS",
}


X_LABELS = {"comm_gib": "communication (GiB)", "sim_time_s": "simulated time (s)"}


def plot_acc_vs_comm(
    metrics: pd.DataFrame, path: str | Path, title: str = "", x: str = "comm_gib"
) -> Path:
    """One curve per algorithm (per trial when several share an algorithm): test accuracy
    against cumulative communication in GiB (or another cumulative column `x`, such as
    `sim_time_s`)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    group_keys = ["algorithm"] + (["trial"] if "trial" in metrics else [])
    for key, run in metrics.sort_values("round").groupby(group_keys, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        label = PAPER_LABELS.get(key[0], key[0])
        if len(key) > 1 and metrics.groupby("algorithm")["trial"].nunique()[key[0]] > 1:
            label = f"{label} ({key[1]})"
        ax.plot(run[x], run.test_acc, marker=".", label=label)
    ax.set_xlabel(X_LABELS.get(x, x))
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    return _save(fig, ax, path)


def plot_acc_vs_alpha(summary: pd.DataFrame, path: str | Path, column: str = "final_acc") -> Path:
    """Final accuracy against the Dirichlet alpha, one line per algorithm (log x axis)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for algorithm, rows in summary.sort_values("alpha").groupby("algorithm"):
        means = rows.groupby("alpha")[column].mean()
        ax.plot(means.index, means.values, marker="o", label=PAPER_LABELS.get(algorithm, algorithm))
    ax.set_xscale("log")
    ax.set_xlabel("alpha (lower = more heterogeneous)")
    ax.set_ylabel(column.replace("_", " "))
    return _save(fig, ax, path)


def _save(fig, ax, path: str | Path) -> Path:
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    out = write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return out
