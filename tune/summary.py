"""A sweep's result files, rebuilt from the Tune results of this sweep alone on every finish.

Tune's per-trial logs may hold a round twice (a trial restarted after its last checkpoint logs
the rounds since again); the tables keep the last row per (trial, round). Files are rewritten
atomically, so readers see the previous complete set or the new one, never a mix.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from fslsage.config import Config
from fslsage.experiment import METRIC_COLUMNS
from fslsage.plots import plot_acc_vs_alpha, plot_acc_vs_comm
from fslsage.results import write_csv_atomic, write_parquet_atomic
from tune.space import trial_config, trial_label
from tune.tracking import error_reason

ID_COLUMNS = ["trial", "trial_id", "algorithm", "alpha"]
SUMMARY_COLUMNS = [
    "status", "rounds", "final_acc", "best_acc", "acc_at_budget", "gib_to_target",
    "sim_s_to_target", "comm_gib", "sim_time_s", "wall_s", "error",
]  # fmt: skip


def _cell(value: Any) -> Any:
    """Parquet/CSV-friendly: blocks (model_args, ...) as JSON text."""
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value


def trial_metrics(frame: pd.DataFrame | None) -> pd.DataFrame:
    """Tune's logged rows of one trial → one row per round, last report wins."""
    if frame is None or frame.empty or "round" not in frame:
        return pd.DataFrame(columns=METRIC_COLUMNS)
    columns = [c for c in [*METRIC_COLUMNS, "align_loss"] if c in frame]
    rows = frame[columns].dropna(subset=["round"]).astype({"round": int})
    return rows.drop_duplicates("round", keep="last").sort_values("round").reset_index(drop=True)


def trial_summary(cfg: Config, rows: pd.DataFrame) -> dict[str, Any]:
    """Final and best accuracy, accuracy when the budget is spent (the last round within it)
    and the GiB and simulated seconds at which `target_acc` was first reached (NaN: never)."""
    nan = float("nan")
    if rows.empty:
        return {"rounds": 0, "final_acc": nan, "best_acc": nan, "acc_at_budget": nan,
                "gib_to_target": nan, "sim_s_to_target": nan, "comm_gib": nan,
                "sim_time_s": nan, "wall_s": nan}  # fmt: skip
    within = rows[rows.comm_gib <= cfg.comm_budget_gib]
    reached = rows[rows.test_acc >= cfg.target_acc]
    return {
        "rounds": int(rows["round"].iloc[-1]),
        "final_acc": float(rows.test_acc.iloc[-1]),
        "best_acc": float(rows.test_acc.max()),
        "acc_at_budget": float(within.test_acc.iloc[-1]) if len(within) else nan,
        "gib_to_target": float(reached.comm_gib.iloc[0]) if len(reached) else nan,
        "sim_s_to_target": float(reached.sim_time_s.iloc[0]) if len(reached) else nan,
        "comm_gib": float(rows.comm_gib.iloc[-1]),
        "sim_time_s": float(rows.sim_time_s.iloc[-1]),
        "wall_s": float(rows.wall_s.iloc[-1]),
    }


def _status(cfg: Config, stats: dict[str, Any], error: str, interrupted: bool) -> str:
    if error:
        return "failed"
    done = stats["rounds"] >= cfg.rounds or stats["comm_gib"] >= cfg.comm_budget_gib
    if done:
        return "finished"
    return "unfinished" if interrupted else "stopped"  # stopped: cut by the scheduler


def collect(grid: Any, base: dict[str, Any], keys: list[str],
            interrupted: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:  # fmt: skip
    """(metrics: one row per trial × round, summary: one row per trial) from a ResultGrid.
    Trial directories are named by trial id (see fslsage.sweep), which keys both tables."""
    metrics, summary = [], []
    results = sorted(grid, key=lambda r: Path(r.path).name)
    configs = [trial_config(base, r.config or {}) for r in results]
    labels = _unique(
        [trial_label(r.config or {}, keys) or Path(r.path).name for r in results],
        [c.algorithm for c in configs],
    )
    for result, cfg, label in zip(results, configs, labels, strict=True):
        ids = {"trial": label, "trial_id": Path(result.path).name, "algorithm": cfg.algorithm,
               "alpha": cfg.alpha}  # fmt: skip
        ids.update({k: _cell(getattr(cfg, k)) for k in keys if k not in ids})
        rows = trial_metrics(result.metrics_dataframe)
        metrics.append(rows.assign(**ids)[[*ids, *rows.columns]])
        error = error_reason(result.error) if result.error else ""
        stats = trial_summary(cfg, rows)
        summary.append({**ids, **stats, "status": _status(cfg, stats, error, interrupted),
                        "error": error})  # fmt: skip
    id_columns = [*ID_COLUMNS, *(k for k in keys if k not in ID_COLUMNS)]
    metrics_df = (
        pd.concat(metrics, ignore_index=True) if metrics else pd.DataFrame(columns=id_columns)
    )
    summary_df = pd.DataFrame(summary, columns=[*id_columns, *SUMMARY_COLUMNS])
    return metrics_df, summary_df


def _unique(labels: list[str], algorithms: list[str]) -> list[str]:
    """Labels repeat when num_samples > 1 draws the same values: number the repeats (per
    algorithm, since plots and tables show the algorithm next to the label)."""
    seen: dict[tuple[str, str], int] = {}
    out = []
    for label, algorithm in zip(labels, algorithms, strict=True):
        n = seen[label, algorithm] = seen.get((label, algorithm), 0) + 1
        out.append(label if n == 1 else f"{label} #{n}")
    return out


def write_results(out: Path, metrics: pd.DataFrame, summary: pd.DataFrame,
                  title: str) -> list[Path]:  # fmt: skip
    """metrics.parquet, summary.csv, acc_vs_comm.png, acc_vs_time.png (simulated time) and,
    when alpha varies, acc_vs_alpha.png; a plot with nothing to show is removed rather than left
    from an earlier run."""
    written = [write_parquet_atomic(metrics, out / "metrics.parquet"),
               write_csv_atomic(summary, out / "summary.csv")]  # fmt: skip
    for x, png in (("comm_gib", out / "acc_vs_comm.png"), ("sim_time_s", out / "acc_vs_time.png")):
        if len(metrics):
            written.append(plot_acc_vs_comm(metrics, png, title=title, x=x))
        else:
            png.unlink(missing_ok=True)
    alpha_png = out / "acc_vs_alpha.png"
    ok = summary[summary.final_acc.notna()]
    if ok.alpha.nunique() > 1:
        written.append(plot_acc_vs_alpha(ok, alpha_png))
    else:
        alpha_png.unlink(missing_ok=True)
    return written


def format_table(summary: pd.DataFrame) -> str:
    """The summary as printed at the end of a sweep (errors shortened to fit a line)."""
    shown = summary.drop(columns=["trial_id"]).copy()
    shown["error"] = shown["error"].map(lambda e: e if len(e) <= 60 else e[:57] + "...")

    def number(v: float) -> str:
        return "nan" if isinstance(v, float) and math.isnan(v) else f"{v:.4f}"

    return shown.to_string(index=False, float_format=number)
