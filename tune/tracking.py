"""MLflow and console tracking of a sweep, from the Tune driver only.

Trials never talk to MLflow: their per-round reports reach the driver anyway, and a single
writer keeps the default SQLite store free of lock contention. Both callbacks are pickled into
the Tune experiment state and come back on `--resume`, so they hold only plain values and look
their MLflow runs up again by tag instead of remembering them.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.result import EXPR_ERROR_FILE

from fslsage.config import flatten
from tune.space import trial_config, trial_label

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


def start_sweep_run(
    uri: str, experiment: str, artifact_dir: Path, config: dict[str, Any], sweep_dir: Path
) -> tuple[str, str]:
    """The sweep's parent run (params = the flattened config, search block included); returns
    (experiment id, run id). Artifacts live next to the results, not in the CWD."""
    client = _client(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        # a local store keeps artifacts next to the results (not in whatever the CWD is); a
        # tracking server decides for itself
        local = uri.startswith("sqlite:") or "://" not in uri
        location = artifact_dir.resolve().as_uri() if local else None
        experiment_id = client.create_experiment(experiment, artifact_location=location)
    else:
        experiment_id = found.experiment_id
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(experiment_id)
    run = client.create_run(
        experiment_id, run_name=f"{experiment} sweep",
        tags={"fslsage.kind": "sweep", "fslsage.results": str(sweep_dir)},
    )  # fmt: skip
    for batch in _param_batches(flatten(config)):
        client.log_batch(run.info.run_id, params=batch)
    return experiment_id, run.info.run_id


def finish_sweep_run(uri: str, run_id: str, status: str, artifacts: list[Path]) -> None:
    """Ends the parent run with `status`, even when copying an artifact fails (a full disk:
    the error is raised after), so that it is never left RUNNING."""
    client = _client(uri)
    try:
        for path in artifacts:
            if path.exists():
                client.log_artifact(run_id, str(path))
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
) -> None:
    """Ends each trial's run as the sweep's summary says ({trial id: (summary status, error)}):
    Tune stops the running trials of an interrupted sweep without telling the callbacks, and a
    trial whose results went missing ended FINISHED in the callbacks. A run still RUNNING with
    no outcome (the sweep was cut short before its summary) ends `leftover`."""
    client = _client(uri)
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
        max_results=50_000,
    )  # fmt: skip
    for run in runs:
        outcome = outcomes.get(run.data.tags.get("trial_id", ""))
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


class MlflowTrials(tune.Callback):
    """A child run per trial under the sweep's parent run: params = the trial's flattened config,
    metrics per round with step = round, FAILED with the error when the trial fails. A resumed
    trial reuses its run and logs only rounds past the last one logged."""

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, base: dict[str, Any],
                 keys: list[str]):  # fmt: skip
        self.uri, self.experiment_id, self.parent_run_id = uri, experiment_id, parent_run_id
        self.base, self.keys = base, keys
        self._runs: dict[str, str] = {}  # trial id → run id
        self._last_step: dict[str, int] = {}
        self._mlflow: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_runs={}, _last_step={}, _mlflow=None)
        return state

    @property
    def client(self) -> Any:
        if self._mlflow is None:
            self._mlflow = _client(self.uri)
        return self._mlflow

    def _run_id(self, trial: Any) -> str:
        tid = trial.trial_id
        if tid in self._runs:
            return self._runs[tid]
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_run_id}' "
            f"and tags.trial_id = '{tid}'",
        )
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            history = self.client.get_metric_history(run_id, "test_acc")
            self._last_step[tid] = max((m.step for m in history), default=0)
        else:
            cfg = trial_config(self.base, trial.config)
            label = trial_label(trial.config, self.keys)
            run = self.client.create_run(
                self.experiment_id,
                run_name=f"{cfg.algorithm} {label}".strip() + f" [{tid}]",
                tags={PARENT_TAG: self.parent_run_id, "trial_id": tid, "fslsage.kind": "trial",
                      "algorithm": cfg.algorithm},
            )  # fmt: skip
            run_id = run.info.run_id
            params = {k: v for k, v in flatten(cfg.to_dict()).items() if k != "search"}
            for batch in _param_batches(params):
                self.client.log_batch(run_id, params=batch)
            self._last_step[tid] = 0
        self._runs[tid] = run_id
        return run_id

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._run_id(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:  # fmt: skip
        from mlflow.entities import Metric

        if "round" not in result:  # not one of run_trial's reports
            return
        run_id = self._run_id(trial)
        step = int(result["round"])
        if step <= self._last_step.get(trial.trial_id, 0):
            return  # logged before a restart
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(result[k]), now, step) for k in TRACKED_METRICS if k in result]
        self.client.log_batch(run_id, metrics=metrics)
        self._last_step[trial.trial_id] = step

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.client.set_terminated(self._run_id(trial), "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self._run_id(trial)
        error = trial_error(trial)
        self.client.set_tag(run_id, "error", error_reason(error)[:5000])
        self.client.set_terminated(run_id, "FAILED")


class Progress(tune.Callback):
    """One console line per finished round per trial, and one when a trial ends."""

    def __init__(self, base: dict[str, Any], keys: list[str]):
        self.algorithm, self.keys = base["algorithm"], keys

    def _name(self, trial: Any) -> str:
        algorithm = trial.config.get("algorithm", self.algorithm)
        label = trial_label(trial.config, self.keys)
        return " ".join(p for p in (trial.trial_id, algorithm, label) if p)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:  # fmt: skip
        if "round" not in result:
            return
        print(f"[{self._name(trial)}] round {result['round']:>3}  "
              f"comm {result['comm_gib']:9.4f} GiB  test_acc {result['test_acc']:.4f}",
              flush=True)  # fmt: skip

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        print(f"[{self._name(trial)}] finished", flush=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        error = trial_error(trial)
        print(f"[{self._name(trial)}] FAILED: {error_reason(error)}", flush=True)
