"""`make demo`: fedavg, splitfed_v2, cse_fsl and fsl_sage × Dirichlet alpha 0.1 and 1.0 on the
embedded digits dataset, as a Ray Tune sweep on a local Ray instance (configs/demo_sweep.yaml):
progress per round, then the summary table and where the plots and the MLflow store are."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEMO_SWEEP = Path(__file__).resolve().parents[1] / "configs" / "demo_sweep.yaml"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fslsage.demo", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(DEMO_SWEEP))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--results-dir", default="results")
    args = p.parse_args(argv)
    from fslsage import sweep  # the sweep imports Ray only once the config is known to be good

    start = time.perf_counter()
    sets = [a for o in args.overrides for a in ("--set", o)]
    rc = sweep.main(["--config", args.config, "--results-dir", args.results_dir, *sets])
    if rc == 0:
        print(f"\ndemo finished in {time.perf_counter() - start:.1f}s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
