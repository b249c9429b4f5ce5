"""Ray runtime overhead: fsl_sage on the demo config in-process (LocalRuntime) and on Ray with
one client actor per core, same rounds and same work (exact batching: same metrics); another
algorithm with `--set algorithm=...` (gas included).

The runtimes take their rounds in turn, in chunks — rounds 1–2 on Ray, then rounds 1–2
in-process, then rounds 3–7 on Ray … — so the load of a shared host falls on both alike, and each
pair of runs gives one paired ratio. Within a chunk the rounds run as the F-Server loop
(`run_experiment`) drives them: `run_round(t)`, `start_round(t + 1)`, then `evaluate()`, so Ray
overlaps round t's evaluation with round t + 1; a chunk's last round has no successor (3 of the
14 overlaps of a 15-round run are lost, the figure errs against Ray). Neither runtime
checkpoints (`run_round`'s default), so both do the same work.
Throughput is training samples of all clients per round (for gas: of its schedule's steps),
times rounds, over the summed round times; Ray's start-up (actor processes, data into the object
store) is reported apart. The in-process runtime runs with torch's default thread count and
with one thread (on a busy 2-core machine two OpenMP threads can slow it down many times over),
each paired with its own Ray run; the last line is the median paired ratio against the faster
of the two: `ray/local throughput ratio: X`.

The first chunk is the warm-up (`--warmup`, default 2 rounds: the first training round and the
first alignment of the demo's l = 2). Every process pays for its first kernels and allocations
there: Ray's three fresh actor processes in every paired run, the in-process runtime only in
the first (it runs in this warm process after that). The line before the last gives the ratio
of the rounds after it as well (steady state); the last line counts every round.

    .venv/bin/python bench/overhead.py [--rounds N] [--repeats K] [--chunk C] [--warmup W]
                                       [--set key=value ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Iterable

import ray
import torch

from actors.common import start_local_ray
from actors.runtime import RayRuntime
from fslsage.config import load_config
from fslsage.experiment import LocalRuntime, async_schedule, prepare

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
    p.add_argument("--warmup", type=int, default=2, help="rounds of the first turn, the warm-up")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    cfg = load_config(os.path.join(ROOT, "configs", "demo.yaml"),
                      ["algorithm=fsl_sage", f"rounds={args.rounds}", *args.overrides])  # fmt: skip
    turns = chunks(cfg.rounds, args.warmup, args.chunk)
    samples = trained_samples(cfg)
    cores = os.cpu_count() or 1
    # a Ray instance of its own, sized to this machine, even where a cluster is up: the figure
    # is this machine's
    start_local_ray(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    default_threads = torch.get_num_threads()
    thread_counts = sorted({default_threads, 1}, reverse=True)
    # seconds per turn of each paired run, by local thread count
    local_s: dict[int, list[list[float]]] = {n: [] for n in thread_counts}
    ray_s: dict[int, list[list[float]]] = {n: [] for n in thread_counts}
    startup_s: list[float] = []
    try:
        for _ in range(args.repeats):
            for n in thread_counts:
                local_turns, ray_turns, startup, batches, actors = paired_run(cfg, n, turns)
                local_s[n].append(local_turns)
                ray_s[n].append(ray_turns)
                startup_s.append(startup)
    finally:
        torch.set_num_threads(default_threads)
        ray.shutdown()

    def times(xs: Iterable[float]) -> str:
        return " ".join(f"{x:.2f}" for x in xs)

    def ratios(skip: int) -> tuple[dict[int, list[float]], float]:
        """Paired ratios over the turns after the first `skip`, by local thread count, and
        the figure: the lower of the two medians (against the faster local variant)."""
        pairs = {n: zip(local_s[n], ray_s[n], strict=True) for n in thread_counts}
        by_count = {n: [sum(lo[skip:]) / sum(ra[skip:]) for lo, ra in p] for n, p in pairs.items()}
        return by_count, min(statistics.median(r) for r in by_count.values())

    every, figure = ratios(0)
    print(f"machine: {cores} CPU cores; {cfg.algorithm} on {cfg.dataset}, {cfg.num_clients} "
          f"clients, {cfg.rounds} rounds, server_batching={cfg.server_batching}, "
          f"align_interval={cfg.align_interval}")  # fmt: skip
    for n in thread_counts:
        runs, alongside = times(map(sum, local_s[n])), times(map(sum, ray_s[n]))
        print(f"local, {n} thread{'s' * (n > 1)}: runs {runs} s; Ray alongside: {alongside} s; "
              f"paired ratios {times(every[n])}")  # fmt: skip
    best_local = min(sum(turns) for v in local_s.values() for turns in v)
    best_ray = min(sum(turns) for v in ray_s.values() for turns in v)
    print(f"local: {samples / best_local:9.0f} samples/s at best; ray: "
          f"{samples / best_ray:9.0f} samples/s at best ({actors} client actors; start-up "
          f"{times(startup_s)} s not counted; S-Server batches {batches})")  # fmt: skip
    if args.warmup and len(turns) > 1:
        steady, steady_figure = ratios(1)
        paired = "; ".join(f"{n} local thread{'s' * (n > 1)}: {times(steady[n])}"
                           for n in thread_counts)  # fmt: skip
        print(f"steady state (rounds {turns[1][0]}–{cfg.rounds}, after the warm-up): paired "
              f"ratios {paired}; ray/local {steady_figure:.2f}")  # fmt: skip
    print(f"ray/local throughput ratio: {figure:.2f}")


def trained_samples(cfg) -> int:
    """The training samples of a whole run: every client's shard each local epoch, or for gas
    the batches of the steps its schedule plans (they depend on no training)."""
    prepared = prepare(cfg)
    sizes = [len(i) for i in prepared.client_indices]
    if not prepared.algorithm.asynchronous:
        return sum(sizes) * cfg.local_epochs * cfg.rounds
    schedule = async_schedule(cfg, sizes)
    return sum(batch for _ in range(cfg.rounds) for kind, _, batch in schedule.global_iteration()
               if kind == "step")  # fmt: skip


def chunks(rounds: int, warmup: int, chunk: int) -> list[range]:
    """The runtimes' turns: the warm-up rounds, then `chunk` rounds at a time."""
    first = min(warmup, rounds)
    turns = [range(1, first + 1)] if first else []
    return turns + [
        range(a, min(a + chunk, rounds + 1)) for a in range(first + 1, rounds + 1, chunk)
    ]


def paired_run(cfg, threads: int, turns: list[range]) -> tuple[list, list, float, dict, int]:
    """One experiment on each runtime, a turn of rounds at a time (Ray's first: a
    multi-threaded local round leaves its threads spinning for a few ms after it). Returns
    (local s per turn, Ray s per turn, Ray start-up s, S-Server batch sizes, client actors)."""
    start = time.perf_counter()
    ray_runtime = RayRuntime(prepare(cfg))  # returns once every actor is up
    startup = time.perf_counter() - start
    local = LocalRuntime(prepare(cfg))
    local_turns, ray_turns = [], []
    try:
        for rounds in turns:
            ray_turns.append(timed_rounds(ray_runtime, rounds))
            torch.set_num_threads(threads)
            local_turns.append(timed_rounds(local, rounds))
        batches = ray_runtime.server_stats()["batch_sizes"]
        actors = len(ray_runtime.client_actors)
    finally:
        ray_runtime.close()
    return local_turns, ray_turns, startup, batches, actors


if __name__ == "__main__":
    main()
