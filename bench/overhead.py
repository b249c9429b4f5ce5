"""Ray runtime overhead: fsl_sage on the demo config, once in-process (LocalRuntime) and once on
Ray with one client actor per core, same rounds and same work (exact batching: same metrics).

Prints samples per second of each (training samples of all clients per round, times rounds, over
the wall time of the F-Server loop, evaluation included; Ray's start-up — actor processes, data
into the object store — is reported apart) and, as its last line,
`ray/local throughput ratio: X`. Runs alternate and the best of each counts, against background
load; the local baseline is the faster of torch's default thread count and one thread (on a busy
2-core machine two OpenMP threads slow it down many times over).

    .venv/bin/python bench/overhead.py [--rounds N] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import os
import time

import ray
import torch

from actors.runtime import RayRuntime
from fslsage.config import load_config
from fslsage.experiment import LocalRuntime, prepare, run_experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed_run(cfg, runtime) -> tuple[float, int]:
    start = time.perf_counter()
    df = run_experiment(cfg, runtime, progress=None)
    return time.perf_counter() - start, len(df)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--repeats", type=int, default=3, help="alternating runs; the best counts")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    cfg = load_config(os.path.join(ROOT, "configs", "demo.yaml"),
                      ["algorithm=fsl_sage", f"rounds={args.rounds}", *args.overrides])  # fmt: skip
    prepared = prepare(cfg)
    samples_per_round = sum(len(i) for i in prepared.client_indices) * cfg.local_epochs
    cores = os.cpu_count() or 1
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    default_threads = torch.get_num_threads()
    local_s: dict[int, list[float]] = {default_threads: [], 1: []}
    ray_s, startup_s = [], []
    try:
        for _ in range(args.repeats):  # alternating, so both see the same background load
            for threads in (default_threads, 1):  # 2 OpenMP threads collapse on a busy machine
                torch.set_num_threads(threads)
                seconds, rounds = timed_run(cfg, LocalRuntime(prepare(cfg)))
                local_s[threads].append(seconds)
            torch.set_num_threads(default_threads)
            start = time.perf_counter()
            runtime = RayRuntime(prepare(cfg))  # returns once every actor is up
            startup_s.append(time.perf_counter() - start)
            try:
                seconds, ray_rounds = timed_run(cfg, runtime)
                ray_s.append(seconds)
                batches = runtime.server_stats()["batch_sizes"]
                actors = len(runtime.client_actors)
            finally:
                runtime.close()
            assert ray_rounds == rounds
    finally:
        ray.shutdown()
    local_tput = samples_per_round * rounds / min(min(v) for v in local_s.values())
    ray_tput = samples_per_round * rounds / min(ray_s)

    def times(xs: list[float]) -> str:
        return " ".join(f"{x:.2f}" for x in xs)

    print(f"machine: {cores} CPU cores; {cfg.algorithm} on {cfg.dataset}, {cfg.num_clients} "
          f"clients, {rounds} rounds, server_batching={cfg.server_batching}")  # fmt: skip
    runs = "; ".join(f"{n} threads: {times(v)}" for n, v in local_s.items())
    print(f"local: {local_tput:9.0f} samples/s  (best of runs with {runs} s)")
    print(f"ray:   {ray_tput:9.0f} samples/s  (runs: {times(ray_s)} s; {actors} client actors; "
          f"start-up {times(startup_s)} s not counted; S-Server batches {batches})")  # fmt: skip
    print(f"ray/local throughput ratio: {ray_tput / local_tput:.2f}")


if __name__ == "__main__":
    main()
