"""The sweep driver's Tune callbacks: a line per round per trial (with the time the trial has
left and how many trials are done, running and pending), and an MLflow run per trial.

Both are pickled into the Tune experiment state and come back on `--resume`, so they hold only
plain values and look their MLflow runs up again by tag instead of remembering them.
"""

from __future__ import annotations

from typing import Any

from ray import tune

from fslsage.config import Config
from fslsage.progress import eta_seconds, format_duration
from tune import tracking
from tune.space import trial_config, trial_count, trial_label


class MlflowTrials(tune.Callback):
    """A child run per trial under the sweep's parent run: params = the trial's flattened config,
    metrics per round with step = round, FAILED with the error when the trial fails. A resumed
    trial reuses its run and logs only rounds past the last one logged. (Its files go to its
    run when the sweep ends: `tracking.settle_trial_runs`.)"""

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
            self._mlflow = tracking._client(self.uri)
        return self._mlflow

    def _run_id(self, trial: Any) -> str:
        tid = trial.trial_id
        if tid in self._runs:
            return self._runs[tid]
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{tracking.PARENT_TAG}` = '{self.parent_run_id}' "
            f"and tags.trial_id = '{tid}'",
        )
        if found:
            run_id = found[0].info.run_id
            self._last_step[tid] = tracking.reopen_run(self.client, run_id)
        else:
            cfg = trial_config(self.base, trial.config)
            label = trial_label(trial.config, self.keys)
            tags = {tracking.PARENT_TAG: self.parent_run_id, "trial_id": tid,
                    "fslsage.kind": "trial", "algorithm": cfg.algorithm}  # fmt: skip
            name = f"{cfg.algorithm} {label}".strip() + f" [{tid}]"
            run_id = tracking.create_run(self.client, self.experiment_id, name, tags,
                                         tracking.config_params(cfg))  # fmt: skip
            self._last_step[tid] = tracking.NOTHING_LOGGED
        self._runs[tid] = run_id
        return run_id

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._run_id(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:  # fmt: skip
        if "round" not in result:  # not one of run_trial's reports
            return
        run_id = self._run_id(trial)
        step = int(result["round"])
        if step <= self._last_step.get(trial.trial_id, tracking.NOTHING_LOGGED):
            return  # logged before a restart
        tracking.log_round(self.client, run_id, result)
        self._last_step[trial.trial_id] = step

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        tracking.end_run(self.client, self._run_id(trial), "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        error = tracking.error_reason(tracking.trial_error(trial))
        tracking.end_run(self.client, self._run_id(trial), "FAILED", error)


def trial_counts(trials: list, total: int) -> str:
    """`trials: 2 done, 3 running, 3 pending` (pending: all the sweep will run that have not
    started yet, those Tune has not made yet included)."""
    done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
    running = sum(t.status == "RUNNING" for t in trials)
    pending = max(total, len(trials)) - done - running
    return f"trials: {done} done, {running} running, {pending} pending"


class Progress(tune.Callback):
    """One console line per finished round per trial, with the time that trial has left at the
    pace of its recent rounds and how many of the sweep's trials are done, running and pending;
    and one when a trial ends (`[...] finished`, `[...] FAILED: reason`)."""

    def __init__(self, base: dict[str, Any], keys: list[str]):
        self.algorithm, self.keys, self.base = base["algorithm"], keys, base
        self.total = trial_count(base.get("search") or {})
        self._rows: dict[str, list[dict[str, float]]] = {}
        self._configs: dict[str, Config] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_rows={}, _configs={})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Also a Progress pickled before it counted trials (a sweep resumed across versions)."""
        self.__dict__.update({"base": {"algorithm": state.get("algorithm")}, "total": 0,
                              **state, "_rows": {}, "_configs": {}})  # fmt: skip

    def _name(self, trial: Any) -> str:
        algorithm = trial.config.get("algorithm", self.algorithm)
        label = trial_label(trial.config, self.keys)
        return " ".join(p for p in (trial.trial_id, algorithm, label) if p)

    def _left(self, trial: Any, result: dict) -> str:
        tid = trial.trial_id
        if "rounds" not in self.base:  # pickled before it knew the config
            return "?"
        if tid not in self._configs:
            self._configs[tid] = trial_config(self.base, trial.config)
        cfg = self._configs[tid]
        rows = self._rows.setdefault(tid, [])
        if rows and result["round"] <= rows[-1]["round"]:
            rows.clear()  # the trial started again (restored): its clock starts again
        rows.append({k: float(result[k]) for k in ("round", "wall_s", "comm_gib")})
        return format_duration(eta_seconds(rows, cfg.rounds, cfg.comm_budget_gib))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:  # fmt: skip
        if "round" not in result:
            return
        print(f"[{self._name(trial)}] round {result['round']:>3}  "
              f"comm {result['comm_gib']:9.4f} GiB  test_acc {result['test_acc']:.4f}  "
              f"left {self._left(trial, result)}  ({trial_counts(trials, self.total)})",
              flush=True)  # fmt: skip

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        print(f"[{self._name(trial)}] finished", flush=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        error = tracking.trial_error(trial)
        print(f"[{self._name(trial)}] FAILED: {tracking.error_reason(error)}", flush=True)
