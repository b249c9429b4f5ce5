"""Ray runtime overhead: fsl_sage on the demo config in-process (LocalRuntime) and on Ray with
one client actor per core, same rounds and same work (exact batching: same metrics).

The runtimes take their rounds in turn, in chunks — rounds 1–5 on Ray, then rounds 1–5
in-process, then rounds 6–10 … — so the load of a shared host falls on both alike, and each
pair of runs gives one paired ratio. Within a chunk the rounds run as the F-Server loop
(`run_experiment`) drives them: `run_round(t)`, `start_round(t + 1)`, then `evaluate()`, so Ray
submits round t + 1 before round t ends and overlaps round t's evaluation with it; a chunk's
last round has no successor (its horizon: 2 of the 14 overlaps of a 15-round run are lost, the
figure errs against Ray).
Throughput is training samples of all clients per round, times rounds, over the
summed round times; Ray's start-up (actor processes, data into the object store) is reported
apart. The in-process runtime runs with torch's default thread count and with one thread (on a
busy 2-core machine two OpenMP threads can slow it down many times over), each paired with its
own Ray run; the last line is the median paired ratio against the faster of the two:
`ray/local throughput ratio: X`.

    .venv/bin/python bench/overhead.py [--rounds N] [--repeats K] [--chunk C] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import ray
import torch

from actors.runtime import RayRuntime
from fslsage.config import load_config
from fslsage.experiment import LocalRuntime, prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed_rounds(runtime, rounds: range) -> float:
    """Seconds for `rounds`, driven like the F-Server loop within them."""
    start = time.perf_counter()
    for t in rounds:
        runtime.run_round(t)
        if t < rounds[-1]:
            runtime.start_round(t + 1)
        runtime.evaluate()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--repeats", type=int, default=3, help="paired runs per local thread count")
    p.add_argument("--chunk", type=int, default=5, help="rounds per turn of each runtime")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    cfg = load_config(os.path.join(ROOT, "configs", "demo.yaml"),
                      ["algorithm=fsl_sage", f"rounds={args.rounds}", *args.overrides])  # fmt: skip
    samples = sum(len(i) for i in prepare(cfg).client_indices) * cfg.local_epochs * cfg.rounds
    cores = os.cpu_count() or 1
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    default_threads = torch.get_num_threads()
    thread_counts = sorted({default_threads, 1}, reverse=True)
    local_s: dict[int, list[float]] = {n: [] for n in thread_counts}
    ray_s: dict[int, list[float]] = {n: [] for n in thread_counts}
    startup_s: list[float] = []
    try:
        for _ in range(args.repeats):
            for n in thread_counts:
                paired = paired_run(cfg, n, args.chunk)
                local_seconds, ray_seconds, startup, batches, actors = paired
                local_s[n].append(local_seconds)
                ray_s[n].append(ray_seconds)
                startup_s.append(startup)
    finally:
        torch.set_num_threads(default_threads)
        ray.shutdown()

    def times(xs: list[float]) -> str:
        return " ".join(f"{x:.2f}" for x in xs)

    # against the faster local variant: the median paired ratio of each, the lower counts
    ratios = {n: [lo / ra for lo, ra in zip(local_s[n], ray_s[n], strict=True)] for n in local_s}
    medians = {n: statistics.median(r) for n, r in ratios.items()}
    all_ray = [x for xs in ray_s.values() for x in xs]
    print(f"machine: {cores} CPU cores; {cfg.algorithm} on {cfg.dataset}, {cfg.num_clients} "
          f"clients, {cfg.rounds} rounds, server_batching={cfg.server_batching}, "
          f"align_interval={cfg.align_interval}")  # fmt: skip
    for n in thread_counts:
        print(f"local, {n} thread{'s' * (n > 1)}: runs {times(local_s[n])} s; Ray alongside: "
              f"{times(ray_s[n])} s; paired ratios {times(ratios[n])}")  # fmt: skip
    best_local = min(min(v) for v in local_s.values())
    print(f"local: {samples / best_local:9.0f} samples/s at best; ray: "
          f"{samples / min(all_ray):9.0f} samples/s at best ({actors} client actors; start-up "
          f"{times(startup_s)} s not counted; S-Server batches {batches})")  # fmt: skip
    print(f"ray/local throughput ratio: {min(medians.values()):.2f}")


def paired_run(cfg, threads: int, chunk: int) -> tuple[float, float, float, dict, int]:
    """One experiment on each runtime, `chunk` rounds at a time in turn (Ray's first: a
    multi-threaded local round leaves its threads spinning for a few ms after it). Returns
    (local s, Ray s, Ray start-up s, S-Server batch sizes, client actors)."""
    start = time.perf_counter()
    ray_runtime = RayRuntime(prepare(cfg))  # returns once every actor is up
    startup = time.perf_counter() - start
    local = LocalRuntime(prepare(cfg))
    local_seconds = ray_seconds = 0.0
    try:
        for first in range(1, cfg.rounds + 1, chunk):
            rounds = range(first, min(first + chunk, cfg.rounds + 1))
            ray_runtime.horizon = rounds[-1]  # no round submitted ahead past the chunk
            ray_seconds += timed_rounds(ray_runtime, rounds)
            torch.set_num_threads(threads)
            local_seconds += timed_rounds(local, rounds)
        batches = ray_runtime.server_stats()["batch_sizes"]
        actors = len(ray_runtime.client_actors)
    finally:
        ray_runtime.close()
    return local_seconds, ray_seconds, startup, batches, actors


if __name__ == "__main__":
    main()
