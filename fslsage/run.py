"""`python -m fslsage.run --config FILE [--set key=value ...] [--out DIR] [--dry-run [--json]]
[--resume] [--no-mlflow]`

Runs one experiment without Tune: on the in-process runtime (`runtime: local`) or on Ray actors
(`runtime: ray`, this module being one of the two entry points that may import Ray).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fslsage.config import Config, ConfigError, load_config

if TYPE_CHECKING:  # imported where used: `--dry-run` and a bad config start no torch
    from fslsage.experiment import Prepared, Runtime


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fslsage.run", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="experiment YAML (defaults apply to missing keys)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key; VALUE is YAML; dotted keys reach into blocks")  # fmt: skip
    p.add_argument("--out", help="output folder (default results/<name>)")
    p.add_argument("--dry-run", action="store_true", help="print the per-round ledger, no training")
    p.add_argument("--json", action="store_true", help="with --dry-run: one JSON object")
    p.add_argument("--address", help="Ray cluster address (runtime: ray); default $RAY_ADDRESS")
    p.add_argument("--resume", action="store_true",
                   help="go on from the newest checkpoint in the output folder")  # fmt: skip
    p.add_argument("--no-mlflow", action="store_true",
                   help="track nothing in MLflow (the output folder only)")  # fmt: skip
    return p


def dry_run(cfg: Config, as_json: bool) -> None:
    from fslsage.dryrun import planned_rounds
    from fslsage.ledger import format_round_table

    rounds = planned_rounds(cfg)
    if as_json:
        print(json.dumps({"algorithm": cfg.algorithm, "rounds": rounds}))
    else:
        print(f"{cfg.algorithm} on {cfg.model}/{cfg.dataset}, {cfg.num_clients} clients "
              f"(per-round ledger, no training)")  # fmt: skip
        print(format_round_table(rounds))


def write_partition(prepared, out: Path) -> None:
    """partition.csv and its picture, partition.png; the first clients' histograms printed."""
    from fslsage.report import save_partition_plot
    from fslsage.results import write_partition_csv

    csv = write_partition_csv(prepared.histogram, out)
    save_partition_plot(csv, out / "partition.png", prepared.cfg)
    total = len(prepared.histogram)
    shown = min(total, 10)
    print(f"partition {prepared.cfg.partition} (alpha={prepared.cfg.alpha}): label histogram of "
          f"{shown}/{total} clients (all in {csv}, drawn in partition.png)")  # fmt: skip
    for cid in range(shown):
        print(f"  client {cid:>3}: {prepared.histogram[cid].tolist()}")


def make_runtime(prepared: Prepared, address: str | None = None) -> Runtime:
    """The runtime the config asks for (the one place it is built, for `fslsage.run` and for a
    Tune trial): Ray actors (`runtime: ray`), joining `address`, $RAY_ADDRESS or the Ray this
    process runs in, else a local instance; or in-process, which in a process Ray started (a
    Tune trial) computes on the GPU share Ray gave it, capped to it, and elsewhere on the
    config's device."""
    cfg = prepared.cfg
    if cfg.runtime == "ray":  # first: it checks the cluster can hold the run, writing nothing
        from actors.runtime import RayRuntime

        return RayRuntime(prepared, address=address)
    from fslsage.experiment import LocalRuntime

    if not _started_by_ray():
        return LocalRuntime(prepared)
    from actors.common import actor_device

    return LocalRuntime(prepared, device=actor_device(cfg, cfg.server_gpus, "Tune trial"))


def _started_by_ray() -> bool:
    """Whether this process is one Ray started (an actor, as a Tune trial runs in): only Ray
    knows which GPUs it may use. Ray is not imported for the question."""
    ray = sys.modules.get("ray")
    return (ray is not None and ray.is_initialized()
            and ray.get_runtime_context().get_actor_id() is not None)  # fmt: skip


def train(cfg: Config, out: Path, address: str | None, resume: bool = False,
          on_start: Callable[[], None] | None = None,
          on_round: Callable[[dict], None] | None = None) -> None:  # fmt: skip
    """`on_start`: called once the runtime is up, before the first round; `on_round`: with each
    round's metrics row (the run's tracking, `RunRecord`)."""
    from fslsage.experiment import prepare, run_experiment
    from fslsage.stateless import remove_gradient_store, run_gradient_store

    cfg = run_gradient_store(cfg, out)  # temporary files stay inside the run's folder
    prepared = prepare(cfg)
    runtime = make_runtime(prepared, address)
    try:
        write_partition(prepared, out)
        if on_start is not None:
            on_start()
        df = run_experiment(cfg, runtime, out_dir=out, resume=resume, on_round=on_round)
    finally:
        runtime.close()
        remove_gradient_store(cfg)
    last = df.iloc[-1]
    print(f"done: {len(df)} rounds, test_acc {last.test_acc:.4f}, comm {last.comm_gib:.4f} GiB, "
          f"simulated {last.sim_time_s:.1f}s, {last.wall_s:.1f}s; "
          f"metrics in {out / 'metrics.parquet'}")  # fmt: skip


def tracking_uri(out: Path) -> str:
    """The MLflow store of a run, checked before anything starts: $MLFLOW_TRACKING_URI, else
    SQLite beside the output folder (`results/mlflow.db` by default), as a sweep's."""
    from fslsage.preflight import check_tracking_uri
    from tune.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(out.resolve().parent)
    key = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "--out"
    check_tracking_uri(uri, key)
    return uri


class RunRecord:
    """What a run leaves besides its metrics: config.json, once it starts; at its end, however
    it ends, summary.csv, summary.md and the figures (`fslsage.report`); and, unless
    --no-mlflow, its MLflow run (params, a metric point per round, those files as artifacts),
    ended FINISHED, FAILED with the reason, or KILLED by Ctrl+C."""

    def __init__(self, cfg: Config, out: Path, uri: str | None, resume: bool):
        self.cfg, self.out, self.uri, self.resume = cfg, out, uri, resume
        self.started = False
        self.tracker: Any = None

    def start(self) -> None:
        from fslsage.report import write_config

        write_config(self.cfg, self.out)
        self.started = True
        if self.uri is not None:
            from tune.tracking import RunTracker

            self.tracker = RunTracker.start(self.uri, self.cfg, self.out, self.resume)

    def on_round(self, row: dict) -> None:
        if self.tracker is not None:
            self.tracker.log_round(row)

    def finish(self, status: str, error: str = "") -> None:
        """Writes the run's summary and figures (when it has rounds) and ends its MLflow run
        with its files; a run that never started leaves nothing."""
        from fslsage import report
        from tune.tracking import RUN_STATUS

        if not self.started:
            return
        files = [
            self.out / name
            for name in (
                report.CONFIG_FILE,
                report.METRICS_FILE,
                report.PARTITION_FILE,
                report.PARTITION_PNG,
            )
        ]
        try:
            if (self.out / report.METRICS_FILE).is_file():
                files += report.write_run_report(self.out, status, error)
        finally:
            if self.tracker is not None:
                self.tracker.finish(RUN_STATUS[status], files, error)

    @contextmanager
    def outcome(self) -> Iterator[None]:
        """Finishes the record as the block ends: finished, failed (its reason) or
        interrupted (Ctrl+C)."""
        from tune.tracking import error_reason

        try:
            yield
        except KeyboardInterrupt:
            self.finish("interrupted")
            raise
        except BaseException as e:
            self.finish("failed", error_reason(e))
            raise
        self.finish("finished")

    def print_where(self) -> None:
        print(f"summary: {self.out / 'summary.md'}; figures: acc_vs_comm.png, acc_vs_time.png, "
              "partition.png")  # fmt: skip
        if self.tracker is not None:
            print(f"MLflow: {self.uri} (run {self.tracker.run_id}); view with "
                  f"`mlflow ui --backend-store-uri {self.uri}`")  # fmt: skip


def check_resumable(cfg: Config, out: Path) -> None:
    """--resume needs a checkpoint in `out`: said before anything starts (whether its settings
    match is checked as it is loaded)."""
    from fslsage import checkpoint

    folder = out / checkpoint.FOLDER
    if not checkpoint.rounds(folder):
        raise ConfigError("--resume", f"no checkpoint in {folder}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fslsage.data.base import DataError
    from fslsage.experiment import TrainingDiverged
    from fslsage.preflight import check_ray_address, create_folder, remove_created

    created: list[Path] = []
    try:
        cfg = load_config(args.config, args.overrides)
        if args.json and not args.dry_run:
            raise ConfigError("--json", "only goes with --dry-run")
        if args.resume and args.dry_run:
            raise ConfigError("--resume", "does not go with --dry-run")
        if args.dry_run:
            dry_run(cfg, args.json)
            return 0
        if cfg.runtime == "ray":
            key = "--address" if args.address else "RAY_ADDRESS"
            check_ray_address(args.address or os.environ.get("RAY_ADDRESS"), key)
        out = Path(args.out or Path("results") / cfg.name)
        if args.resume:
            check_resumable(cfg, out)
        uri = None if args.no_mlflow else tracking_uri(out)
        created = create_folder(out, "--out")
        record = RunRecord(cfg, out.resolve(), uri, args.resume)
        with record.outcome():
            train(cfg, out.resolve(), args.address, args.resume, record.start, record.on_round)
        record.print_where()
    except ConfigError as e:
        remove_created(created)  # a run stopped before it began leaves no empty folders
        print(f"fslsage: config error: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        remove_created(created)
        print(f"fslsage: data error: {e}", file=sys.stderr)
        return 1
    except TrainingDiverged as e:
        print(f"fslsage: training diverged: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fslsage: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
