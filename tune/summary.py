"""A sweep's result files, rebuilt from the Tune results of this sweep alone on every finish.

Tune's per-trial logs may hold a round twice (a trial restarted after its last checkpoint logs
the rounds since again); the tables keep the last row per (trial, round). They may also be cut
short (a full disk): they are read line by line, as far as they can be, and a trial whose logged
rounds fall short of the rounds it reported is a failed trial, never a quietly shorter one.
Nothing here unpickles a file: a trial's error is read from its error.txt. Files are rewritten
atomically, so readers see the previous complete set or the new one, never a mix.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from fslsage import report
from fslsage.algorithms.base import first_round
from fslsage.config import Config
from fslsage.experiment import METRIC_COLUMNS
from fslsage.report import (  # noqa: F401 — WriteFailed and trial_summary: this module's API too
    ID_COLUMNS,
    SUMMARY_COLUMNS,
    WriteFailed,
    add_common_budget,
    trial_ids,
    trial_status,
    trial_summary,
)
from fslsage.results import write_parquet_atomic
from tune.space import trial_config, trial_label
from tune.tracking import error_reason, trial_error

RESULT_FILE, PROGRESS_FILE = "result.json", "progress.csv"  # what Tune logs per trial
LOGGED = [*METRIC_COLUMNS, "align_loss"]


@contextmanager
def errors_as_text() -> Iterator[None]:
    """While active, the ResultGrid that Tuner.fit() builds reads a failed trial's error from its
    error.txt: Tune's own ResultGrid unpickles error.pkl (code from whoever wrote the file; and an
    empty one, left by a full disk, raises). A trial that did not fail has no error, whatever
    files an earlier failure left (a resumed sweep retries it). (Ray 2.60: ResultGrid builds
    each Result's error with its `_populate_exception`.)"""
    from ray.tune.experiment import Trial
    from ray.tune.result_grid import ResultGrid

    def text_error(trial: Any) -> str | None:
        return trial_error(trial) if trial.status == Trial.ERROR else None

    original = ResultGrid.__dict__["_populate_exception"]
    ResultGrid._populate_exception = staticmethod(text_error)
    try:
        yield
    finally:
        ResultGrid._populate_exception = original


def _json_rows(text: str) -> tuple[list[dict[str, Any]], int]:
    """result.json: a JSON object per line. Returns the rows read and the lines that were not
    (cut short, or garbage where a full disk left a hole)."""
    rows, bad = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append({k: row[k] for k in LOGGED if k in row})
        else:
            bad += 1
    return rows, bad


def _csv_rows(text: str) -> tuple[list[dict[str, Any]], int]:
    """progress.csv: a header, then a row per report; a row without every field or a last line
    without its newline was cut short and is not read (a cut number would read as another)."""
    lines = text.splitlines(keepends=True)
    complete = lines if not lines or lines[-1].endswith("\n") else lines[:-1]
    try:
        records = list(csv.reader(io.StringIO("".join(complete))))
    except csv.Error:
        return [], max(len(lines) - 1, 1)
    if not records:
        return [], len(lines) - len(complete)
    header, body = records[0], records[1:]
    rows = [dict(zip(header, r, strict=True)) for r in body if len(r) == len(header)]
    bad = len(body) - len(rows) + len(lines) - len(complete)
    return [{k: row[k] for k in LOGGED if k in row and row[k] != ""} for row in rows], bad


def read_logged_rows(trial_dir: Path) -> tuple[pd.DataFrame, list[str]]:
    """The rows Tune logged for one trial, from its result.json and its progress.csv (Tune
    writes both: one may hold what the other lost); never raises. Returns the rows, those of
    result.json last (they win), and what could not be read, one phrase per file
    ("result.json: 2 unreadable lines")."""
    found: dict[str, list[dict[str, Any]]] = {}
    problems = []
    readers: list[tuple[str, Callable[[str], tuple[list[dict[str, Any]], int]]]] = [
        (RESULT_FILE, _json_rows), (PROGRESS_FILE, _csv_rows),
    ]  # fmt: skip
    for name, read in readers:
        try:
            text = (trial_dir / name).read_bytes().decode("utf-8", errors="replace")
        except FileNotFoundError:
            problems.append(f"{name} missing")
            continue
        except OSError as e:
            problems.append(f"{name} unreadable ({e.strerror or e})")
            continue
        found[name], bad = read(text)
        if bad:
            problems.append(f"{name}: {bad} unreadable line{'s' * (bad > 1)}")
        elif not found[name]:
            problems.append(f"{name} empty")
    rows = [*found.get(PROGRESS_FILE, []), *found.get(RESULT_FILE, [])]
    frame = pd.DataFrame(rows, columns=[c for c in LOGGED if any(c in r for r in rows)])
    return frame, problems


def trial_metrics(frame: pd.DataFrame | None) -> pd.DataFrame:
    """Tune's logged rows of one trial → one row per round, last report wins."""
    if frame is None or frame.empty or "round" not in frame:
        return pd.DataFrame(columns=METRIC_COLUMNS)
    columns = [c for c in LOGGED if c in frame]
    # values that are not numbers (a damaged line) are missing values, never a crash
    rows = frame[columns].apply(pd.to_numeric, errors="coerce").dropna(subset=["round"])
    rows = rows.astype({"round": int}).drop_duplicates("round", keep="last")
    return rows.sort_values("round").reset_index(drop=True)


def reported_rounds(cfg: Config, last_result: dict[str, Any] | None) -> list[int]:
    """The rounds a trial reported to Tune: one report per round, up to the last one Tune saw
    (its last result, which lives in the experiment state, not in the logged files)."""
    last = (last_result or {}).get("round")
    if not isinstance(last, (int, float)) or isinstance(last, bool) or not math.isfinite(last):
        return []
    return list(range(first_round(cfg), int(last) + 1))


def _spans(rounds: list[int]) -> str:
    """[2, 3, 4, 7] → "2-4, 7"."""
    spans: list[list[int]] = []
    for t in rounds:
        if spans and t == spans[-1][1] + 1:
            spans[-1][1] = t
        else:
            spans.append([t, t])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def no_results_reason(missing: list[int], reported: list[int], problems: list[str]) -> str:
    """Why a trial that raised nothing is failed: rounds it reported were not logged."""
    rounds = f"round{'s' * (len(missing) > 1)} {_spans(missing)}"
    detail = "; ".join(problems) or f"neither {RESULT_FILE} nor {PROGRESS_FILE} holds them"
    return f"no results recorded: {rounds} of the {len(reported)} it reported ({detail})"


def collect(grid: Any, base: dict[str, Any], keys: list[str],
            interrupted: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:  # fmt: skip
    """(metrics: one row per trial × round, summary: one row per trial) from a ResultGrid."""
    metrics, summary, _ = collect_all(grid, base, keys, interrupted)
    return metrics, summary


def collect_all(grid: Any, base: dict[str, Any], keys: list[str], interrupted: bool = False
                ) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Config]]:  # fmt: skip
    """(metrics: one row per trial × round, summary: one row per trial, each trial's config)
    from a ResultGrid. Trial directories are named by trial id (see fslsage.sweep), which keys
    the tables. A trial is failed when it raised, or when rounds it reported are missing from
    its logged results (its reason then starts "no results recorded")."""
    metrics, summary = [], []
    results = sorted(grid, key=lambda r: Path(r.path).name)
    configs = [trial_config(base, r.config or {}) for r in results]
    labels = _unique(
        [trial_label(r.config or {}, keys) or Path(r.path).name for r in results],
        [c.algorithm for c in configs],
    )
    for result, cfg, label in zip(results, configs, labels, strict=True):
        ids = trial_ids(label, Path(result.path).name, cfg, keys)
        trial_dir = Path(result.path)
        if trial_dir.is_dir():  # read here, line by line: Tune drops a file with one bad line
            frame, problems = read_logged_rows(trial_dir)
        else:  # storage elsewhere: what Tune read
            frame, problems = result.metrics_dataframe, []
        rows = trial_metrics(frame)
        metrics.append(rows.assign(**ids)[[*ids, *rows.columns]])
        error = error_reason(result.error) if result.error else ""
        reported, logged = reported_rounds(cfg, result.metrics), set(rows["round"])
        missing = [t for t in reported if t not in logged]
        if missing and not error:
            error = no_results_reason(missing, reported, problems)
        stats = trial_summary(cfg, rows)
        summary.append({**ids, **stats, "status": trial_status(cfg, stats, error, interrupted),
                        "error": error})  # fmt: skip
    id_columns = [*ID_COLUMNS, *(k for k in keys if k not in ID_COLUMNS)]
    metrics_df = (
        pd.concat(metrics, ignore_index=True) if metrics else pd.DataFrame(columns=id_columns)
    )
    summary_df = pd.DataFrame(summary, columns=[*id_columns, *SUMMARY_COLUMNS])
    by_id = {Path(r.path).name: cfg for r, cfg in zip(results, configs, strict=True)}
    return metrics_df, add_common_budget(summary_df, metrics_df, by_id), by_id


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
                  configs: dict[str, Config]) -> list[Path]:  # fmt: skip
    """metrics.parquet, then what `fslsage.report.write_report` writes (summary.csv,
    summary_seeds.csv, summary.md, acc_vs_comm.png, acc_vs_time.png, acc_vs_alpha.png when
    alpha varies, each figure with its CSV), as `python -m fslsage.report OUT` rebuilds them.
    A file that cannot be written (a full disk) raises WriteFailed naming it; the files
    written before it are complete and the previous one is left intact."""
    written = [report.write_file(out / report.METRICS_FILE,
                                 lambda p: write_parquet_atomic(metrics, p))]  # fmt: skip
    title = report.title_of(configs, [out.name])
    return written + report.write_report(out, metrics, summary, configs, title)


def write_trial_files(sweep_dir: Path, metrics: pd.DataFrame,
                      configs: dict[str, Config]) -> dict[str, list[Path]]:  # fmt: skip
    """Each trial's folder as a run's: its config.json, its rows as metrics.parquet and the
    picture of the partition.csv the trial wrote (`report.write_run_files`). Returns the files
    per trial id (its MLflow run's artifacts). A trial folder that is gone is left out."""
    out = {}
    columns = report.metric_columns(metrics)
    for tid, cfg in configs.items():
        folder = sweep_dir / tid
        if not folder.is_dir():
            continue
        rows = metrics[metrics.trial_id == tid][columns].reset_index(drop=True)
        out[tid] = report.write_run_files(folder, rows, cfg)
    return out


def format_table(summary: pd.DataFrame) -> str:
    """The summary as printed at the end of a sweep (errors shortened to fit a line)."""
    shown = summary.drop(columns=["trial_id"]).copy()
    shown["error"] = shown["error"].map(lambda e: e if len(e) <= 60 else e[:57] + "...")

    def number(v: float) -> str:
        return "nan" if isinstance(v, float) and math.isnan(v) else f"{v:.4f}"

    return shown.to_string(index=False, float_format=number)
