"""Result figures as the papers draw them: accuracy against communication (and against simulated
time, SPEC §6) with one panel per dataset × alpha and one curve per algorithm, repeated seeds as
their mean with a ±1 standard-deviation band; accuracy against alpha; a run's partition.

Every curve figure also writes the series it draws to a CSV next to its PNG (same name), so the
figures can be checked, and redrawn elsewhere, by their data.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers or CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from fslsage.results import write_atomic, write_csv_atomic  # noqa: E402

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
LOG_DECADES = 2  # an axis whose data spans more than this many decades is drawn logarithmic
PANEL_KEYS = ["dataset", "alpha"]  # one panel per dataset × alpha
SERIES_COLUMNS = ["mean", "std", "seeds"]


def curve_order(label: str) -> tuple[int, str]:
    """Curves in the papers' order of algorithms (then by name)."""
    names = list(PAPER_LABELS.values())
    head = next((i for i, n in enumerate(names) if label == n or label.startswith(n + " ")),
                len(names))  # fmt: skip
    return head, label


def x_scale(values: Sequence[float] | np.ndarray, option: str = "auto") -> str:
    """The axis scale, "log" or "linear": `option` unless it is "auto"; then log exactly where
    the positive values span more than LOG_DECADES decades (largest / smallest >
    10**LOG_DECADES)."""
    if option in ("log", "linear"):
        return option
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    if not len(v):
        return "linear"
    return "log" if v.max() / v.min() > 10**LOG_DECADES else "linear"


def seed_band(runs: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, ...]:
    """(grid, mean, std) of several runs' curves y(x), aligned on x: each run's curve is
    interpolated linearly on the union of the runs' x values within the range every run
    covers (none is extrapolated). std is the sample standard deviation (ddof 1), 0 for a
    single run. Each run's x must be increasing (cumulative GiB or seconds are)."""
    runs = [(np.asarray(x, float), np.asarray(y, float)) for x, y in runs if len(x)]
    if not runs:
        return np.array([]), np.array([]), np.array([])
    lo, hi = max(x[0] for x, _ in runs), min(x[-1] for x, _ in runs)
    grid = np.unique(np.concatenate([x[(x >= lo) & (x <= hi)] for x, _ in runs]))
    ys = np.stack([np.interp(grid, x, y) for x, y in runs])
    std = ys.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros(len(grid))
    return grid, ys.mean(axis=0), std


def mean_std_series(metrics: pd.DataFrame, x: str, y: str = "test_acc",
                    panel_keys: Sequence[str] = PANEL_KEYS, curve: str = "curve",
                    run: str = "trial_id") -> pd.DataFrame:  # fmt: skip
    """The curves a figure draws: per panel and curve, `y` against `x` as the mean and std
    over the curve's runs (`seed_band`). `metrics` holds one row per run × round; returns one
    row per panel × curve × grid point: (*panel_keys, curve, x, mean, std, seeds)."""
    out = []
    keys = [*panel_keys, curve]
    for key, group in metrics.dropna(subset=[x, y]).groupby(keys, sort=True):
        runs = [(r[x].to_numpy(), r[y].to_numpy())
                for _, r in group.sort_values(["round"]).groupby(run, sort=True)]  # fmt: skip
        grid, mean, std = seed_band(runs)
        frame = pd.DataFrame({x: grid, "mean": mean, "std": std, "seeds": len(runs)})
        out.append(frame.assign(**dict(zip(keys, key, strict=True)))[[*keys, x, *SERIES_COLUMNS]])
    if not out:
        return pd.DataFrame(columns=[*keys, x, *SERIES_COLUMNS])
    return pd.concat(out, ignore_index=True)


def _panel_title(keys: Sequence[str], values: Sequence) -> str:
    parts = [f"α = {v:g}" if k == "alpha" else f"{k} = {v}" if k != "dataset" else str(v)
             for k, v in zip(keys, values, strict=True)]  # fmt: skip
    return ", ".join(parts)


def _grid(series: pd.DataFrame, panel_keys: Sequence[str]) -> dict[tuple, tuple[int, int]]:
    """Each panel's (row, column): a row per value of the first key (dataset), a column per
    value of the second (alpha)."""
    panels = sorted({tuple(r) for r in series[list(panel_keys)].itertuples(index=False)})
    rows = {v: i for i, v in enumerate(sorted({p[0] for p in panels}))}
    cols = {v: i for i, v in enumerate(sorted({p[-1] for p in panels}))}
    return {p: (rows[p[0]], cols[p[-1]]) for p in panels}


def _colors(curves: Sequence[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10" if len(curves) <= 10 else "tab20")
    return {c: cmap(i % cmap.N) for i, c in enumerate(sorted(curves, key=curve_order))}


def plot_curves(series: pd.DataFrame, path: str | Path, x: str = "comm_gib",
                panel_keys: Sequence[str] = PANEL_KEYS, scale: str = "auto",
                ylabel: str = "test accuracy", title: str = "",
                marks: dict[tuple, float] | None = None) -> pd.DataFrame:  # fmt: skip
    """Draws `mean_std_series` output: a panel per dataset × alpha, a curve per algorithm, the
    ±1 std band where a curve has several seeds; each panel's x axis `x_scale(scale)` of its
    own data; `marks` ({panel: x}) a dotted vertical line per panel (the common budget).
    Writes PATH (PNG) and the series with each panel's `x_scale` as PATH.csv; returns it."""
    path = Path(path)
    series = series.copy()
    series["x_scale"] = ""
    place = _grid(series, panel_keys)
    rows = 1 + max((r for r, _ in place.values()), default=0)
    cols = 1 + max((c for _, c in place.values()), default=0)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols + 1.6, 3.4 * rows + 0.6),
                             squeeze=False, sharey=True)  # fmt: skip
    colors = _colors(series["curve"].unique().tolist())
    for panel, (r, c) in place.items():
        ax = axes[r][c]
        mask = np.ones(len(series), dtype=bool)
        for k, v in zip(panel_keys, panel, strict=True):
            mask &= (series[k] == v).to_numpy()
        data = series[mask]
        for label in sorted(data["curve"].unique(), key=curve_order):
            line = data[data["curve"] == label]
            marker = "." if len(line) <= 40 else None  # few points: show where they are
            ax.plot(line[x], line["mean"], color=colors[label], label=label, lw=1.6,
                    marker=marker, ms=4)  # fmt: skip
            if (line["seeds"] > 1).any():
                ax.fill_between(line[x], line["mean"] - line["std"], line["mean"] + line["std"],
                                color=colors[label], alpha=0.2, lw=0)  # fmt: skip
        mark = (marks or {}).get(panel)
        if mark is not None and np.isfinite(mark):
            ax.axvline(mark, color="0.4", ls=":", lw=1.2, label="common budget")
        scale_here = x_scale(data[x], scale)
        series.loc[mask, "x_scale"] = scale_here
        ax.set_xscale(scale_here)
        ax.set_title(_panel_title(panel_keys, panel), fontsize="medium")
        ax.set_xlabel(X_LABELS.get(x, x))
        ax.grid(alpha=0.3, which="both" if scale_here == "log" else "major")
        if c == 0:
            ax.set_ylabel(ylabel)
    for r in range(rows):
        for c in range(cols):
            if (r, c) not in place.values():
                axes[r][c].set_visible(False)
    seeds = int(series["seeds"].max()) if len(series) else 0
    note = "mean ± 1 std over seeds" if seeds > 1 else ""
    fig.suptitle(" — ".join(p for p in (title, note) if p), fontsize="medium")
    _legend(fig, axes)
    _save_figure(fig, path)
    write_csv_atomic(series, path.with_suffix(".csv"))
    return series


def plot_acc_vs_alpha(points: pd.DataFrame, path: str | Path,
                      ylabel: str = "best test accuracy\nwithin the common budget",
                      title: str = "") -> pd.DataFrame:  # fmt: skip
    """Accuracy against the Dirichlet alpha (log axis), a panel per dataset, a line per curve
    with ±1 std error bars. `points`: (dataset, curve, alpha, mean, std, seeds, ...), written
    as PATH.csv; returns it."""
    path = Path(path)
    datasets = sorted(points["dataset"].unique())
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.8 * len(datasets) + 1.6, 3.6),
                             squeeze=False, sharey=True)  # fmt: skip
    colors = _colors(points["curve"].unique().tolist())
    for ax, dataset in zip(axes[0], datasets, strict=True):
        data = points[points["dataset"] == dataset]
        for label in sorted(data["curve"].unique(), key=curve_order):
            line = data[data["curve"] == label].sort_values("alpha")
            ax.errorbar(line["alpha"], line["mean"], yerr=line["std"].fillna(0), marker="o",
                        capsize=3, color=colors[label], label=label)  # fmt: skip
        ax.set_xscale("log")
        alphas = sorted(data["alpha"].unique())
        ax.set_xticks(alphas, [f"{a:g}" for a in alphas])
        ax.minorticks_off()
        ax.set_title(str(dataset), fontsize="medium")
        ax.set_xlabel("alpha (lower = more heterogeneous)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    fig.suptitle(title, fontsize="medium")
    _legend(fig, axes)
    _save_figure(fig, path)
    write_csv_atomic(points, path.with_suffix(".csv"))
    return points


def plot_partition(histogram: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """Per-client label histogram as stacked bars (partition.csv: a `client` column, then one
    column of sample counts per label)."""
    counts = histogram.drop(columns=["client"], errors="ignore")
    clients = histogram["client"] if "client" in histogram else pd.Series(range(len(histogram)))
    labels = list(counts.columns)
    width = min(max(6.0, 0.22 * len(clients) + 2.5), 24.0)
    fig, ax = plt.subplots(figsize=(width, 3.8))
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20" if len(labels) <= 20
                        else "viridis")  # fmt: skip
    bottom = np.zeros(len(clients))
    for i, label in enumerate(labels):
        color = cmap(i % cmap.N) if len(labels) <= 20 else cmap(i / max(len(labels) - 1, 1))
        values = counts[label].to_numpy(dtype=float)
        ax.bar(np.arange(len(clients)), values, bottom=bottom, color=color, label=str(label),
               width=0.85)  # fmt: skip
        bottom += values
    step = max(1, len(clients) // 25)
    ax.set_xticks(np.arange(len(clients))[::step], [str(c) for c in clients][::step])
    ax.set_xlabel("client")
    ax.set_ylabel("training samples")
    ax.set_title(title, fontsize="medium")
    ax.grid(alpha=0.3, axis="y")
    if len(labels) <= 20:
        ax.legend(title="label", fontsize="x-small", title_fontsize="small", ncol=1 + len(labels)
                  // 11, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # fmt: skip
    return _save_figure(fig, path)


def _legend(fig, axes) -> None:
    handles: dict[str, object] = {}
    for ax in np.ravel(axes):
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="center left",
                   bbox_to_anchor=(1.0, 0.5), fontsize="small", frameon=False)  # fmt: skip


def _save_figure(fig, path: str | Path) -> Path:
    fig.tight_layout()
    out = write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120,
                                                     bbox_inches="tight"))  # fmt: skip
    plt.close(fig)
    return out
