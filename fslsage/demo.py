"""`make demo`: every algorithm on the embedded digits dataset, in this process, with a summary
table and the accuracy-vs-communication plot. (The Ray Tune sweep version replaces this once the
sweep command exists.)"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

from fslsage.algorithms import ALGORITHMS
from fslsage.config import ConfigError, load_config
from fslsage.experiment import LocalRuntime, prepare, run_experiment
from fslsage.plots import plot_acc_vs_comm
from fslsage.results import write_parquet_atomic


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fslsage.demo", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default="results/demo")
    args = p.parse_args(argv)
    try:
        base = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"fslsage: config error: {e}", file=sys.stderr)
        return 2
    out, start, frames = Path(args.out), time.perf_counter(), []
    for algorithm in ALGORITHMS.names():
        cfg = base.replace(algorithm=algorithm, name=f"{base.name}-{algorithm}")
        df = run_experiment(cfg, LocalRuntime(prepare(cfg)), out_dir=out / algorithm)
        frames.append(df.assign(algorithm=algorithm))
    metrics = pd.concat(frames, ignore_index=True)
    write_parquet_atomic(metrics, out / "metrics.parquet")
    plot = plot_acc_vs_comm(metrics, out / "acc_vs_comm.png", title=f"{base.dataset}, {base.model}")
    last = metrics.groupby("algorithm").tail(1).set_index("algorithm")
    table = last[["round", "test_acc", "comm_gib", "wall_s"]].sort_values("comm_gib")
    print("\n" + table.to_string(float_format=lambda v: f"{v:.4f}"))
    elapsed = time.perf_counter() - start
    print(f"\ndemo finished in {elapsed:.1f}s; metrics {out / 'metrics.parquet'}, plot {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
