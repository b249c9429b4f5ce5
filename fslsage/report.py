"""`python -m fslsage.report DIR [DIR ...] [--out OUT] [--x-scale auto|log|linear]`

Rebuilds the summary tables and every figure from the metrics.parquet of one or more sweeps or
runs (results copied back from a cluster, or several sweeps compared), without Ray or MLflow.

A DIR is a sweep's folder (metrics.parquet with a `trial_id` column, summary.csv, sweep.json,
a folder per trial with its config.json and partition.csv), a run's folder (metrics.parquet,
config.json, partition.csv) or a folder holding such folders. The sweep (tune/summary.py) and
`fslsage.run` write their own results with the same functions, so a report on one sweep
reproduces that sweep's summary.csv.

What it writes to OUT (default: the DIR itself when there is one, else DIR/../report):
- summary.csv: a row per trial (run): final and best accuracy, accuracy when its own budget is
  spent, the panel's common budget (the smallest final GiB among the algorithms of a dataset ×
  alpha) and the best accuracy within it, GiB and simulated seconds to `target_acc`, status.
- summary_seeds.csv and summary.md: per dataset × alpha × algorithm (× any other key that
  varies), mean ± std over seeds of those numbers, and how many seeds reached the target.
- acc_vs_comm.png, acc_vs_time.png (a panel per dataset × alpha, a curve per algorithm, seeds
  as mean ± 1 std) and acc_vs_alpha.png where alpha varies, each with the CSV of what it draws.
- the partition picture of every run (its partition.png, or OUT/partitions/<trial id>.png).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fslsage.config import Config, ConfigError, flatten, validate
from fslsage.results import write_atomic, write_csv_atomic, write_parquet_atomic

METRICS_FILE, SUMMARY_FILE, CONFIG_FILE = "metrics.parquet", "summary.csv", "config.json"
PARTITION_FILE, PARTITION_PNG = "partition.csv", "partition.png"
SWEEP_STATE = "sweep.json"  # fslsage.sweep's saved state: the sweep's config as given

ID_COLUMNS = ["trial", "trial_id", "algorithm", "alpha"]
SUMMARY_COLUMNS = [
    "status", "rounds", "final_acc", "best_acc", "acc_at_budget", "common_budget_gib",
    "acc_at_common_budget", "gib_to_target", "sim_s_to_target", "comm_gib", "sim_time_s",
    "wall_s", "error",
]  # fmt: skip
# keys that say how or where a run computed, not what: runs that differ only in them (and in
# `seed`) are repetitions of one experiment
NOT_A_VARIANT = {
    "name", "seed", "data_dir", "download", "device", "runtime", "threads", "deterministic",
    "checkpoint_every", "checkpoint_minutes", "plot_x_scale", "num_client_actors", "client_cpus",
    "client_gpus", "server_gpus", "server_accelerator", "gradient_store", "gradient_store_path",
    "offload_client_state", "eval_batch_size", "max_batch", "max_wait_ms", "dataset",
    "alpha", "algorithm",
}  # fmt: skip
FIGURES = {"comm_gib": "acc_vs_comm.png", "sim_time_s": "acc_vs_time.png"}
ALPHA_FIGURE = "acc_vs_alpha.png"
SEED_STATS = ["final_acc", "best_acc", "acc_at_common_budget", "gib_to_target", "sim_s_to_target"]


class WriteFailed(Exception):
    """A result file could not be written; the previous one is left as it was."""

    def __init__(self, path: Path, error: OSError):
        super().__init__(f"could not write {path}: {error.strerror or error}")
        self.path, self.error = path, error


def write_file(path: Path, write: Callable[[Path], Any]) -> Path:
    """write(path), an OSError (a full disk) raised as WriteFailed naming the file; the atomic
    writers leave the previous file and no temp file."""
    try:
        write(path)
    except OSError as e:
        raise WriteFailed(path, e) from e
    return path


# --- one trial's numbers ----------------------------------------------------------------------


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


def trial_status(cfg: Config, stats: dict[str, Any], error: str, interrupted: bool) -> str:
    """failed (an error), finished (its rounds or its budget spent), else interrupted (Ctrl+C
    or a lost process: it can go on) or stopped (cut short by the scheduler)."""
    if error:
        return "failed"
    done = stats["rounds"] >= cfg.rounds or stats["comm_gib"] >= cfg.comm_budget_gib
    if done:
        return "finished"
    return "interrupted" if interrupted else "stopped"


def cell(value: Any) -> Any:
    """Parquet/CSV-friendly: blocks (model_args, ...) as JSON text."""
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value


def trial_ids(label: str, trial_id: str, cfg: Config, keys: Iterable[str]) -> dict[str, Any]:
    """The identifying columns of a trial's rows in metrics.parquet and summary.csv."""
    ids = {"trial": label, "trial_id": trial_id, "algorithm": cfg.algorithm, "alpha": cfg.alpha}
    ids.update({k: cell(getattr(cfg, k)) for k in keys if k not in ids})
    return ids


# --- panels, curves and the common budget --------------------------------------------------


def _value(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def variant_keys(configs: dict[str, Config]) -> list[str]:
    """The config keys (flattened) that take different values among runs of the same dataset,
    alpha and algorithm, other than the seed and how the runs computed: each value is a curve of
    its own; runs that differ in nothing else are seeds of one curve."""
    flat = {tid: flatten(cfg.to_dict()) for tid, cfg in configs.items()}
    groups: dict[tuple, list[str]] = {}
    for tid, cfg in configs.items():
        groups.setdefault((cfg.dataset, cfg.alpha, cfg.algorithm), []).append(tid)
    keys: list[str] = []
    for k in dict.fromkeys(k for f in flat.values() for k in f):
        if k.split(".")[0] in NOT_A_VARIANT or k.split(".")[0] == "search":
            continue
        for members in groups.values():
            if len({json.dumps(flat[t].get(k), sort_keys=True, default=str)
                    for t in members}) > 1:  # fmt: skip
                keys.append(k)
                break
    return keys


def curve_labels(configs: dict[str, Config]) -> dict[str, str]:
    """A curve's name per trial: the algorithm as the papers name it, and the values of the
    variant keys (`FSL-SAGE (lr=0.001)`)."""
    from fslsage.plots import PAPER_LABELS

    keys = variant_keys(configs)
    labels = {}
    for tid, cfg in configs.items():
        flat = flatten(cfg.to_dict())
        name = PAPER_LABELS.get(cfg.algorithm, cfg.algorithm)
        extra = ", ".join(f"{k}={_value(flat.get(k))}" for k in keys)
        labels[tid] = f"{name} ({extra})" if extra else name
    return labels


def trial_frame(configs: dict[str, Config]) -> pd.DataFrame:
    """Per trial id: dataset, alpha, algorithm, curve (the panel and curve it is drawn in)."""
    labels = curve_labels(configs)
    rows = [{"trial_id": tid, "dataset": cfg.dataset, "alpha": cfg.alpha,
             "algorithm": cfg.algorithm, "curve": labels[tid], "target_acc": cfg.target_acc}
            for tid, cfg in configs.items()]  # fmt: skip
    return pd.DataFrame(rows, columns=["trial_id", "dataset", "alpha", "algorithm", "curve",
                                       "target_acc"])  # fmt: skip


def add_common_budget(summary: pd.DataFrame, metrics: pd.DataFrame,
                      configs: dict[str, Config]) -> pd.DataFrame:  # fmt: skip
    """Fills `common_budget_gib` (per dataset × alpha: the smallest, among its algorithms, of
    an algorithm's largest final GiB over its runs that did not fail) and
    `acc_at_common_budget` (a run's best test accuracy within it; NaN where its first round
    already spent more)."""
    summary = summary.copy()
    info = trial_frame(configs).set_index("trial_id")
    ok = summary[(summary.status != "failed") & summary.comm_gib.notna()]
    ok = ok.assign(dataset=ok.trial_id.map(info.dataset), panel_alpha=ok.trial_id.map(info.alpha))
    final = ok.groupby(["dataset", "panel_alpha", "algorithm"]).comm_gib.max()
    budget = final.groupby(level=["dataset", "panel_alpha"]).min()
    by_trial = {
        tid: budget.get((info.dataset[tid], info.alpha[tid]), float("nan"))
        for tid in summary.trial_id
    }
    summary["common_budget_gib"] = summary.trial_id.map(by_trial).astype(float)
    best = {}
    for tid, rows in metrics.groupby("trial_id"):
        limit = by_trial.get(tid, float("nan"))
        within = rows.test_acc[rows.comm_gib <= limit * (1 + 1e-9)]
        best[tid] = float(within.max()) if len(within) else float("nan")
    summary["acc_at_common_budget"] = summary.trial_id.map(best).astype(float)
    return summary


def seed_summary(summary: pd.DataFrame, configs: dict[str, Config]) -> pd.DataFrame:
    """Per dataset × alpha × curve: mean and std (ddof 1) over the seeds that did not fail of
    SEED_STATS (times to target over the seeds that reached it), how many seeds, how many
    reached `target_acc` and how many failed."""
    info = trial_frame(configs).set_index("trial_id")
    table = summary.assign(dataset=summary.trial_id.map(info.dataset),
                           curve=summary.trial_id.map(info.curve),
                           target_acc=summary.trial_id.map(info.target_acc),
                           panel_alpha=summary.trial_id.map(info.alpha))  # fmt: skip
    out = []
    keys = ["dataset", "panel_alpha", "curve"]
    for (dataset, alpha, curve), group in table.groupby(keys, sort=True):
        ok = group[(group.status != "failed") & (group.rounds > 0)]
        row: dict[str, Any] = {"dataset": dataset, "alpha": alpha,
                               "algorithm": group.algorithm.iloc[0], "curve": curve,
                               "seeds": len(ok), "failed": int((group.status == "failed").sum()),
                               "target_acc": group.target_acc.iloc[0],
                               "reached": int(ok.gib_to_target.notna().sum()),
                               "common_budget_gib": group.common_budget_gib.iloc[0]}  # fmt: skip
        for stat in SEED_STATS:
            values = ok[stat].dropna().astype(float)
            row[f"{stat}_mean"] = float(values.mean()) if len(values) else float("nan")
            row[f"{stat}_std"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
        out.append(row)
    columns = ["dataset", "alpha", "algorithm", "curve", "seeds", "failed", "target_acc",
               "reached", "common_budget_gib",
               *(f"{s}_{m}" for s in SEED_STATS for m in ("mean", "std"))]  # fmt: skip
    frame = pd.DataFrame(out, columns=columns)
    from fslsage.plots import curve_order

    order = sorted(
        range(len(frame)),
        key=lambda i: (
            frame.dataset.iloc[i],
            frame.alpha.iloc[i],
            curve_order(frame.curve.iloc[i]),
        ),
    )
    return frame.iloc[order].reset_index(drop=True)


def _mean_std(mean: float, std: float, fmt: str) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    text = format(mean, fmt)
    return text if std is None or math.isnan(std) else f"{text} ± {format(std, fmt)}"


def format_markdown(seeds: pd.DataFrame, title: str = "") -> str:
    """summary.md: the over-seeds table, a row per dataset × alpha × curve."""
    lines = [f"# {title or 'Summary'}", ""]
    lines.append("Mean ± std over seeds (a single seed: its value). *common budget*: per "
                 "dataset × alpha, the smallest final GiB among the algorithms; accuracy there "
                 "is a run's best test accuracy within it. Times to the target accuracy are "
                 "over the seeds that reached it.")  # fmt: skip
    lines += ["", "| dataset | α | algorithm | seeds | final acc | best acc | "
              "acc @ common budget | common budget (GiB) | target | reached | GiB to target | "
              "sim. s to target |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in seeds.itertuples(index=False):
        seeds_text = f"{r.seeds}" + (f" ({r.failed} failed)" if r.failed else "")
        cells = [
            str(r.dataset), f"{r.alpha:g}", str(r.curve), seeds_text,
            _mean_std(r.final_acc_mean, r.final_acc_std, ".4f"),
            _mean_std(r.best_acc_mean, r.best_acc_std, ".4f"),
            _mean_std(r.acc_at_common_budget_mean, r.acc_at_common_budget_std, ".4f"),
            "—" if math.isnan(r.common_budget_gib) else f"{r.common_budget_gib:.4g}",
            f"{r.target_acc:g}", f"{r.reached}/{r.seeds}",
            _mean_std(r.gib_to_target_mean, r.gib_to_target_std, ".4g"),
            _mean_std(r.sim_s_to_target_mean, r.sim_s_to_target_std, ".4g"),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --- the files ---------------------------------------------------------------------------


def resolve_scale(configs: dict[str, Config], option: str | None = None) -> str:
    """--x-scale where given, else the runs' `plot_x_scale` when they agree, else auto."""
    if option:
        return option
    chosen = {cfg.plot_x_scale for cfg in configs.values()}
    return chosen.pop() if len(chosen) == 1 else "auto"


def write_report(out: Path, metrics: pd.DataFrame, summary: pd.DataFrame,
                 configs: dict[str, Config], title: str = "",
                 scale: str | None = None) -> list[Path]:  # fmt: skip
    """summary.csv, summary_seeds.csv, summary.md and the figures with their CSVs; a figure
    with nothing to show is removed rather than left from an earlier run. A file that cannot
    be written raises WriteFailed naming it (the files before it are complete, it is as it
    was). `summary` must have its common budget filled (`add_common_budget`)."""
    from fslsage import plots

    scale = resolve_scale(configs, scale)
    written = [write_file(out / SUMMARY_FILE, lambda p: write_csv_atomic(summary, p))]
    seeds = seed_summary(summary, configs)
    written.append(write_file(out / "summary_seeds.csv", lambda p: write_csv_atomic(seeds, p)))
    md = format_markdown(seeds, title)
    written.append(write_file(out / "summary.md", lambda p: write_text_atomic(p, md)))
    info = trial_frame(configs)
    rows = metrics.drop(columns=[c for c in ("dataset", "curve", "algorithm", "alpha")
                                 if c in metrics]).merge(info, on="trial_id")  # fmt: skip
    budgets = {(d, a): b for d, a, b in zip(seeds.dataset, seeds.alpha, seeds.common_budget_gib,
                                            strict=True)}  # fmt: skip
    for x, name in FIGURES.items():
        png = out / name
        if len(rows):
            series = plots.mean_std_series(rows, x)
            marks = budgets if x == "comm_gib" and seeds.curve.nunique() > 1 else None
            written.append(write_file(png, lambda p, s=series, x=x, m=marks: plots.plot_curves(
                s, p, x=x, scale=scale, title=title, marks=m)))  # fmt: skip
        else:
            _remove(png)
    alpha_png = out / ALPHA_FIGURE
    shown = seeds[seeds.acc_at_common_budget_mean.notna()]
    if shown.groupby("dataset").alpha.nunique().gt(1).any():
        points = shown.rename(columns={"acc_at_common_budget_mean": "mean",
                                       "acc_at_common_budget_std": "std"})  # fmt: skip
        points = points[["dataset", "curve", "alpha", "mean", "std", "seeds",
                         "common_budget_gib"]]  # fmt: skip
        written.append(write_file(alpha_png, lambda p: plots.plot_acc_vs_alpha(
            points, p, title=title)))  # fmt: skip
    else:
        _remove(alpha_png)
    return written


def _remove(png: Path) -> None:
    png.unlink(missing_ok=True)
    png.with_suffix(".csv").unlink(missing_ok=True)


def partition_title(cfg: Config) -> str:
    alpha = f", α = {cfg.alpha:g}" if cfg.partition.startswith("dirichlet") else ""
    return f"{cfg.dataset}: {cfg.partition}{alpha}, {cfg.num_clients} clients (seed {cfg.seed})"


def save_partition_plot(csv: Path, png: Path, cfg: Config) -> Path:
    """The picture of partition.csv: a stacked bar of label counts per client."""
    from fslsage.plots import plot_partition

    hist = pd.read_csv(csv)
    return write_file(png, lambda p: plot_partition(hist, p, title=partition_title(cfg)))


def write_run_files(folder: Path, rows: pd.DataFrame, cfg: Config) -> list[Path]:
    """What a trial's folder holds, like a run's: config.json, metrics.parquet (its rows) and,
    where its partition.csv is there, partition.png."""
    written = [write_file(folder / CONFIG_FILE, lambda p: write_config(cfg, p.parent))]
    written.append(write_file(folder / METRICS_FILE, lambda p: write_parquet_atomic(rows, p)))
    if (folder / PARTITION_FILE).is_file():
        written.append(folder / PARTITION_FILE)
        written.append(save_partition_plot(folder / PARTITION_FILE, folder / PARTITION_PNG, cfg))
    return written


def write_config(cfg: Config, folder: Path) -> Path:
    """FOLDER/config.json, atomically: the full config a run or trial ran with."""
    text = json.dumps(cfg.to_dict(), indent=1, default=str) + "\n"
    return write_text_atomic(folder / CONFIG_FILE, text)


def write_text_atomic(path: Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# --- reading results back ------------------------------------------------------------------


@dataclass
class Source:
    """One sweep's or run's results, as read from its folder."""

    folder: Path
    metrics: pd.DataFrame  # ID columns, keys, then the metric columns; a row per trial × round
    summary: pd.DataFrame  # the folder's own summary.csv (status, error), may be empty
    configs: dict[str, Config]
    keys: list[str]  # searched keys (columns between the ID columns and `round`)
    trial_dirs: dict[str, Path] = field(default_factory=dict)


def metric_columns(frame: pd.DataFrame) -> list[str]:
    """The columns of a metrics table from `round` on (those before it identify the trial)."""
    columns = list(frame.columns)
    return columns[columns.index("round") :] if "round" in columns else []


def _read_config(path: Path) -> Config:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(str(path), f"unreadable config: {e}") from None
    raw.pop("search", None)
    return validate(raw, check_registries=False)


def _read_summary(path: Path) -> pd.DataFrame:
    if not path.is_file():
        return pd.DataFrame(columns=[*ID_COLUMNS, "status", "error"])
    summary = pd.read_csv(path, dtype={c: str for c in ("trial", "trial_id", "status", "error")})
    for column in ("trial", "trial_id", "status", "error"):
        if column in summary:
            summary[column] = summary[column].fillna("")
    return summary


def _read_metrics(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except Exception as e:  # noqa: BLE001 — pyarrow raises many kinds for a damaged file
        raise ConfigError(str(path), f"unreadable metrics: {e}") from None


def _cast(key: str, value: Any) -> Any:
    from fslsage.config import FIELDS

    if isinstance(value, str) and FIELDS[key].type in ("dict", "list"):
        return json.loads(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def load_sweep(folder: Path) -> Source:
    metrics = _read_metrics(folder / METRICS_FILE)
    summary = _read_summary(folder / SUMMARY_FILE)
    measured = metric_columns(metrics)
    before = [c for c in metrics.columns if c not in measured] if measured else summary.columns
    keys = [c for c in before if c not in ID_COLUMNS and c not in SUMMARY_COLUMNS]
    ids = list(dict.fromkeys([*summary.trial_id, *metrics.trial_id.astype(str)]))
    base = None
    configs = {}
    for tid in sorted(ids):
        if (folder / tid / CONFIG_FILE).is_file():
            configs[tid] = _read_config(folder / tid / CONFIG_FILE)
            continue
        if base is None:  # a sweep from before trial folders held their config
            state = folder / SWEEP_STATE
            try:
                base = json.loads(state.read_text())["config"]
            except (OSError, ValueError, KeyError, TypeError):
                why = f"neither {tid}/{CONFIG_FILE} nor a readable {SWEEP_STATE}"
                raise ConfigError(str(folder), f"{why}: no config for trial {tid}") from None
        known = summary[summary.trial_id == tid]
        known = known if len(known) else metrics[metrics.trial_id == tid]
        raw = {k: v for k, v in base.items() if k != "search"}
        for k in [*keys, "algorithm", "alpha"]:
            if k in known:
                raw[k] = _cast(k, known[k].iloc[0])
        configs[tid] = validate(raw, check_registries=False)
    return Source(folder, metrics, summary, configs, keys,
                  {tid: folder / tid for tid in configs})  # fmt: skip


def load_run(folder: Path) -> Source:
    metrics = _read_metrics(folder / METRICS_FILE)
    if not (folder / CONFIG_FILE).is_file():
        raise ConfigError(str(folder), f"a run folder without {CONFIG_FILE} (written by "
                                       "fslsage.run since it tracks its config)")  # fmt: skip
    cfg = _read_config(folder / CONFIG_FILE)
    tid = folder.name
    ids = trial_ids(cfg.name, tid, cfg, [])
    metrics = metrics.assign(**ids)[[*ids, *metrics.columns]]
    return Source(folder, metrics, _read_summary(folder / SUMMARY_FILE), {tid: cfg}, [],
                  {tid: folder})  # fmt: skip


def load_sources(folder: Path) -> list[Source]:
    """The sweeps and runs in a folder: itself, or the folders right inside it."""
    if not folder.is_dir():
        raise ConfigError(str(folder), "no such folder")
    if (folder / METRICS_FILE).is_file():
        columns = _read_metrics(folder / METRICS_FILE).columns
        return [load_sweep(folder) if "trial_id" in columns else load_run(folder)]
    found = [load_sources(sub)[0] for sub in sorted(folder.iterdir())
             if sub.is_dir() and (sub / METRICS_FILE).is_file()]  # fmt: skip
    if not found:
        raise ConfigError(str(folder), f"no {METRICS_FILE} in it or in the folders inside it")
    return found


@dataclass
class Combined:
    metrics: pd.DataFrame
    summary: pd.DataFrame
    configs: dict[str, Config]
    trial_dirs: dict[str, Path]
    sources: dict[str, Path]  # trial id → the folder it was read from


def combine(sources: list[Source]) -> Combined:
    """One table of trials from several sources; a trial id two sources share is prefixed with
    its source's folder name, and a `source` column names each row's folder when there are
    several. Summary numbers are recomputed from the rows; status and error come from the
    source's summary.csv (a run or trial without one: finished, or interrupted)."""
    many = len(sources) > 1
    seen: set[str] = set()
    keys = list(dict.fromkeys(k for s in sources for k in s.keys))
    metrics_parts, summary_rows = [], []
    configs, dirs, origin = {}, {}, {}
    for source in sources:
        saved = source.summary.set_index("trial_id") if len(source.summary) else None
        for tid, cfg in source.configs.items():
            new_id = f"{source.folder.name}/{tid}" if tid in seen else tid
            seen.add(new_id)
            rows = source.metrics[source.metrics.trial_id.astype(str) == tid]
            label = rows.trial.iloc[0] if len(rows) else cfg.name
            if not len(rows) and saved is not None and "trial" in saved and tid in saved.index:
                label = saved.trial[tid]
            ids = trial_ids(str(label), new_id, cfg, keys)
            if many:
                ids = {"source": source.folder.name, **ids}
            metric_cols = metric_columns(rows)
            rows = rows[metric_cols]
            rows = rows.sort_values("round").reset_index(drop=True) if metric_cols else rows
            metrics_parts.append(rows.assign(**ids)[[*ids, *metric_cols]])
            stats = trial_summary(cfg, rows)
            if saved is not None and tid in saved.index:
                status, error = str(saved.status[tid]), str(saved.error[tid])
            else:
                status, error = trial_status(cfg, stats, "", interrupted=True), ""
            summary_rows.append({**ids, **stats, "status": status, "error": error})
            configs[new_id], dirs[new_id], origin[new_id] = cfg, source.trial_dirs[tid], \
                source.folder  # fmt: skip
    id_columns = [*(["source"] if many else []), *ID_COLUMNS,
                  *(k for k in keys if k not in ID_COLUMNS)]  # fmt: skip
    metrics = (pd.concat(metrics_parts, ignore_index=True) if metrics_parts
               else pd.DataFrame(columns=id_columns))  # fmt: skip
    summary = pd.DataFrame(summary_rows, columns=[*id_columns, *SUMMARY_COLUMNS])
    summary = add_common_budget(summary, metrics, configs)
    return Combined(metrics, summary, configs, dirs, origin)


def title_of(configs: dict[str, Config], names: Iterable[str] = ()) -> str:
    """The figures' title: what ran (the sweep or run names) and on which model."""
    models = ", ".join(dict.fromkeys(cfg.model for cfg in configs.values()))
    names = ", ".join(dict.fromkeys(names))
    return " — ".join(p for p in (names, models) if p)


def build(sources: list[Source], out: Path, scale: str | None = None) -> list[Path]:
    """Writes the report of `sources` to `out`: metrics.parquet (unless `out` is the one
    source's own folder), the summaries, the figures and the partition pictures."""
    data = combine(sources)
    in_place = any(out.resolve() == s.folder.resolve() for s in sources)
    title = title_of(data.configs, [cfg.name for cfg in data.configs.values()]
                     if len(sources) > 1 else [sources[0].folder.name])  # fmt: skip
    written = []
    if not in_place:
        written.append(write_file(out / METRICS_FILE,
                                  lambda p: write_parquet_atomic(data.metrics, p)))  # fmt: skip
    written += write_report(out, data.metrics, data.summary, data.configs, title, scale)
    for tid, folder in data.trial_dirs.items():
        csv = folder / PARTITION_FILE
        if not csv.is_file():
            continue
        if in_place:
            png = folder / PARTITION_PNG
        else:
            png = out / "partitions" / (tid.replace("/", "_") + ".png")
        written.append(save_partition_plot(csv, png, data.configs[tid]))
    return written


def write_run_report(folder: Path, status: str, error: str = "") -> list[Path]:
    """A run's summary and figures in its own folder, as `report FOLDER` writes them, with the
    status it ended with (`fslsage.run`, as it ends)."""
    source = load_run(folder)
    source.summary = pd.DataFrame([{"trial_id": folder.name, "status": status, "error": error}])
    return build([source], folder)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fslsage.report",
                                description=__doc__.splitlines()[0])  # fmt: skip
    p.add_argument("dirs", nargs="+", metavar="DIR", help="a sweep's or run's results folder, "
                   "or a folder holding such folders")  # fmt: skip
    p.add_argument("--out", help="where to write (default: DIR itself when one is given, "
                   "else report/ beside the first DIR)")  # fmt: skip
    p.add_argument("--x-scale", choices=["auto", "log", "linear"],
                   help="the GiB and time axes (default: the runs' plot_x_scale, else auto: "
                   "log where the data spans more than two decades)")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fslsage.preflight import check_folder

    try:
        sources = [s for d in args.dirs for s in load_sources(Path(d))]
        default = Path(args.dirs[0]) if len(args.dirs) == 1 else Path(args.dirs[0]).parent
        out = Path(args.out) if args.out else default / ("report" if len(args.dirs) > 1 else "")
        out = check_folder(out, "--out")
        written = build(sources, out, args.x_scale)
    except ConfigError as e:
        print(f"fslsage: config error: {e}", file=sys.stderr)
        return 2
    except WriteFailed as e:
        print(f"fslsage: {e}", file=sys.stderr)
        return 1
    print((out / "summary.md").read_text(encoding="utf-8"))
    print(f"report of {len(sources)} result folder{'s' * (len(sources) > 1)} in {out}:")
    for path in written:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
