"""`python -m fslsage.sweep --config FILE [--set key=value ...] [--results-dir DIR] [--resume]`

A Ray Tune sweep over the config's `search` block, one experiment per trial; MLflow tracking
and result tables/plots in DIR/<name>/. Along with fslsage.run, the one entry point that may
import Ray.

The config is validated completely before Ray starts. Ray joins $RAY_ADDRESS (set under
`ray job submit`) or starts a local instance, and reuses one this process already runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from fslsage.config import ConfigError, flatten, load_config
from fslsage.results import write_atomic

SWEEP_STATE = "sweep.json"  # the sweep's base config, cluster size and MLflow ids, for --resume


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fslsage.sweep",
                                description=__doc__.splitlines()[0])  # fmt: skip
    p.add_argument("--config", help="experiment YAML with a `search` block")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key; VALUE is YAML; dotted keys reach into blocks")  # fmt: skip
    p.add_argument("--results-dir", default="results",
                   help="results root; the sweep writes DIR/<name>/ (default results)")  # fmt: skip
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted sweep in DIR/<name> (same config)")  # fmt: skip
    return p


def connect_ray() -> None:
    """Joins $RAY_ADDRESS or starts a local Ray; an instance already up here is reused."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address)
    else:  # a local instance just for this sweep: quiet, no dashboard to start
        ray.init(include_dashboard=False, log_to_driver=False)


def _first_difference(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    fa, fb = flatten(a), flatten(b)
    return next((k for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)), None)


def absolute_paths(raw: dict[str, Any]) -> dict[str, Any]:
    """Trials run in their own directories: a relative data_dir is pinned to this one (so a
    resumed sweep, e.g. a new job's working dir, pins it to its own)."""
    return {**raw, "data_dir": str(Path(raw["data_dir"]).resolve())}


def plan(args: argparse.Namespace) -> tuple[dict[str, Any], Path, dict[str, Any] | None]:
    """Everything that can be wrong with the command, checked before Ray starts: the config
    (search block included) and, for --resume, the sweep being resumed. Returns the config as
    given, the sweep directory and the saved sweep state (None for a fresh sweep)."""
    cfg = load_config(args.config, args.overrides)
    given = cfg.to_dict()
    sweep_dir = Path(args.results_dir).resolve() / cfg.name
    if not args.resume:
        return given, sweep_dir, None
    state_file = sweep_dir / SWEEP_STATE
    if not (sweep_dir / "tuner.pkl").is_file() or not state_file.is_file():
        raise ConfigError("--resume", f"no interrupted sweep to resume in {sweep_dir}")
    state = json.loads(state_file.read_text())
    key = _first_difference(state["config"], given)
    if key is not None:
        raise ConfigError(
            "--resume", f"{key} differs from the interrupted sweep's config; resume with the same"
        )
    return given, sweep_dir, state


def start(given: dict[str, Any], sweep_dir: Path) -> dict[str, Any]:
    """A fresh sweep: the previous run of the same sweep is replaced (so two runs' rows never
    mix), the MLflow parent run is opened and what --resume needs is saved in sweep.json."""
    import ray

    from tune import tracking

    if sweep_dir.exists() and any((sweep_dir / f).exists() for f in ("tuner.pkl", SWEEP_STATE)):
        print(f"replacing the previous sweep in {sweep_dir}")
        shutil.rmtree(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    uri = tracking.resolve_tracking_uri(sweep_dir.parent)
    experiment_id, parent = tracking.start_sweep_run(
        uri, given["name"], sweep_dir.parent / "mlartifacts", given, sweep_dir
    )
    resources = ray.cluster_resources()
    state = {
        "config": given,  # --resume compares the config it is given with this one
        "tracking_uri": uri,
        "experiment_id": experiment_id,
        "parent_run_id": parent,
        # sized once: trials restored by --resume reserve what they reserved at first
        "cluster": {k: resources.get(k, 0.0) for k in ("CPU", "GPU")},
    }
    write_atomic(sweep_dir / SWEEP_STATE, lambda tmp: tmp.write_text(json.dumps(state, indent=1)))
    return state


def make_tuner(base: dict[str, Any], sweep_dir: Path, state: dict[str, Any]) -> Any:
    """A new Tuner over the search space, or the interrupted one restored (its unfinished and
    errored trials go on; finished ones are kept)."""
    from ray import tune

    from fslsage.config import validate
    from tune import space, tracking
    from tune.resources import resources_for
    from tune.trainable import run_trial

    cfg = validate(base)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base, cluster=state["cluster"]),
        resources_for(base, state["cluster"]),
    )
    if (sweep_dir / "tuner.pkl").exists():
        return tune.Tuner.restore(
            str(sweep_dir), trainable, resume_unfinished=True, resume_errored=True
        )
    keys, opts = space.searched_keys(cfg.search), space.options(cfg.search)
    uri, parent = state["tracking_uri"], state["parent_run_id"]
    return tune.Tuner(
        trainable,
        param_space=space.param_space(cfg.search),
        tune_config=tune.TuneConfig(
            metric=opts["metric"],
            mode=opts["mode"],
            num_samples=opts["num_samples"],
            scheduler=space.scheduler(cfg),
            max_concurrent_trials=opts["max_concurrent"] or None,
            reuse_actors=True,  # a trial process per trial would cost seconds of imports
            trial_name_creator=_trial_id,
            trial_dirname_creator=_trial_id,
        ),
        run_config=tune.RunConfig(
            name=cfg.name,
            storage_path=str(sweep_dir.parent),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=[
                tracking.Progress(base, keys),
                tracking.MlflowTrials(uri, state["experiment_id"], parent, base, keys),
            ],
            verbose=0,
        ),
    )


def run(given: dict[str, Any], sweep_dir: Path, state: dict[str, Any] | None) -> int:
    """Runs (or resumes) the sweep and writes its results; 0 when at least one trial finished,
    1 when every trial failed, 130 when interrupted (Ctrl+C: continue with --resume)."""
    from fslsage.config import validate
    from tune import space, summary, tracking

    base = absolute_paths(given)
    cfg = validate(base)
    keys = space.searched_keys(cfg.search)
    # Checkpoint-driven experiment-state snapshots are expected here (small, local): no warning.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    begin = time.perf_counter()
    connect_ray()
    if state is None:
        state = start(given, sweep_dir)
    else:
        tracking.reopen_sweep_run(state["tracking_uri"], state["parent_run_id"])
        print(f"resuming the sweep in {sweep_dir}")
    uri, parent = state["tracking_uri"], state["parent_run_id"]

    grid = make_tuner(base, sweep_dir, state).fit()
    # Ctrl+C ends fit() early without raising: trials left unfinished or never created
    ended = grid.num_terminated + grid.num_errors
    interrupted = ended < len(grid) or len(grid) < space.trial_count(cfg.search)
    metrics, table = summary.collect(grid, base, keys, interrupted=interrupted)
    written = summary.write_results(sweep_dir, metrics, table, title=f"{cfg.dataset}, {cfg.model}")
    failed = int((table.status == "failed").sum())
    status = "KILLED" if interrupted else ("FAILED" if failed == len(table) else "FINISHED")
    tracking.finish_sweep_run(uri, parent, status, [*written, sweep_dir / SWEEP_STATE])

    print("\n" + summary.format_table(table))
    print(f"\nsweep {cfg.name}: {len(table)} trials, {failed} failed, "
          f"{time.perf_counter() - begin:.1f}s")  # fmt: skip
    print(f"results: {sweep_dir} (metrics.parquet, summary.csv)")
    for path in written:
        if path.suffix == ".png":
            print(f"plot: {path}")
    print(f"MLflow: {uri} (parent run {parent}); view with "
          f"`mlflow ui --backend-store-uri {uri}`")  # fmt: skip
    if interrupted:
        print(f"sweep interrupted; continue it with --resume (results dir {sweep_dir.parent})")
        return 130
    return 1 if len(table) and failed == len(table) else 0


def _trial_id(trial: Any) -> str:
    """Trial names and directories are the trial ids: they key the result tables and MLflow."""
    return trial.trial_id


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        given, sweep_dir, state = plan(args)
    except ConfigError as e:
        print(f"fslsage: config error: {e}", file=sys.stderr)
        return 2
    return run(given, sweep_dir, state)


if __name__ == "__main__":
    sys.exit(main())
