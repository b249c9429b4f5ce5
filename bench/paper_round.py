"""One round of the paper setup: fsl_sage and splitfed_v2 on configs/paper/cifar10_resnet18.yaml
(its `search` block dropped) with synthetic CIFAR-10-shaped data, in-process and on Ray.

For each algorithm it runs `--rounds` rounds (default 2) on each of: the in-process runtime
(LocalRuntime), Ray with `server_batching: exact` and Ray with `server_batching: coalesce`, and
prints seconds per round (run_round + evaluate, each round on its own: no next round overlaps;
Ray's start-up apart), training samples per second of the last round, and peak memory. fsl_sage
aligns in round 1 (t = 1, then every `align_interval` rounds): round 1 is the warm-up and the
alignment, round 2 a plain round.

Peak memory: in-process, `torch.cuda.max_memory_allocated` on CUDA, else the process's max RSS
(`resource.getrusage`, the peak so far of this whole process); on Ray, the sum of the S-Server's
and the client actors' peak RSS (VmHWM, read from /proc: a local Ray instance).

Resources on Ray: on CUDA the S-Server at 1 GPU and 4 client actors at 0.25 GPU where there are
two cards or more; on one card the S-Server at 0.5 and 4 client actors at 0.125 (both fit one
card). On CPU no GPU shares, and as many client actors as the machine's cores allow.

By default it runs a shrunken version (a few hundred samples, batch 32, 2 alignment epochs over
a small buffer) so that any machine runs it in a minute or two; `--full` runs the paper's sizes
(50 000 samples, batch 256, 100 alignment epochs over 1000). It prints a table and, last, one
JSON line; it never asserts times. The goals are printed next to the figures: a full fsl_sage
round under 2 s on one H100/H200, Ray at least 2x the in-process runtime on a GPU.

    .venv/bin/python bench/paper_round.py [--full] [--rounds N] [--algorithms A,B]
                                         [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from typing import Any

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, ROOT)

from fslsage.config import Config, load_config  # noqa: E402
from fslsage.experiment import LocalRuntime, prepare  # noqa: E402

PAPER_CONFIG = os.path.join(ROOT, "configs", "paper", "cifar10_resnet18.yaml")
SYNTHETIC = ["dataset=synthetic", "dataset_args.like=cifar10"]
SHRUNK = [
    "dataset_args.num_train=320", "dataset_args.num_test=64", "batch_size=32",
    "eval_batch_size=64", "align_epochs=2", "align_buffer_size=64", "align_batch_size=32",
]  # fmt: skip
ALGORITHMS = ("fsl_sage", "splitfed_v2")
GOAL_ROUND_S = 2.0  # a full fsl_sage round on one H100/H200
GOAL_RAY_SPEEDUP = 2.0  # Ray against in-process, on a GPU


def paper_config(full: bool = False, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The paper's CIFAR-10 config on synthetic data, `search` dropped, shrunken unless `full`;
    `overrides` last."""
    sets = [*SYNTHETIC, *([] if full else SHRUNK), *overrides]
    return load_config(PAPER_CONFIG, sets).replace(search={})


def use_cuda(cfg: Config) -> bool:
    return cfg.device != "cpu" and torch.cuda.is_available()


def ray_resources(cfg: Config) -> dict[str, Any]:
    """The Ray runtime's resource keys for this machine (see the module's docstring)."""
    if not use_cuda(cfg):
        return {"device": "cpu", "client_gpus": 0.0, "server_gpus": 0.0}
    if torch.cuda.device_count() >= 2:
        return {"device": "cuda", "client_gpus": 0.25, "server_gpus": 1.0, "num_client_actors": 4}
    return {"device": "cuda", "client_gpus": 0.125, "server_gpus": 0.5, "num_client_actors": 4}


def peak_rss_mb() -> float:
    """This process's peak RSS so far (ru_maxrss: KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def vm_hwm_mb(pid: int) -> float | None:
    """A local process's peak RSS (VmHWM), None where /proc does not tell."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


def timed_rounds(runtime, rounds: int) -> list[float]:
    """Seconds of each round on its own: run_round(t), then evaluate() (no `start_round` of
    the next: each figure is one round's work, not part of the next one's overlapped with it)."""
    seconds = []
    for t in range(1, rounds + 1):
        start = time.perf_counter()
        runtime.run_round(t)
        runtime.evaluate()
        seconds.append(time.perf_counter() - start)
    return seconds


def run_local(cfg: Config, rounds: int) -> dict[str, Any]:
    prepared = prepare(cfg)
    samples = sum(len(i) for i in prepared.client_indices) * cfg.local_epochs
    cuda = use_cuda(cfg)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    runtime = LocalRuntime(prepared)
    try:
        seconds = timed_rounds(runtime, rounds)
        if cuda:
            torch.cuda.synchronize()
    finally:
        runtime.close()
    if cuda:
        memory = {"peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20, "mem_kind": "cuda"}
    else:
        memory = {"peak_mem_mb": peak_rss_mb(), "mem_kind": "max_rss"}
    return {"round_s": seconds, "samples_per_round": samples,
            "samples_per_s": samples / seconds[-1], **memory}  # fmt: skip


def run_ray(cfg: Config, rounds: int) -> dict[str, Any]:
    from actors.runtime import RayRuntime

    prepared = prepare(cfg)
    samples = sum(len(i) for i in prepared.client_indices) * cfg.local_epochs
    start = time.perf_counter()
    runtime = RayRuntime(prepared)  # returns once every actor is up
    startup = time.perf_counter() - start
    try:
        seconds = timed_rounds(runtime, rounds)
        placement = runtime.placement()
        pids = [placement["server"]["pid"], *(c["pid"] for c in placement["clients"])]
        stats = runtime.server_stats()
        actors = len(runtime.client_actors)
        peaks = [vm_hwm_mb(pid) for pid in pids]
    finally:
        runtime.close()
    known = [p for p in peaks if p is not None]
    return {"round_s": seconds, "samples_per_round": samples,
            "samples_per_s": samples / seconds[-1], "startup_s": startup,
            "client_actors": actors, "peak_mem_mb": sum(known) if known else None,
            "mem_kind": "actors_vmhwm_sum",
            "server_batches": len(stats.get("batch_sizes", []))}  # fmt: skip


def run_paper_round(
    full: bool = False,
    overrides: list[str] | tuple[str, ...] = (),
    rounds: int = 2,
    algorithms: tuple[str, ...] = ALGORITHMS,
) -> dict[str, Any]:
    """The benchmark's figures (Ray must be up: `start_local_ray`). Returns the JSON's dict."""
    base = paper_config(full, [*overrides, f"rounds={rounds}"])
    cuda = use_cuda(base)
    on_ray = ray_resources(base)
    results: dict[str, Any] = {}
    for algorithm in algorithms:
        cfg = base.replace(algorithm=algorithm)
        local = run_local(cfg.replace(device="cuda" if cuda else "cpu"), rounds)
        exact = run_ray(cfg.replace(**on_ray, server_batching="exact"), rounds)
        coalesce = run_ray(cfg.replace(**on_ray, server_batching="coalesce"), rounds)
        results[algorithm] = {
            "local": local,
            "ray_exact": exact,
            "ray_coalesce": coalesce,
            # last round: past the warm-up (and, for fsl_sage, past round 1's alignment)
            "ray_speedup": local["round_s"][-1] / exact["round_s"][-1],
            "coalesce_vs_exact": exact["round_s"][-1] / coalesce["round_s"][-1],
        }
    return {
        "full": full,
        "rounds": rounds,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "cpus": os.cpu_count(),
        "num_train": base.dataset_args.get("num_train", 50000),
        "batch_size": base.batch_size,
        "num_clients": base.num_clients,
        "align_epochs": base.align_epochs,
        "ray_resources": on_ray,
        "results": results,
        "goals": {
            "fsl_sage_full_round_s_on_h100_h200": GOAL_ROUND_S,
            "ray_speedup_on_gpu": GOAL_RAY_SPEEDUP,
        },  # fmt: skip
    }


def print_table(report: dict[str, Any]) -> None:
    size = "full" if report["full"] else "shrunken"
    print(f"paper round ({size}): {report['device']}, {report['cpus']} CPUs; "
          f"{report['num_train']} samples, batch {report['batch_size']}, "
          f"{report['num_clients']} clients, align_epochs {report['align_epochs']}; "
          f"Ray {report['ray_resources']}")  # fmt: skip
    print(f"{'algorithm':<12} {'runtime':<13} {'round s (each)':<22} {'samples/s':>10} "
          f"{'peak MiB':>9} {'start-up s':>10}")  # fmt: skip
    for algorithm, r in report["results"].items():
        for name in ("local", "ray_exact", "ray_coalesce"):
            row = r[name]
            rounds = " ".join(f"{s:.2f}" for s in row["round_s"])
            mem = "-" if row["peak_mem_mb"] is None else f"{row['peak_mem_mb']:.0f}"
            startup = f"{row['startup_s']:.2f}" if "startup_s" in row else "-"
            print(f"{algorithm:<12} {name:<13} {rounds:<22} {row['samples_per_s']:>10.1f} "
                  f"{mem:>9} {startup:>10}")  # fmt: skip
        print(f"{algorithm:<12} last round: Ray exact / in-process speed-up "
              f"{r['ray_speedup']:.2f} (goal on a GPU: >= {GOAL_RAY_SPEEDUP:.0f}); "
              f"coalesce / exact {r['coalesce_vs_exact']:.2f}")  # fmt: skip
    sage = report["results"].get("fsl_sage")
    if sage is None:
        return
    best = min(sage["local"]["round_s"][-1], sage["ray_exact"]["round_s"][-1])
    shrunken = "" if report["full"] else "; this run is shrunken"
    print(f"fsl_sage last round, faster runtime: {best:.2f} s (goal: a full round under "
          f"{GOAL_ROUND_S:.0f} s on one H100/H200{shrunken})")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="the paper's sizes (default: shrunken)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--algorithms", default=",".join(ALGORITHMS), help="comma-separated")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    algorithms = tuple(a.strip() for a in args.algorithms.split(",") if a.strip())
    import ray

    from actors.common import start_local_ray

    start_local_ray(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        report = run_paper_round(args.full, args.overrides, args.rounds, algorithms)
    finally:
        ray.shutdown()
    print_table(report)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
