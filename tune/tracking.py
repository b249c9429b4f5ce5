"""MLflow tracking of runs and sweeps, and a failed trial's error as one line.

A sweep's trials never talk to MLflow: their per-round reports reach the driver anyway, and a
single writer keeps the default SQLite store free of lock contention; the driver's callbacks
(tune/callbacks.py) log them with the functions here. `fslsage.run` logs its one run from its
own process with `RunTracker`, the same way. Nothing here imports Ray, and MLflow only once a
store is used.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fslsage.config import Config, flatten

EXPR_ERROR_FILE = "error.txt"  # where Tune writes a failed trial's traceback (ray.tune.result)
TRACKED_METRICS = (
    "test_acc", "test_loss", "test_perplexity", "train_loss", "comm_gib", "up_gib", "down_gib",
    "sim_time_s", "wall_s", "align_loss",
)  # fmt: skip
PARENT_TAG = "mlflow.parentRunId"


def resolve_tracking_uri(results_dir: Path) -> str:
    """$MLFLOW_TRACKING_URI, else SQLite next to the results (`sqlite:///results/mlflow.db` by
    default). Relative paths become absolute against the sweep's start directory: Tune runs
    trials elsewhere and a resumed sweep may start from another directory."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{results_dir / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///') :]).resolve()}"
    if "://" not in uri and not uri.startswith("databricks"):  # a bare path: a file store
        return str(Path(uri).resolve())
    return uri


UNREADABLE_ERROR = "unknown error: the trial's error.txt is missing or unreadable"
# "pkg.module.Name: message", the last line of a traceback text: the module path is noise
_QUALIFIED = re.compile(r"^(?:[A-Za-z_]\w*\.)+(?=[A-Za-z_]\w*(?::|$))")


def error_reason(error: Any) -> str:
    """One line naming the root exception: Tune wraps a trial's error (RayTaskError, TuneError
    or a traceback text) around the one the experiment raised."""
    while getattr(error, "cause", None) is not None:
        error = error.cause
    if error is None:
        return UNREADABLE_ERROR
    if isinstance(error, str):  # a traceback text: its last line names the exception
        lines = [ln.strip() for ln in error.strip().splitlines() if ln.strip()]
        return _QUALIFIED.sub("", lines[-1]) if lines else UNREADABLE_ERROR
    text = next((ln.strip() for ln in str(error).splitlines() if ln.strip()), "")
    name = type(error).__name__
    return f"{name}: {text}" if text else name


def read_error_text(path: str | Path | None) -> str | None:
    """A trial's error.txt as text (undecodable bytes replaced; a file cut short by a full disk
    is read as far as it goes), or None when it is missing, empty or unreadable."""
    if not path:
        return None
    try:
        text = Path(path).read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return None
    return text if text.strip() else None


def trial_error(trial: Any) -> str:
    """The error of a failed trial as the text Tune wrote to error.txt: next to the driver first,
    later synced to storage (the trial's path). Never error.pkl: unpickling a file runs whatever
    code the process that wrote it put there, and a full disk leaves it empty besides."""
    for where in (lambda: trial.error_file, lambda: Path(trial.path, EXPR_ERROR_FILE)):
        try:
            path = where()
        except (AttributeError, RuntimeError, TypeError):  # a trial never given a directory
            continue
        text = read_error_text(path)
        if text is not None:
            return text
    return UNREADABLE_ERROR


def _client(uri: str) -> Any:
    from mlflow import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=uri)


def _param_batches(params: dict[str, Any]) -> list[list[Any]]:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
    return [items[i : i + 100] for i in range(0, len(items), 100)]


def open_experiment(client: Any, uri: str, name: str, artifact_dir: Path) -> str:
    """The id of the MLflow experiment `name`, made (or restored) if need be. A local store
    keeps artifacts in `artifact_dir`, next to the results (not in whatever the CWD is); a
    tracking server decides for itself."""
    found = client.get_experiment_by_name(name)
    if found is None:
        local = uri.startswith("sqlite:") or "://" not in uri
        location = artifact_dir.resolve().as_uri() if local else None
        return client.create_experiment(name, artifact_location=location)
    if found.lifecycle_stage == "deleted":
        client.restore_experiment(found.experiment_id)
    return found.experiment_id


def create_run(client: Any, experiment_id: str, run_name: str, tags: dict[str, str],
               params: dict[str, Any]) -> str:  # fmt: skip
    """A new RUNNING run with `params` logged; returns its id."""
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    for batch in _param_batches(params):
        client.log_batch(run.info.run_id, params=batch)
    return run.info.run_id


def config_params(cfg: Config) -> dict[str, Any]:
    """A run's or trial's params: its flattened config without the search block."""
    return {k: v for k, v in flatten(cfg.to_dict()).items() if k != "search"}


def log_round(client: Any, run_id: str, row: dict[str, Any]) -> None:
    """One round's TRACKED_METRICS (those in `row`) with step = the round."""
    from mlflow.entities import Metric

    now, step = int(time.time() * 1000), int(row["round"])
    metrics = [Metric(k, float(row[k]), now, step) for k in TRACKED_METRICS if k in row]
    client.log_batch(run_id, metrics=metrics)


NOTHING_LOGGED = -1  # a run's last logged round before its first: a warm start's round 0 counts


def reopen_run(client: Any, run_id: str) -> int:
    """A run going on (a resumed trial or run): RUNNING again; returns the last round it
    logged (NOTHING_LOGGED: none), so that rounds logged before are not logged twice."""
    client.update_run(run_id, status="RUNNING")
    history = client.get_metric_history(run_id, "test_acc")
    return max((m.step for m in history), default=NOTHING_LOGGED)


def log_artifacts(client: Any, run_id: str, paths: Iterable[Path]) -> None:
    for path in paths:
        if Path(path).exists():
            client.log_artifact(run_id, str(path))


def end_run(client: Any, run_id: str, status: str, error: str = "") -> None:
    """Ends a run with `status` (FINISHED, FAILED, KILLED), its reason as the `error` tag."""
    if error:
        client.set_tag(run_id, "error", error[:5000])
    client.set_terminated(run_id, status)


def start_sweep_run(
    uri: str, experiment: str, artifact_dir: Path, config: dict[str, Any], sweep_dir: Path
) -> tuple[str, str]:
    """The sweep's parent run (params = the flattened config, search block included); returns
    (experiment id, run id)."""
    client = _client(uri)
    experiment_id = open_experiment(client, uri, experiment, artifact_dir)
    tags = {"fslsage.kind": "sweep", "fslsage.results": str(sweep_dir)}
    run_id = create_run(client, experiment_id, f"{experiment} sweep", tags, flatten(config))
    return experiment_id, run_id


def finish_sweep_run(uri: str, run_id: str, status: str, artifacts: list[Path]) -> None:
    """Ends the parent run with `status`, even when copying an artifact fails (a full disk:
    the error is raised after), so that it is never left RUNNING."""
    client = _client(uri)
    try:
        log_artifacts(client, run_id, artifacts)
    finally:
        client.set_terminated(run_id, status)


# a trial's status in summary.csv → its run's status in MLflow
RUN_STATUS = {"finished": "FINISHED", "stopped": "FINISHED", "failed": "FAILED",
              "interrupted": "KILLED"}  # fmt: skip


def settle_trial_runs(
    uri: str,
    experiment_id: str,
    parent_run_id: str,
    outcomes: dict[str, tuple[str, str]],
    leftover: str = "KILLED",
    artifacts: dict[str, list[Path]] | None = None,
) -> None:
    """Ends each trial's run as the sweep's summary says ({trial id: (summary status, error)}):
    Tune stops the running trials of an interrupted sweep without telling the callbacks, and a
    trial whose results went missing ended FINISHED in the callbacks. A run still RUNNING with
    no outcome (the sweep was cut short before its summary) ends `leftover`. `artifacts`
    ({trial id: files}) go to each trial's run first (its metrics.parquet, partition, ...)."""
    client = _client(uri)
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
        max_results=50_000,
    )  # fmt: skip
    for run in runs:
        tid = run.data.tags.get("trial_id", "")
        log_artifacts(client, run.info.run_id, (artifacts or {}).get(tid, []))
        outcome = outcomes.get(tid)
        if outcome is None:
            if run.info.status == "RUNNING":
                client.set_terminated(run.info.run_id, leftover)
            continue
        status, error = RUN_STATUS[outcome[0]], outcome[1][:5000]
        if error and run.data.tags.get("error") != error:
            client.set_tag(run.info.run_id, "error", error)
        if run.info.status != status:
            client.set_terminated(run.info.run_id, status)


def reopen_sweep_run(uri: str, run_id: str) -> None:
    _client(uri).update_run(run_id, status="RUNNING")


def end_left_running(uri: str, experiment_id: str, parent_run_id: str) -> None:
    """A sweep's parent run and trial runs that are still RUNNING end KILLED; those that ended
    keep their status. For a sweep whose driver died without a word (SIGKILL, a lost node)."""
    settle_trial_runs(uri, experiment_id, parent_run_id, {}, "KILLED")
    client = _client(uri)
    if client.get_run(parent_run_id).info.status == "RUNNING":
        client.set_terminated(parent_run_id, "KILLED")


class RunTracker:
    """The MLflow run of one `fslsage.run`, logged as a sweep's trial is: params = the flattened
    config, per-round metrics with step = round, the run's files as artifacts, FAILED with its
    reason or KILLED when it does not finish. Tagged with its output folder, so a resumed run
    goes on in the same MLflow run."""

    def __init__(self, uri: str, run_id: str, last_step: int = NOTHING_LOGGED):
        self.uri, self.run_id, self.last_step = uri, run_id, last_step
        self.client = _client(uri)

    @classmethod
    def start(cls, uri: str, cfg: Config, out: Path, resume: bool = False) -> RunTracker:
        """The run's MLflow run in experiment `name`: a new one, or with `resume` the latest one
        of the same output folder (rounds it logged already are not logged again). A local
        store keeps artifacts in mlartifacts/ beside the output folder."""
        client = _client(uri)
        experiment_id = open_experiment(client, uri, cfg.name, out.parent / "mlartifacts")
        if resume:
            found = client.search_runs(
                [experiment_id], filter_string="tags.`fslsage.kind` = 'run' and "
                f"tags.`fslsage.results` = '{out}'", order_by=["attributes.start_time DESC"],
                max_results=1,
            )  # fmt: skip
            if found:
                run_id = found[0].info.run_id
                return cls(uri, run_id, reopen_run(client, run_id))
        tags = {"fslsage.kind": "run", "fslsage.results": str(out), "algorithm": cfg.algorithm}
        run_id = create_run(client, experiment_id, f"{cfg.algorithm} {cfg.name}", tags,
                            config_params(cfg))  # fmt: skip
        return cls(uri, run_id)

    def log_round(self, row: dict[str, Any]) -> None:
        if int(row["round"]) > self.last_step:
            log_round(self.client, self.run_id, row)
            self.last_step = int(row["round"])

    def finish(self, status: str, artifacts: Iterable[Path] = (), error: str = "") -> None:
        """Logs the artifacts that exist and ends the run, even when copying one fails."""
        try:
            log_artifacts(self.client, self.run_id, artifacts)
        finally:
            end_run(self.client, self.run_id, status, error)


def __getattr__(name: str) -> Any:
    """The Tune callbacks lived here before tune/callbacks.py: a sweep's saved state may name
    them so (`--resume` unpickles it)."""
    if name in ("MlflowTrials", "Progress"):
        from tune import callbacks

        return getattr(callbacks, name)
    raise AttributeError(name)
