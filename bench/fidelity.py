"""FSL-SAGE against CSE-FSL on digits, as issue 20 asks it measured: the demo config at
alpha = 0.1 with 10 clients for 30 rounds, over seeds; final accuracy, accuracy at a few rounds,
and accuracy at equal communication (GiB), mean ± std over the seeds.

    .venv/bin/python bench/fidelity.py [--seeds 0,1,2] [--rounds 30] [--set KEY=VALUE ...]

Runs in-process, one run after another (threads: 1 each). To compare with an older tree, run
this file with that tree first on PYTHONPATH (it uses only long-standing entry points). Prints
a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SETTING = ["alpha=0.1", "num_clients=10", "device=cpu"]
CHECK_ROUNDS = (5, 10, 20)


def run(algorithm: str, seed: int, rounds: int, overrides: list[str]) -> pd.DataFrame:
    from fslsage.config import load_config
    from fslsage.experiment import LocalRuntime, prepare, run_experiment

    sets = [*SETTING, f"rounds={rounds}", f"seed={seed}", f"algorithm={algorithm}", *overrides]
    cfg = load_config(ROOT / "configs" / "demo.yaml", sets)
    return run_experiment(cfg, LocalRuntime(prepare(cfg)), progress=None)


def accuracy_at_gib(df: pd.DataFrame, gib: float) -> float:
    """Test accuracy of the last round whose cumulative traffic is at most `gib`."""
    within = df[df["comm_gib"] <= gib + 1e-12]
    return float(within["test_acc"].iloc[-1]) if len(within) else float("nan")


def summarise(runs: dict[str, list[pd.DataFrame]]) -> dict:
    # equal communication: the smaller of the algorithms' final traffic, and half of it
    common = min(float(np.mean([df["comm_gib"].iloc[-1] for df in dfs])) for dfs in runs.values())
    out = {}
    for algorithm, dfs in runs.items():
        row = {"final": [float(df["test_acc"].iloc[-1]) for df in dfs]}
        for t in CHECK_ROUNDS:
            row[f"round_{t}"] = [float(df.loc[df["round"] == t, "test_acc"].iloc[0])
                                 for df in dfs if (df["round"] == t).any()]  # fmt: skip
        for share in (0.5, 1.0):
            row[f"at_{share * common:.4f}_gib"] = [accuracy_at_gib(df, share * common)
                                                   for df in dfs]  # fmt: skip
        row["final_gib"] = [float(df["comm_gib"].iloc[-1]) for df in dfs]
        out[algorithm] = {k: (float(np.mean(v)), float(np.std(v))) for k, v in row.items() if v}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--algorithms", default="fsl_sage,cse_fsl")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = {a: [run(a, s, args.rounds, args.overrides) for s in seeds]
            for a in args.algorithms.split(",")}  # fmt: skip
    summary = summarise(runs)
    for algorithm, row in summary.items():
        cells = "  ".join(f"{k} {m:.3f}±{s:.3f}" for k, (m, s) in row.items())
        print(f"{algorithm:<9} {cells}")
    import fslsage

    print(json.dumps({"tree": str(Path(fslsage.__file__).parents[1]), "seeds": seeds,
                      "rounds": args.rounds, "overrides": args.overrides,
                      "summary": summary}))  # fmt: skip
    sys.stdout.flush()


if __name__ == "__main__":
    main()
