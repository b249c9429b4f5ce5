"""`python -m fslsage.run --config FILE [--set key=value ...] [--out DIR] [--dry-run [--json]]`

Runs one experiment without Tune: on the in-process runtime (`runtime: local`) or on Ray actors
(`runtime: ray`, this module being one of the two entry points that may import Ray).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from fslsage.config import Config, ConfigError, load_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fslsage.run", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="experiment YAML (defaults apply to missing keys)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key; VALUE is YAML; dotted keys reach into blocks")  # fmt: skip
    p.add_argument("--out", help="output folder (default results/<name>)")
    p.add_argument("--dry-run", action="store_true", help="print the per-round ledger, no training")
    p.add_argument("--json", action="store_true", help="with --dry-run: one JSON object")
    p.add_argument("--address", help="Ray cluster address (runtime: ray); default $RAY_ADDRESS")
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
    import pandas as pd

    from fslsage.results import write_csv_atomic

    hist = pd.DataFrame(prepared.histogram).rename_axis("client").reset_index()
    write_csv_atomic(hist, out / "partition.csv")
    shown = min(len(hist), 10)
    print(f"partition {prepared.cfg.partition} (alpha={prepared.cfg.alpha}): label histogram of "
          f"{shown}/{len(hist)} clients (all in {out / 'partition.csv'})")  # fmt: skip
    for cid in range(shown):
        print(f"  client {cid:>3}: {prepared.histogram[cid].tolist()}")


def train(cfg: Config, out: Path, address: str | None) -> None:
    from fslsage.experiment import LocalRuntime, prepare, run_experiment
    from fslsage.stateless import remove_gradient_store, run_gradient_store

    cfg = run_gradient_store(cfg, out)  # temporary files stay inside the run's folder
    prepared = prepare(cfg)
    if cfg.runtime == "ray":  # first: it checks the cluster can hold the run, writing nothing
        from actors.runtime import RayRuntime

        runtime = RayRuntime(prepared, address=address)
    else:
        runtime = LocalRuntime(prepared)
    try:
        write_partition(prepared, out)
        df = run_experiment(cfg, runtime, out_dir=out)
    finally:
        runtime.close()
        remove_gradient_store(cfg)
    last = df.iloc[-1]
    print(f"done: {len(df)} rounds, test_acc {last.test_acc:.4f}, comm {last.comm_gib:.4f} GiB, "
          f"simulated {last.sim_time_s:.1f}s, {last.wall_s:.1f}s; "
          f"metrics in {out / 'metrics.parquet'}")  # fmt: skip


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
        if args.dry_run:
            dry_run(cfg, args.json)
            return 0
        if cfg.runtime == "ray":
            key = "--address" if args.address else "RAY_ADDRESS"
            check_ray_address(args.address or os.environ.get("RAY_ADDRESS"), key)
        out = Path(args.out or Path("results") / cfg.name)
        created = create_folder(out, "--out")
        train(cfg, out.resolve(), args.address)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
