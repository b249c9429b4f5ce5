"""`python -m fslsage.sweep --config FILE [--set key=value ...] [--results-dir DIR] [--resume]
[--no-mlflow]`

A Ray Tune sweep over the config's `search` block, one experiment per trial; MLflow tracking
and result tables/plots in DIR/<name>/. Along with fslsage.run, the one entry point that may
import Ray.

The config is validated completely before Ray starts. Ray joins $RAY_ADDRESS (set under
`ray job submit`) or starts a local instance, and reuses one this process already runs.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fslsage.config import ConfigError, flatten, load_config
from fslsage.results import write_atomic

SWEEP_STATE = "sweep.json"  # the sweep's base config, cluster size and MLflow ids, for --resume
SWEEP_MARKER = ".fslsage-sweep"  # holds the sweep's name: a sweep replaces only its own folder


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
    p.add_argument("--no-mlflow", action="store_true",
                   help="track nothing in MLflow (results files only)")  # fmt: skip
    return p


def connect_ray() -> None:
    """Joins $RAY_ADDRESS or starts a local Ray on loopback only (`actors.common.connect`),
    quiet: the sweep prints its own progress lines, and each trial's error is recorded."""
    from actors.common import connect

    connect(log_to_driver=False)


def _first_difference(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    fa, fb = flatten(a), flatten(b)
    return next((k for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)), None)


def absolute_paths(raw: dict[str, Any]) -> dict[str, Any]:
    """Trials run in their own directories: a relative data_dir is pinned to this one (so a
    resumed sweep, e.g. a new job's working dir, pins it to its own)."""
    return {**raw, "data_dir": str(Path(raw["data_dir"]).resolve())}


def plan(args: argparse.Namespace) -> tuple[dict[str, Any], Path, dict[str, Any] | None]:
    """Everything that can be wrong with the command, checked before Ray starts: the config
    (search block included), the results folder and the MLflow store, and for --resume the
    sweep being resumed (for a fresh one, that its folder is a sweep's to replace). Returns the
    config as given, the sweep directory and the saved sweep state (None for a fresh sweep)."""
    from fslsage.preflight import (
        check_folder,
        check_private,
        check_ray_address,
        check_tracking_uri,
    )
    from tune.tracking import resolve_tracking_uri

    cfg = load_config(args.config, args.overrides)
    given = cfg.to_dict()
    check_ray_address(os.environ.get("RAY_ADDRESS"), "RAY_ADDRESS")
    results_dir = check_folder(args.results_dir, "--results-dir")
    sweep_dir = results_dir / cfg.name  # `name` is a plain folder name: inside results_dir
    if not args.no_mlflow:
        key = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "--results-dir"
        check_tracking_uri(resolve_tracking_uri(results_dir), key)
    if not args.resume:
        if sweep_dir.is_symlink() or (sweep_dir.exists() and not sweep_dir.is_dir()):
            raise ConfigError("name", f"{sweep_dir} exists and is not a folder")
        if sweep_dir.is_dir() and any(sweep_dir.iterdir()) and not is_sweep_folder(sweep_dir):
            raise ConfigError("name", f"{sweep_dir} holds files that no sweep of this name made; "
                                      "choose another name or --results-dir")  # fmt: skip
        return given, sweep_dir, None
    state_file = sweep_dir / SWEEP_STATE
    if not (sweep_dir / "tuner.pkl").is_file() or not state_file.is_file():
        raise ConfigError("--resume", f"no interrupted sweep to resume in {sweep_dir}")
    check_private(sweep_dir, "--resume")
    state = read_state(state_file)
    if state is None:
        raise ConfigError("--resume", f"{state_file} is unreadable; start the sweep afresh")
    key = _first_difference(state["config"], given)
    if key is not None:
        raise ConfigError(
            "--resume", f"{key} differs from the interrupted sweep's config; resume with the same"
        )
    if args.no_mlflow and state.get("parent_run_id"):
        raise ConfigError("--no-mlflow", "the interrupted sweep is tracked in MLflow; resume it "
                                         "as it started, without --no-mlflow")  # fmt: skip
    return given, sweep_dir, state


def read_state(path: Path) -> dict[str, Any] | None:
    """A sweep's saved state, or None if it is missing or not what `start` writes."""
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(state, dict) and isinstance(state.get("config"), dict)
    return state if ok else None


def is_sweep_folder(sweep_dir: Path) -> bool:
    """The folder is one a sweep of this name made (its marker, or the state file of a sweep
    from before markers): the only kind of folder `start` ever deletes."""
    if (sweep_dir / SWEEP_MARKER).is_file():
        return (sweep_dir / SWEEP_MARKER).read_text().strip() == sweep_dir.name
    state = read_state(sweep_dir / SWEEP_STATE)
    return state is not None and state["config"].get("name") == sweep_dir.name


def cluster_size() -> dict[str, float]:
    """The CPUs, GPUs and accelerator types of the cluster this process joined, as trials are
    sized by them (without its accelerator type, a trial's S-Server would fit nowhere, and the
    trial would get one client actor)."""
    import ray

    resources = ray.cluster_resources()
    accelerators = {k: v for k, v in resources.items() if k.startswith("accelerator_type:")}
    return {"CPU": resources.get("CPU", 0.0), "GPU": resources.get("GPU", 0.0), **accelerators}


def check_cluster(base: dict[str, Any], state: dict[str, Any] | None) -> None:
    """Every trial's bundles fit the cluster, before anything is written or replaced: a trial
    that cannot be placed would wait for ever. A ConfigError names the key."""
    from tune.resources import check_trials_fit

    check_trials_fit(base, state["cluster"] if state else cluster_size())


def start(given: dict[str, Any], sweep_dir: Path, track: bool = True) -> dict[str, Any]:
    """A fresh sweep: the previous run of the same sweep is replaced (so two runs' rows never
    mix), the MLflow parent run is opened (unless not `track`) and what --resume needs is saved
    in sweep.json."""

    from tune import tracking

    if sweep_dir.is_dir() and is_sweep_folder(sweep_dir):
        trials = sum(1 for p in sweep_dir.iterdir() if p.is_dir())
        print(f"replacing the previous run of sweep {sweep_dir.name} in {sweep_dir} "
              f"({trials} trial folders and its result files)")  # fmt: skip
        end_killed_runs(read_state(sweep_dir / SWEEP_STATE))
        shutil.rmtree(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / SWEEP_MARKER).write_text(sweep_dir.name + "\n")  # first: the folder is ours
    uri = experiment_id = parent = None
    if track:
        uri = tracking.resolve_tracking_uri(sweep_dir.parent)
        experiment_id, parent = tracking.start_sweep_run(
            uri, given["name"], sweep_dir.parent / "mlartifacts", given, sweep_dir
        )
    state = {
        "config": given,  # --resume compares the config it is given with this one
        "tracking_uri": uri,
        "experiment_id": experiment_id,
        "parent_run_id": parent,
        # sized once: trials restored by --resume reserve what they reserved at first
        "cluster": cluster_size(),
    }
    write_atomic(sweep_dir / SWEEP_STATE, lambda tmp: tmp.write_text(json.dumps(state, indent=1)))
    return state


def end_killed_runs(state: dict[str, Any] | None) -> None:
    """The MLflow runs of a sweep being replaced that are still RUNNING end KILLED: its driver
    died without a word (SIGKILL) and it is started afresh instead of resumed, so nothing else
    would ever end them. Best effort: its store may be gone, and the new sweep needs nothing
    from it."""
    if not state or not state.get("parent_run_id"):
        return
    from tune import tracking

    try:
        tracking.end_left_running(state["tracking_uri"], state["experiment_id"],
                                  state["parent_run_id"])  # fmt: skip
    except Exception as e:  # whatever the old store raises (see the docstring)
        print(f"fslsage: the previous run's MLflow runs were left as they were: {e}",
              file=sys.stderr)  # fmt: skip


def make_tuner(base: dict[str, Any], sweep_dir: Path, state: dict[str, Any]) -> Any:
    """A new Tuner over the search space, or the interrupted one restored (its unfinished and
    errored trials go on; finished ones are kept)."""
    from ray import tune

    from fslsage.config import validate
    from tune import callbacks, space
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
            failure_config=tune.FailureConfig(max_failures=opts["max_failures"]),
            callbacks=[
                callbacks.Progress(base, keys),
                *(
                    [callbacks.MlflowTrials(uri, state["experiment_id"], parent, base, keys)]
                    if parent
                    else []
                ),
            ],
            verbose=0,
        ),
    )


INTERRUPTED = 130  # the exit status of a sweep cut short by Ctrl+C (128 + SIGINT)
# Tune stops a sweep gracefully on either: trials stopped, experiment state saved
STOP_SIGNALS = frozenset({signal.SIGINT, getattr(signal, "SIGUSR1", signal.SIGINT)})


@contextmanager
def signals_seen() -> Iterator[set[int]]:
    """The signals caught by a Python handler while the block ran (filled in when it ends).

    Tuner.fit() catches Ctrl+C with its own handler: it stops the running trials, which then
    read TERMINATED like finished ones, saves its state and returns as if the sweep had ended,
    its ResultGrid saying nothing of it. The interpreter writes every signal a Python handler
    catches to its wakeup fd, whoever's handler that is: this sees Ctrl+C without taking Tune's
    handler (its graceful stop) away. Off the main thread, or where another wakeup fd is set
    (an event loop's), it sees nothing. On the way out the SIGINT handler from before is put
    back: Tune leaves its own, which would swallow a Ctrl+C while the results are written."""
    seen: set[int] = set()
    if threading.current_thread() is not threading.main_thread():
        yield seen  # signal handlers and the wakeup fd belong to the main thread
        return
    handler = signal.getsignal(signal.SIGINT)
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    previous = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    if previous != -1:  # someone else's: leave it theirs
        signal.set_wakeup_fd(previous)
    try:
        yield seen
    finally:
        if previous == -1:
            signal.set_wakeup_fd(-1)
        if handler is not None:  # None: not set from Python
            signal.signal(signal.SIGINT, handler)
        try:
            while chunk := os.read(r, 512):
                seen.update(chunk)
        except BlockingIOError:
            pass
        os.close(r)
        os.close(w)


def write_failed(what: str | Path, error: OSError) -> str:
    """The one line a result that could not be written gets on stderr."""
    kind = "disk full: " if error.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return f"fslsage: {kind}could not write {what}: {error.strerror or error}"


def _end_runs(uri: str, state: dict[str, Any], status: str) -> None:
    """Best effort, on the way out of a sweep that could not finish its summary: the parent run
    and the trial runs still RUNNING end `status`. A store that fails too (the same full disk)
    must not hide the error being reported."""
    from tune import tracking

    try:
        tracking.settle_trial_runs(uri, state["experiment_id"], state["parent_run_id"], {}, status)
        tracking.finish_sweep_run(uri, state["parent_run_id"], status, [])
    except Exception:  # see the docstring
        pass


def run(
    given: dict[str, Any], sweep_dir: Path, state: dict[str, Any] | None, track: bool = True
) -> int:
    """Runs (or resumes) the sweep and writes its results; 0 when at least one trial did not
    fail, 1 when every trial failed or a result file could not be written (one line on
    stderr), 130 when interrupted (Ctrl+C: unfinished trials read "interrupted", MLflow runs
    KILLED; continue with --resume). A trial is failed when it raised or when its logged
    results are missing."""
    from fslsage.config import validate
    from tune import space, summary, tracking

    base = absolute_paths(given)
    cfg = validate(base)
    keys = space.searched_keys(cfg.search)
    # Checkpoint-driven experiment-state snapshots are expected here (small, local): no warning.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    begin = time.perf_counter()
    connect_ray()
    check_cluster(base, state)
    resumed = state is not None
    if state is None:
        state = start(given, sweep_dir, track)
    else:
        print(f"resuming the sweep in {sweep_dir}")
    # tracked as it started: not with --no-mlflow (then its parent run is None)
    uri, parent = state["tracking_uri"], state["parent_run_id"]
    if parent and resumed:
        tracking.reopen_sweep_run(uri, parent)

    try:
        with signals_seen() as seen, summary.errors_as_text():
            grid = make_tuner(base, sweep_dir, state).fit()
        # Ctrl+C ends fit() early without raising (see signals_seen); trials left unfinished or
        # never created tell too, should the signal have gone unseen
        ended = grid.num_terminated + grid.num_errors
        interrupted = bool(seen & STOP_SIGNALS) or ended < len(grid)
        interrupted = interrupted or len(grid) < space.trial_count(cfg.search)
        metrics, table, configs = summary.collect_all(grid, base, keys, interrupted)
        failed = int((table.status == "failed").sum())
        stopped = int((table.status == "interrupted").sum())
        print("\n" + summary.format_table(table))
        print(f"\nsweep {cfg.name}: {len(table)} trials, {failed} failed"
              + (f", {stopped} interrupted" if interrupted else "")
              + f", {time.perf_counter() - begin:.1f}s")  # fmt: skip
        try:
            written = summary.write_results(sweep_dir, metrics, table, configs)
            trial_files = summary.write_trial_files(sweep_dir, metrics, configs)
        except summary.WriteFailed as e:
            if parent:
                _end_runs(uri, state, "KILLED" if interrupted else "FAILED")
            print(write_failed(e.path, e.error), file=sys.stderr)
            return 1
        status = "KILLED" if interrupted else ("FAILED" if failed == len(table) else "FINISHED")
        outcomes = {t.trial_id: (t.status, t.error) for t in table.itertuples()}
        try:
            if parent:
                tracking.settle_trial_runs(uri, state["experiment_id"], parent, outcomes,
                                           artifacts=trial_files)  # fmt: skip
                tracking.finish_sweep_run(uri, parent, status,
                                          [*written, sweep_dir / SWEEP_STATE])  # fmt: skip
        except OSError as e:  # copying the artifacts into the MLflow store
            _end_runs(uri, state, "KILLED" if interrupted else "FAILED")
            print(write_failed(f"the artifacts of the MLflow runs of {uri}", e), file=sys.stderr)
            return 1
    except KeyboardInterrupt:  # a second Ctrl+C, cutting short Tune's last save or the summary
        if parent:
            _end_runs(uri, state, "KILLED")
        return INTERRUPTED

    print(f"results: {sweep_dir} (metrics.parquet, summary.csv; over seeds: summary.md)")
    for path in written:
        if path.suffix == ".png":
            print(f"plot: {path}")
    if parent:
        print(f"MLflow: {uri} (parent run {parent}); view with "
              f"`mlflow ui --backend-store-uri {uri}`")  # fmt: skip
    if interrupted:
        return INTERRUPTED
    return 1 if len(table) and failed == len(table) else 0


def resume_hint(argv: list[str], sweep_dir: Path) -> str:
    """What to do after Ctrl+C: the command that was run, plus --resume when there is a sweep
    to resume (Tune's state and sweep.json are written before its first trial starts)."""
    if (sweep_dir / "tuner.pkl").is_file() and (sweep_dir / SWEEP_STATE).is_file():
        again = [*argv, *([] if "--resume" in argv else ["--resume"])]
        command = shlex.join([sys.executable, "-m", "fslsage.sweep", *again])
        return f"fslsage: interrupted — continue with the same command plus --resume: {command}"
    return "fslsage: interrupted before the sweep started; run the same command again"


def _trial_id(trial: Any) -> str:
    """Trial names and directories are the trial ids: they key the result tables and MLflow."""
    return trial.trial_id


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        given, sweep_dir, state = plan(args)
    except ConfigError as e:
        print(f"fslsage: config error: {e}", file=sys.stderr)
        return 2
    try:
        code = run(given, sweep_dir, state, track=not args.no_mlflow)
    except ConfigError as e:  # what only the cluster can tell: resources no node has
        print(f"fslsage: config error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before Tune took Ctrl+C over (Ray starting, the MLflow run)
        code = INTERRUPTED
    if code == INTERRUPTED:
        print(resume_hint(argv, sweep_dir), file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
